"""Stage types. A new type is one file that defines a `Stage` subclass with `@register`, imported here."""

from alignment.stages import (
    dpo,  # noqa: F401  (registers `dpo`)
    ppo,  # noqa: F401  (registers `ppo`)
    reward,  # noqa: F401  (registers `reward`)
    sft,  # noqa: F401  (registers `sft`)
)
from alignment.stages.base import STAGE_TYPES, Stage, register

__all__ = ["STAGE_TYPES", "Stage", "register"]
