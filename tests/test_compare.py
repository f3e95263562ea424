"""`alignment compare`: runs read back from their folders, side by side, with the recipe keys that differ."""

from __future__ import annotations

import json

import pytest

from alignment import cli
from alignment.recipes.load import load_recipe
from alignment.runner import run_recipe

from conftest import ROOT


def test_compare_prints_two_demo_runs_and_their_differing_learning_rate(tmp_path, capsys):
    runs = []
    for learning_rate in ("1.0e-3", "3.0e-3"):
        run_dir = tmp_path / f"lr-{learning_rate}"
        overrides = [
            f"output_dir={run_dir}",
            "tracking.mode=disabled",
            f"stages.sft.args.learning_rate={learning_rate}",
            "stages.sft.args.max_steps=2",  # the demo recipe, cut short: the comparison is what is tested
            "stages.sft.data.datasets.0.options.rows=300",
            "stages.sft.evaluation.num_prompts=8",
        ]
        run_recipe(load_recipe(ROOT / "recipes" / "toy" / "sft.yaml", overrides))
        runs.append(run_dir)
    capsys.readouterr()  # the runs' own output
    code = cli.main(["compare", *map(str, runs), "--markdown", str(tmp_path / "comparison.md")])
    printed = capsys.readouterr().out
    assert code == 0
    metrics = [json.loads((run / "sft" / "metrics.json").read_text()) for run in runs]
    for key in ("eval/exact_match", "eval/loss"):
        row = next(line for line in printed.splitlines() if line.startswith(f"| sft | {key} |"))
        assert row == f"| sft | {key} | " + " | ".join(f"{m[key]:.4g}" for m in metrics) + " |"
    assert "| stages.sft.args.learning_rate | 0.001 | 0.003 |" in printed
    assert "output_dir" not in printed.split("Recipe keys that differ")[1]
    assert (tmp_path / "comparison.md").read_text() == printed


def test_compare_refuses_a_folder_without_completed_stages(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path)]) == 2
    assert "holds no completed stage" in capsys.readouterr().err


def test_alignment_run_writes_the_report_unless_told_not_to(tmp_path, capsys):
    """`alignment run` ends with `report.md` and `report.html` in the run folder; `--no-report` skips them."""
    for name, flags in (("with", []), ("without", ["--no-report"])):
        overrides = [
            f"output_dir={tmp_path / name}", "tracking.mode=disabled", "stages.sft.args.max_steps=2",
            "stages.sft.data.datasets.0.options.rows=300", "stages.sft.evaluation.num_prompts=8",
        ]  # fmt: skip
        arguments = ["run", str(ROOT / "recipes" / "toy" / "sft.yaml"), *flags]
        assert cli.main([*arguments, *(part for item in overrides for part in ("--set", item))]) == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path / 'with' / 'report.md'} and {tmp_path / 'with' / 'report.html'}" in printed
    metrics = json.loads((tmp_path / "with" / "sft" / "metrics.json").read_text())
    report = (tmp_path / "with" / "report.md").read_text()
    assert f"| (all) | {metrics['eval/exact_match']:.3f} |" in report and "](report_files/sft.png)" in report
    assert not (tmp_path / "without" / "report.md").exists() and not (tmp_path / "without" / "report.html").exists()


def test_a_model_card_names_hub_ids_as_base_and_data_never_local_folders_or_plugins(tmp_path):
    from alignment.model_card import is_hub_id

    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct", known=False)
    assert is_hub_id("Anthropic/hh-rlhf", known=False)
    assert not is_hub_id("toy", known=True)  # a plugin's name
    (tmp_path / "models" / "mine").mkdir(parents=True)
    assert not is_hub_id(str(tmp_path / "models" / "mine"), known=False)
    assert not is_hub_id("./models/mine", known=False) and not is_hub_id("~/models/mine", known=False)
    assert not is_hub_id("alpaca/train.jsonl", known=False)  # a relative file path, even if absent here


def test_the_report_tells_a_fall_beyond_noise_from_one_within_it():
    """Group `a` falls from 40/40 to 0/40 correct (⚠), group `b` from 2/40 to 1/40 (↓: paired change −0.025 ±
    1.96 × sd/√40, which includes zero)."""
    from alignment.report import group_table, paired_change

    def stage(kind: str, start: str | None, correct: dict[str, int]) -> dict:
        metrics = {f"eval/exact_match/{group}": count / 40 for group, count in correct.items()}
        stages = [{"name": "sft", "type": "sft"}, {"name": "dpo", "type": "dpo", "init_from": start}]
        return {"manifest": {"type": kind}, "metrics": metrics, "recipe": {"stages": stages}}

    def answers(correct: dict[str, int]) -> list[dict]:
        return [
            {"prompt": f"{group}{i}", "group": group, "correct": i < count}
            for group, count in correct.items()
            for i in range(40)
        ]

    before, after = {"a": 40, "b": 2}, {"a": 0, "b": 1}
    stages = {"sft": stage("sft", None, before), "dpo": stage("dpo", "sft", after)}
    pairs = list(zip(answers(after), answers(before), strict=True))
    mean, half_width, count = paired_change(pairs, "b")
    assert (mean, count) == (-0.025, 40) and half_width == pytest.approx(1.96 * (0.025 * 0.975 * 40 / 39 / 40) ** 0.5)
    header, rows, warnings = group_table(stages, "eval", "exact_match", {"dpo": {"eval": pairs}})
    assert header == ["group", "sft (sft)", "dpo (dpo)"]
    assert rows[1:] == [["a", "1.000", "0.000 ⚠"], ["b", "0.050", "0.025 ↓"]]  # rows[0]: (all), not given here
    assert warnings[0] == (
        "⚠",
        "dpo: eval a fell from 1.000 (sft) to 0.000; paired over 40 prompts -1.000 ± 0.000 (95%), beyond noise",
    )
    assert warnings[1][0] == "↓" and warnings[1][1].endswith("within noise")


def test_a_reward_model_below_chance_is_flagged_beyond_noise_by_its_pair_count():
    """0.125 over 40 pairs is below chance beyond its 95% interval (⚠); 0.4 over 10 is within it (↓)."""
    from alignment.report import group_table

    metrics = {"eval/pairwise_accuracy/c": 0.125, "eval/num_pairs/c": 40, "eval/pairwise_accuracy/d": 0.4}
    metrics |= {"eval/num_pairs/d": 10, "eval/pairwise_accuracy/e": 0.9, "eval/num_pairs/e": 10}
    stages = {"reward": {"manifest": {"type": "reward"}, "metrics": metrics, "recipe": {"stages": []}}}
    _, rows, warnings = group_table(stages, "eval", "pairwise_accuracy", {})
    assert rows[1:] == [["c", "0.125 ⚠"], ["d", "0.400 ↓"], ["e", "0.900"]]
    assert warnings[0] == (
        "⚠",
        "reward: ranks eval c pairs 0.125, below chance; 0.125 ± 0.102 (95%) over 40 pairs, beyond noise",
    )
    assert warnings[1] == (
        "↓",
        "reward: ranks eval d pairs 0.400, below chance; 0.400 ± 0.304 (95%) over 10 pairs, within noise",
    )
