"""The embedded default base model: a tiny pre-trained Llama and its byte-level tokenizer, shipped with
the package (`alignment/toy/weights`, 3.5 MB, their sha256 in the folder's `manifest.json`), so
`name_or_path: toy` loads at once through the ordinary `from_pretrained` path.

`python scripts/build_toy_base.py` builds them (the recipe, the seed, and why the base is pre-trained
the way it is are there); the package only loads them.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from alignment.io import read_json

TOY_MODEL_NAME = "toy"
SHIPPED_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"  # how the weights were built, and their sha256
REBUILD = "python scripts/build_toy_base.py"


def weights_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


@functools.cache
def shipped_toy_base() -> Path:
    """The folder of weights shipped with the package, checked against its recorded hash."""
    if not (SHIPPED_DIR / WEIGHTS_FILE).exists():
        raise FileNotFoundError(
            f"the toy base's weights are missing from {SHIPPED_DIR}; restore them with "
            f"`git checkout -- alignment/toy/weights` or rebuild them with `{REBUILD}`"
        )
    recorded = read_json(SHIPPED_DIR / MANIFEST_FILE)["sha256"]
    if weights_sha256(SHIPPED_DIR) != recorded:
        raise RuntimeError(
            f"the toy base shipped in {SHIPPED_DIR} does not match the sha256 in its {MANIFEST_FILE} "
            "(a git LFS pointer or a partial checkout?); restore it with `git checkout -- alignment/toy/weights` "
            f"or rebuild it with `{REBUILD}`"
        )
    return SHIPPED_DIR
