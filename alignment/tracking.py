"""Weights & Biases tracking: one run per stage, grouped by recipe, with the resolved recipe as config.

Mode `auto` goes online when an API key is configured and offline otherwise (said once on the
console); offline runs are written under the run folder and can be uploaded later with `wandb sync`.
The HF Trainer's W&B callback logs into the run opened here, so TRL's metrics and ours share it.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from alignment.recipes.schema import Recipe, StageSpec

logger = logging.getLogger(__name__)
_offline_notice_shown = False


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    global _offline_notice_shown
    if mode == "auto" and os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if has_api_key():
        return "online"
    if not _offline_notice_shown:
        print("W&B: no API key found, so runs are logged offline (upload later with `wandb sync`).")
        _offline_notice_shown = True
    return "offline"


class Tracker:
    """One W&B run for one stage; every method is a no-op when tracking is disabled."""

    def __init__(self, recipe: Recipe, stage: StageSpec, run_dir: Path, config: dict[str, Any]):
        self.mode = resolve_mode(recipe.tracking.mode)
        self.run = None
        if self.mode == "disabled":
            return
        import wandb

        tracking = recipe.tracking
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=tracking.project,
            entity=tracking.entity,
            group=tracking.group or recipe.name,
            job_type=stage.type,
            name=f"{recipe.name}/{stage.name}",
            tags=list(tracking.tags),
            config=config,
            dir=str(run_dir),
            mode=self.mode,
            reinit="finish_previous",
        )

    @property
    def report_to(self) -> list[str]:
        """What the HF Trainer should report to: the run opened here, or nothing."""
        return ["wandb"] if self.run is not None else []

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def histogram(self, key: str, values: list[float], step: int | None = None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Histogram(values)}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def info(self) -> dict[str, Any]:
        if self.run is None:
            return {"mode": self.mode}
        return {"mode": self.mode, "id": self.run.id, "dir": str(Path(self.run.dir).parent), "url": self.run.url}

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
