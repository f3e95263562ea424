"""Rebuilds the toy base's shipped weights from `alignment.toy.base`'s recipe and seed.

The package ships the result in `alignment/toy/weights` (with its sha256 in `manifest.json`), so no
toy run builds it; run this after changing the toy base's recipe (and bump `TOY_VERSION`). About 7
minutes on an idle 2-core CPU, with a progress bar.

    python scripts/build_toy_base.py [--out alignment/toy/weights] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from alignment.io import read_json
from alignment.toy.base import MANIFEST_FILE, SHIPPED_DIR, build_toy_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_DIR, help="folder to (re)write atomically")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = build_toy_base(args.out, seed=args.seed)
    manifest = read_json(folder / MANIFEST_FILE)
    print(
        f"toy base {manifest['version']} in {folder}: final loss {manifest['final_loss']}, sha256 {manifest['sha256']}"
    )


if __name__ == "__main__":
    main()
