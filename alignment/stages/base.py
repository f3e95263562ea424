"""What every stage shares, written once: its folder, manifest, metrics, tracking and atomic output.

A stage type subclasses `Stage`, sets `type`, `spec_class` (its recipe keys) and `args_class` (the
config its `args` pass through to), and implements `run`, which reads as a straight line from data
to saved output. `execute` wraps it: the output folder appears whole on success or not at all, and a
failed run leaves earlier results intact and its reason in the work folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

import yaml

from alignment.allocator import active_allocator
from alignment.distributed import process_state
from alignment.io import atomic_directory, write_json, write_text
from alignment.names import MANIFEST, METRICS, RESOLVED_RECIPE
from alignment.recipes.schema import Recipe, StageSpec
from alignment.recipes.validate import check_args
from alignment.tracking import Tracker, artifact_name

logger = logging.getLogger(__name__)

STAGE_TYPES: dict[str, type[Stage]] = {}
LIBRARIES = ("alignment", "torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "accelerate", "wandb")


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator: makes a stage type available to recipes under `cls.type`."""
    STAGE_TYPES[cls.type] = cls
    return cls


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def to_plain(value: Any) -> Any:
    """Dataclasses to plain dicts (for YAML, JSON and W&B config)."""
    if dataclasses.is_dataclass(value):
        return {field.name: to_plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    return value


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(stage_dir) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


class StageInputError(RuntimeError):
    """A stage needs an earlier stage's output that is not there."""


class Stage:
    type: ClassVar[str]
    spec_class: ClassVar[type[StageSpec]] = StageSpec
    args_class: ClassVar[type]

    def __init__(self, recipe: Recipe, spec: StageSpec, run_dir: Path):
        self.recipe, self.spec, self.run_dir = recipe, spec, Path(run_dir)
        self.stage_dir = self.run_dir / spec.name
        self.work_dir = self.run_dir / ".work" / spec.name
        self.seed = recipe.seed

    @classmethod
    def check_args(cls, args: dict[str, Any], path: str) -> dict[str, Any]:
        """Validates `args` before anything loads. TRL configs are only type-checked (building them
        sets up devices); a stage with a side-effect-free config of its own overrides this to build it."""
        return check_args(cls.args_class, args, path)

    # ---- what a stage implements -----------------------------------------------------------
    def run(self, output_dir: Path, tracker: Tracker) -> dict[str, Any]:
        """Trains and saves into `output_dir`; returns the stage's metrics."""
        raise NotImplementedError

    # ---- shared steps ----------------------------------------------------------------------
    def trl_args(self, tracker: Tracker, **stage_defaults: Any) -> Any:
        """The stage's TRL config: our defaults (folders, seed, tracking, precision), then the recipe's args."""
        import torch

        from alignment.models.precision import trainer_precision_args

        defaults = {
            "output_dir": str(self.work_dir),
            "seed": self.seed,
            "run_name": f"{self.recipe.name}/{self.spec.name}",
            "report_to": tracker.report_to,
            **trainer_precision_args(self.recipe.model),
            "dataloader_pin_memory": torch.cuda.is_available(),  # pinned pages only help copies to a GPU
            "save_total_limit": 1,
            "logging_steps": 10,
            **stage_defaults,
        }
        args = {**defaults, **self.spec.args}
        args["output_dir"], args["report_to"] = defaults["output_dir"], defaults["report_to"]
        return self.args_class(**args)

    def resolved_config(self) -> dict[str, Any]:
        """The part of the recipe this stage depends on: what W&B shows and what the fingerprint hashes."""
        recipe = to_plain(self.recipe)
        recipe.pop("stages")
        return {"recipe": recipe, "stage": to_plain(self.spec)}

    def fingerprint(self) -> str:
        """Changes when this stage's config or any input stage's output changes (then it must re-run)."""
        inputs = {
            name: (read_manifest(self.input_stage_dir(name)) or {}).get("fingerprint")
            for name in self.spec.depends_on()
        }
        text = json.dumps({"config": self.resolved_config(), "inputs": inputs}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def input_stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def require_stage(self, name: str) -> Path:
        """The folder of an earlier stage's completed output, or a clear error saying how to make it."""
        path = self.input_stage_dir(name)
        manifest = read_manifest(path)
        if manifest is None or manifest.get("status") != "completed":
            raise StageInputError(
                f"stage '{self.spec.name}' needs the output of stage '{name}', but {path} holds no completed "
                f"stage; run it first (alignment run RECIPE --stages {name})"
            )
        return path

    def is_complete(self) -> bool:
        manifest = read_manifest(self.stage_dir)
        return bool(
            manifest and manifest.get("status") == "completed" and manifest.get("fingerprint") == self.fingerprint()
        )

    def prepare_work_dir(self) -> None:
        """Keeps checkpoints of an interrupted run of the same config (to resume); clears stale ones."""
        marker = self.work_dir / "fingerprint"
        fingerprint = self.fingerprint()
        if self.work_dir.exists() and (not marker.exists() or marker.read_text() != fingerprint):
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        write_text(marker, fingerprint)

    def manifest(self, status: str, started: str, seconds: float, tracker: Tracker, error: str | None = None) -> dict:
        return {
            "stage": self.spec.name,
            "type": self.spec.type,
            "status": status,
            "started_at": started,
            "finished_at": now(),
            "duration_s": round(seconds, 2),
            "fingerprint": self.fingerprint(),
            "versions": library_versions(),
            "inputs": {
                "base_model": {"name_or_path": self.recipe.model.name_or_path, "revision": self.recipe.model.revision},
                "datasets": [spec.path for spec in (self.spec.data.datasets if self.spec.data else [])],
                "stages": {name: str(self.input_stage_dir(name)) for name in self.spec.depends_on()},
            },
            "host": {
                "python": sys.executable,
                "platform": platform.platform(),
                "pid": os.getpid(),
                "num_processes": process_state().num_processes,
                "allocator": active_allocator(),
            },
            "tracking": tracker.info(),
            **({"error": error} if error else {}),
        }

    def stage_artifact(self, name: str, folder: Path) -> tuple[Path, str, str]:
        """(folder, artifact name, stage type) of this recipe's stage `name`, for W&B lineage."""
        return folder, artifact_name(self.recipe.name, name), read_manifest(folder)["type"]

    def execute(self) -> dict[str, Any]:
        """Runs the stage with tracking; writes the output folder atomically with manifest and metrics.

        Under `accelerate launch` every process runs the stage (training is shared), but only the main
        process tracks and writes the stage folder; the others write into a scratch folder that is
        dropped, and all wait for the folder to be complete before the next stage reads it.
        """
        state = process_state()
        started, clock = now(), time.monotonic()
        if state.is_main_process:
            self.prepare_work_dir()
        state.wait_for_everyone()
        tracker = (
            Tracker(self.recipe, self.spec, self.run_dir, self.resolved_config())
            if state.is_main_process
            else Tracker.disabled()
        )
        tracker.use_stages(
            {name: self.stage_artifact(name, self.input_stage_dir(name)) for name in self.spec.depends_on()}
        )
        output_folder = atomic_directory(self.stage_dir) if state.is_main_process else tempfile.TemporaryDirectory()
        try:
            with output_folder as output:
                output = Path(output)
                metrics = self.run(output, tracker)
                write_text(output / RESOLVED_RECIPE, yaml.safe_dump(to_plain(self.recipe), sort_keys=False))
                write_json(output / METRICS, metrics)
                write_json(output / MANIFEST, self.manifest("completed", started, time.monotonic() - clock, tracker))
            tracker.summary(metrics)
            if state.is_main_process:  # the folder is whole on the main process only
                tracker.log_stage(*self.stage_artifact(self.spec.name, self.stage_dir))
            tracker.finish()
        except BaseException as error:
            message = "".join(traceback.format_exception_only(type(error), error)).strip()
            if state.is_main_process:
                write_json(
                    self.work_dir / MANIFEST,
                    self.manifest("failed", started, time.monotonic() - clock, tracker, error=message),
                )
            tracker.finish(failed=True)
            raise
        state.wait_for_everyone()
        if state.is_main_process:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return metrics
