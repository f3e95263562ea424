"""The PPO stage: its config (`config`) and the maths of RLHF with PPO (`core`: rewards, GAE, losses, KL control)."""

from alignment.ppo.config import PPOConfig

__all__ = ["PPOConfig"]
