"""alignment: the InstructGPT recipe (SFT → reward model → PPO, or DPO) on one 4-bit base, from YAML recipes."""

__version__ = "0.1.0"
