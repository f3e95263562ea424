"""The demo recipe, run as a user runs it: the embedded tiny model learns the synthetic tasks on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from alignment.allocator import allocator_library

from conftest import ROOT


@pytest.mark.slow
def test_demo_recipe_learns_the_tasks_on_held_out_instances(tmp_path):
    """Issue 2 asks for 0.80 exact match on held-out instances (seen templates); measured 0.829 (2 epochs in the toy chat template; issue 16 asks for at most 3 minutes)."""
    output_dir = tmp_path / "toy-sft"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alignment",
            "run",
            "recipes/toy/sft.yaml",
            "--set",
            f"output_dir={output_dir}",
            "--set",
            "tracking.mode=offline",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((output_dir / "sft" / "metrics.json").read_text())
    print({key: round(value, 3) for key, value in metrics.items() if "exact_match" in key})
    assert metrics["eval/exact_match"] >= 0.80
    assert "eval_heldout_templates/exact_match" in metrics  # reported, not required to be high
    assert metrics["data/eval_rows"] >= 280
    manifest = json.loads((output_dir / "sft" / "manifest.json").read_text())
    caching = allocator_library() is not None  # the command restarts with tcmalloc/mimalloc/jemalloc if installed
    assert (manifest["host"]["allocator"] != "system") == caching, manifest["host"]
    samples = (output_dir / "sft" / "samples" / "eval.jsonl").read_text().splitlines()
    assert len(samples) == 280
    report = (output_dir / "report.md").read_text()  # `alignment run` ends with the run's report
    assert f"| (all) | {metrics['eval/exact_match']:.3f} |" in report
    assert (output_dir / "report.html").read_text().count("data:image/png;base64,") == 1  # the SFT curves
    answer = subprocess.run(
        [sys.executable, "-m", "alignment", "generate", str(output_dir / "sft"), "--prompt", "Reverse the string abc."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert answer.stdout.strip() == "cba"  # a short reversal the trained model gets right
