"""Shared fixtures. Tests that read the real files under ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ALIGNMENT_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260k"
ALPACA = SHARED / "data" / "alpaca" / "alpaca_5000.json"
ALPACA_DEMO = SHARED / "data" / "llamafactory-demo" / "alpaca_en_demo.json"
ACCELERATE_CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))  # launch configs, not recipes
SHIPPED_RECIPES = sorted(path for path in (ROOT / "recipes").rglob("*.yaml") if path not in ACCELERATE_CONFIGS)
sys.path.insert(0, str(ROOT / "scripts"))  # the toy base's builder (build_toy_base.py) is a script, not the package

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


SMOLLM2_SCRIPT = SHARED / "models" / "smollm2-135m.sh"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, made offline once by the shared script (about a minute)."""
    need_shared(SMOLLM2_SCRIPT)
    lock = Path.home() / ".cache" / "alignment-test-models" / "smollm2.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock):  # pytest workers side by side: one makes the folder, the others find it made
        made = subprocess.run(["bash", str(SMOLLM2_SCRIPT)], capture_output=True, text=True, timeout=1200)
    if made.returncode != 0:
        reason = (made.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"SmolLM2-135M-Instruct could not be made by {SMOLLM2_SCRIPT}: {reason}")
    return Path(made.stdout.strip().splitlines()[-1])


def need_shared(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"needs the shared file {path} (../shared is absent on this machine)")


def minimal_recipe(**overrides) -> dict:
    """A small valid recipe as plain data; tests change one thing at a time."""
    recipe = {
        "name": "t",
        "output_dir": "runs/t",
        "model": {"name_or_path": "toy"},
        "stages": [
            {"name": "sft", "type": "sft", "data": {"datasets": [{"path": "toy", "options": {"rows": 50}}]}, "args": {}}
        ],
    }
    recipe.update(overrides)
    return recipe
