"""The names stages share: the adapter roles on the one base, and the files one stage writes for
another (or for a user) to read. One place for each, so readers and writers cannot drift apart."""

# Adapter roles. PPO holds all four on the base; a saved stage's adapter is PEFT's default one, which
# is what PEFT, TRL and serving tools load; TRL's DPOTrainer names its frozen copy of the policy `ref`.
POLICY, REFERENCE, REWARD, VALUE = "policy", "reference", "reward", "value"
SAVED_ADAPTER = "default"
TRL_REFERENCE_ADAPTER = "ref"

# Files in a stage's folder.
MANIFEST = "manifest.json"  # what ran, on what, from which inputs, and whether it completed
METRICS = "metrics.json"  # the stage's final metrics
RESOLVED_RECIPE = "recipe.yaml"  # the whole recipe as run, every default filled in
LOG_HISTORY = "log_history.json"  # the training log, one row per logging step or PPO iteration
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # PEFT's own names
SAMPLES_DIR = "samples"  # generated answers, one `<split>.jsonl` per evaluated split
EVAL_INITIAL = "eval_initial"  # a PPO stage's answers of its starting policy, on its `eval` prompts
SCORE_HEAD_FILE = "score_head.safetensors"  # a PPO stage's value head (a reward stage's head is in its adapter)
REWARD_STATS_FILE = "reward_stats.json"  # {"mean", "std", "count"} of rewards over the training prompts


# The RL stage's reward sources, each named for its weight (`reward_weights`) and its metrics (`reward/<name>`).
REWARD_MODEL_SOURCE = "reward_model"  # a separate sequence-classification model


def reward_functions(reward_function: str | list[str] | None) -> list[str]:
    """`reward_function` as a list: a recipe gives one `module:function`, a list of them, or none."""
    return [reward_function] if isinstance(reward_function, str) else list(reward_function or [])


def reward_source_names(
    reward_from: str | None, reward_model: object, reward_function: str | list[str] | None
) -> list[str]:
    """The reward stage's own name, `reward_model`, and each `module:function`'s function name."""
    return (
        ([reward_from] if reward_from else [])
        + ([REWARD_MODEL_SOURCE] if reward_model else [])
        + [path.rpartition(":")[2] for path in reward_functions(reward_function)]
    )
