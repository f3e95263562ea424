"""Weights & Biases tracking: one run per stage, grouped by recipe, with the resolved recipe as config.

Mode `auto` goes online when an API key is configured and offline otherwise (said once on the
console); offline runs are written under the run folder and can be uploaded later with `wandb sync`.
The HF Trainer's W&B callback logs into the run opened here, so TRL's metrics and ours share it.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
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

    @classmethod
    def disabled(cls) -> Tracker:
        """A tracker that logs nothing (tests, and code run outside a stage)."""
        tracker = cls.__new__(cls)
        tracker.mode, tracker.run = "disabled", None
        return tracker

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

    def image(self, key: str, path: Path, caption: str = "") -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path), caption=caption)})

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

    def log_stage(self, stage_dir: Path, name: str, kind: str) -> None:
        """The stage's output folder as an artifact of its run, for W&B's lineage graph."""
        if self.run is not None:
            self.run.log_artifact(stage_artifact(stage_dir, name, kind))

    def use_stages(self, inputs: dict[str, tuple[Path, str, str]]) -> None:
        """Declares the earlier stages' outputs this stage reads ({stage: (folder, artifact name, type)}):
        online as used artifacts (the lineage edges); in the config always, with each artifact's digest,
        because wandb refuses `use_artifact` in offline mode."""
        if self.run is None or not inputs:
            return
        used = {}
        for stage, (folder, name, kind) in inputs.items():
            artifact = stage_artifact(folder, name, kind)
            used[stage] = {"artifact": name, "type": kind, "digest": artifact.manifest.digest()}
            if self.mode == "online":
                self.run.use_artifact(artifact)
        self.run.config.update({"inputs": used}, allow_val_change=True)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def artifact_name(recipe_name: str, stage_name: str) -> str:
    """A stage's artifact name (W&B allows letters, digits, `-`, `_` and `.`)."""
    return re.sub(r"[^\w.-]", "-", f"{recipe_name}-{stage_name}")


def stage_artifact(stage_dir: Path, name: str, kind: str) -> Any:
    """A stage folder as a W&B artifact; the same folder always gives the same digest."""
    import wandb

    artifact = wandb.Artifact(name, type=kind)
    artifact.add_dir(str(stage_dir))
    return artifact


def _records(path: Path) -> list[bytes]:
    """Payloads of a `.wandb` file: a 7-byte header, then LevelDB-style log records in 32 KiB blocks."""
    import struct

    data, block, header = Path(path).read_bytes(), 32768, 7
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file")
    records, pending, position = [], b"", header
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:  # zero padding up to the next block
            position += left
            continue
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # the whole record
            records.append(payload)
        elif kind == 2:  # first part
            pending = payload
        elif kind == 3:  # middle part
            pending += payload
        elif kind == 4:  # last part
            records.append(pending + payload)
    return records


def _complete_run_records(path: Path, wait_seconds: float) -> list[Any]:
    """The run file's records once wandb has written its `exit` record, waiting up to `wait_seconds`.

    `run.finish()` can return before wandb's service has flushed the offline file (seen under load in
    CI: the file held only its header when read, everything a moment later). A run that crashed never
    gets an exit record; after the wait, what is there is read.
    """
    import time

    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_seconds
    while True:
        records = []
        try:
            for payload in _records(path):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
        except DecodeError:  # a record half written
            if time.monotonic() > deadline:
                raise
            records = []
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def read_offline_run(run_folder: str | Path, wait_seconds: float = 30.0) -> dict[str, Any]:
    """What an offline W&B run recorded: run info, config, history rows, the final summary and the artifacts.

    wandb keeps offline runs in a binary `run-<id>.wandb` log; this reads it back (for tests, and for
    comparing offline experiments without a server), using wandb's own protobuf records. By hand because
    wandb 0.31 has no Python reader of that log any more (its data store moved into the Go service).
    """
    import json

    folder = Path(run_folder)
    (path,) = folder.glob("run-*.wandb")
    result: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "artifacts": []}

    def put(target: dict, item: Any) -> None:
        """Sets a value under its key, or under its nested key path (how a logged table's fields arrive)."""
        path = [item.key] if item.key else list(item.nested_key)
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = json.loads(item.value_json)

    for record in _complete_run_records(path, wait_seconds):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            result["run"] = {
                "name": run.display_name,
                "group": run.run_group,
                "job_type": run.job_type,
                "project": run.project,
                "tags": list(run.tags),
            }
            updates = run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                put(row, item)
            result["history"].append(row)
            continue
        elif kind == "artifact":
            artifact = record.artifact
            result["artifacts"].append({"name": artifact.name, "type": artifact.type, "digest": artifact.digest})
            continue
        elif kind == "summary":
            for item in record.summary.update:
                put(result["summary"], item)
            continue
        else:
            continue
        for item in updates:
            put(result["config"], item)
    return result
