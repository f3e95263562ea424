"""The DPO stage: its reference is the SFT adapter (not the bare base), it runs end to end, and it reloads.

The toy tests run an SFT → DPO recipe on the embedded model; the stories260k test runs a few DPO
steps in 4-bit on real ShareGPT preference pairs (llamafactory's dpo_en_demo).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trl import DPOConfig

from alignment.data.build import TRAIN, build_stage_data
from alignment.evaluation.generation import generate_answers
from alignment.models.loading import attach_adapter, load_base_model, load_tokenizer, load_trained_policy
from alignment.recipes.load import load_recipe, validate_recipe
from alignment.recipes.schema import GenerationEvalConfig
from alignment.recipes.validate import RecipeError
from alignment.report import write_report
from alignment.runner import make_stage, run_recipe
from alignment.stages.dpo import POLICY, REFERENCE, dpo_trainer
from alignment.tracking import Tracker, read_offline_run

from conftest import ALPACA_DEMO, ROOT, SHARED, STORIES, minimal_recipe, need_shared

DPO_DEMO = SHARED / "data" / "llamafactory-demo" / "dpo_en_demo.json"
FLOAT32_4BIT = {"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
QUIET = {"activation_checkpointing": False, "save_strategy": "no", "dataloader_num_workers": 0}


def toy_recipe(output_dir: Path) -> dict:
    """SFT briefly (so its adapter is far from the bare base), then a few DPO steps on the same rows."""
    data = {"datasets": [{"path": "toy", "options": {"rows": 240}, "held_out_templates": 1}], "eval_split": 16}
    return {
        "name": "toy-dpo-test",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"name_or_path": "toy", "dtype": "float32", "quantization": FLOAT32_4BIT},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "chat_template": "tokenizer",
        "tracking": {"mode": "disabled"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": data,
                "evaluation": {"num_prompts": 0},
                "args": {"max_steps": 15, "per_device_train_batch_size": 16, "learning_rate": 5e-3, "max_length": 96}
                | QUIET,
            },
            {
                "name": "dpo",
                "type": "dpo",
                "init_from": "sft",
                "data": data,
                "evaluation": {"num_prompts": 8, "max_new_tokens": 8, "batch_size": 8},
                "args": {
                    "max_steps": 4,
                    "per_device_train_batch_size": 8,
                    "learning_rate": 5e-3,
                    "max_length": 96,
                    "beta": 0.2,
                    "loss_type": ["sigmoid", "sft"],  # a weighted combination passes through like any option
                    "loss_weights": [1.0, 0.5],
                    "logging_steps": 1,
                }
                | QUIET,
            },
        ],
    }


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("toy-dpo") / "run"
    recipe = validate_recipe(toy_recipe(output_dir))
    results = run_recipe(recipe)
    return recipe, output_dir, results


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each completion (chosen rows first, then rejected), computed plainly."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(dim=1).chunk(2)


def test_reference_logps_are_the_sft_adapters_not_the_bare_base(toy_run, tmp_path):
    recipe, output_dir, _ = toy_run
    sft_dir = output_dir / "sft"
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    pairs = build_stage_data(recipe.stage("dpo").data, "preference", recipe.seed, tokenizer, 96)
    args = DPOConfig(
        output_dir=str(tmp_path / "work"),
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        max_length=96,
        report_to=[],
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
    )
    trainer = dpo_trainer(recipe, sft_dir, args, tokenizer, pairs.splits[TRAIN])
    model = trainer.model
    assert set(model.peft_config) == {POLICY, REFERENCE}
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE}." in n)
    batch = trainer.data_collator([trainer.train_dataset[index] for index in range(8)])

    # What the trainer uses as reference, both ways it computes it: the precompute path ...
    precomputed = trainer.compute_ref_log_probs(model, batch)
    # ... and the loss path (captured from the forward it runs with the reference adapter active).
    passes = []
    hook = model.register_forward_hook(lambda module, _, output: passes.append((module.active_adapter, output)))
    with torch.no_grad():
        trainer.compute_loss(model, batch)
    hook.remove()
    assert [adapter for adapter, _ in passes] == [POLICY, REFERENCE]
    seq_len = batch["completion_mask"].shape[1] - 1
    in_loss = passes[1][1].log_probs[:, -seq_len:].sum(dim=1).chunk(2)

    # The SFT stage's adapter loaded on its own on a fresh base, and that base bare.
    alone = attach_adapter(load_base_model(recipe.model), POLICY, from_path=sft_dir, trainable=False).eval()
    sft = sequence_logps(alone, batch)
    with alone.disable_adapter():
        bare = sequence_logps(alone, batch)

    for ours, theirs, base in zip(precomputed, sft, bare, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
        assert (ours - base).abs().mean() > 1.0, (ours, base)  # the bare base is a different model
    for ours, theirs in zip(in_loss, sft, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    # The policy starts exactly at the reference ...
    policy = sequence_logps(model, batch)
    for ours, theirs in zip(policy, sft, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)

    # ... and moves away under training while the reference stays frozen.
    trainer.train()
    after = trainer.compute_ref_log_probs(model, batch)
    for ours, theirs in zip(after, sft, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    moved = sequence_logps(model, batch)
    assert (moved[0] - sft[0]).abs().mean() > 0.05


def test_toy_stage_reports_reward_accuracy_margins_and_exact_match(toy_run):
    _, output_dir, results = toy_run
    metrics = results["dpo"]
    stage = output_dir / "dpo"
    assert json.loads((stage / "metrics.json").read_text()) == pytest.approx(metrics)
    for split in ("eval", "eval_heldout_templates"):
        assert 0.0 <= metrics[f"{split}/rewards/accuracies"] <= 1.0
        assert f"{split}/rewards/margins" in metrics and f"{split}/loss" in metrics
        assert f"{split}/exact_match" in metrics  # same held-out prompts and checker as the SFT stage
    samples = (stage / "samples" / "eval.jsonl").read_text().splitlines()
    assert len(samples) == 8 and json.loads(samples[0])["reference"]
    history = json.loads((stage / "log_history.json").read_text())
    assert len([entry for entry in history if "rewards/accuracies" in entry]) == 4
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["type"] == "dpo"
    assert manifest["inputs"]["stages"] == {"sft": str(output_dir / "sft")}
    assert not (stage / REFERENCE).exists()  # only the policy is saved


def test_toy_saved_policy_reloads_as_trained(toy_run):
    _, output_dir, _ = toy_run
    stage = output_dir / "dpo"
    model, tokenizer = load_trained_policy(stage)
    assert set(model.peft_config) == {POLICY}
    samples = [json.loads(line) for line in (stage / "samples" / "eval.jsonl").read_text().splitlines()]
    prompts = [[{"role": "user", "content": sample["prompt"]}] for sample in samples]
    answers = generate_answers(model, tokenizer, prompts, GenerationEvalConfig(max_new_tokens=8))
    assert answers == [sample["response"] for sample in samples]


def test_every_dpo_option_passes_through_args(tmp_path):
    raw = toy_recipe(tmp_path / "run")
    raw["stages"][1]["args"] |= {"loss_type": ["ipo", "hinge", "robust", "apo_zero"], "loss_weights": [1, 1, 1, 1]}
    raw["stages"][1]["args"] |= {"beta": 0.05, "label_smoothing": 0.1, "precompute_ref_log_probs": True}
    recipe = validate_recipe(raw)
    stage = make_stage(recipe, recipe.stage("dpo"))
    args = stage.trl_args(Tracker(recipe, recipe.stage("dpo"), tmp_path, {}))
    assert args.loss_type == ["ipo", "hinge", "robust", "apo_zero"] and args.beta == 0.05
    assert args.label_smoothing == 0.1 and args.precompute_ref_log_probs
    assert args.dataloader_pin_memory == torch.cuda.is_available()  # no pinning (nor its warning) without a GPU
    raw["stages"][1]["args"]["dataloader_pin_memory"] = True  # the recipe still decides
    recipe = validate_recipe(raw)
    assert (
        make_stage(recipe, recipe.stage("dpo"))
        .trl_args(Tracker(recipe, recipe.stage("dpo"), tmp_path, {}))
        .dataloader_pin_memory
    )


def test_init_from_is_required_and_must_name_an_earlier_stage():
    raw = minimal_recipe()
    raw["stages"].append({"name": "dpo", "type": "dpo", "data": raw["stages"][0]["data"]})
    with pytest.raises(RecipeError, match="init_from"):
        validate_recipe(raw)
    raw["stages"][1]["init_from"] = "sfft"
    with pytest.raises(RecipeError, match="not an earlier stage"):
        validate_recipe(raw)


@pytest.mark.parametrize("stage_type", ["dpo", "ppo"])
def test_the_old_policy_from_key_names_its_new_spelling(stage_type):
    """Every stage starts from an earlier one with `init_from`; DPO's and PPO's old `policy_from` is refused
    with the key to use instead, not as an unknown key."""
    raw = minimal_recipe()
    stage = {"name": "rl", "type": stage_type, "data": raw["stages"][0]["data"], "policy_from": "sft"}
    raw["stages"].append(
        stage | ({"reward_function": "alignment.evaluation.checkers:exact_match_reward"} if stage_type == "ppo" else {})
    )
    with pytest.raises(RecipeError, match=r"stages\.rl\.policy_from: 'policy_from' is now spelled 'init_from'"):
        validate_recipe(raw)


def test_shipped_dpo_recipes_validate(monkeypatch):
    monkeypatch.chdir(ROOT)
    names = [ROOT / "recipes" / "toy" / "dpo.yaml", *sorted((ROOT / "recipes" / "hh-rlhf").glob("*-dpo.yaml"))]
    assert len(names) >= 3
    for path in names:
        recipe = load_recipe(path)
        dpo = [stage for stage in recipe.stages if stage.type == "dpo"]
        assert dpo and recipe.stage(dpo[0].init_from).type == "sft", path


def test_stories260k_4bit_dpo_on_sharegpt_pairs(tmp_path):
    for path in (STORIES, ALPACA_DEMO, DPO_DEMO):
        need_shared(path)
    quiet = QUIET | {"max_length": 512, "per_device_eval_batch_size": 4}
    raw = {
        "name": "stories-dpo",
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(STORIES), "dtype": "float32", "quantization": FLOAT32_4BIT},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "chat_template": "alpaca",
        "tracking": {"project": "alignment-tests", "mode": "offline"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": {"datasets": [{"path": str(ALPACA_DEMO), "max_rows": 32}], "on_bad_rows": "drop"},
                "evaluation": {"num_prompts": 0},
                "args": {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2} | quiet,
            },
            {
                "name": "dpo",
                "type": "dpo",
                "init_from": "sft",
                "data": {
                    "datasets": [{"path": str(DPO_DEMO), "format": "sharegpt_pairs"}],
                    "eval_split": 60,
                    "on_bad_rows": "drop",  # most pairs are over 512 tokens here: dropped and counted
                },
                "evaluation": {"num_prompts": 2, "max_new_tokens": 8, "batch_size": 2},
                "args": {"max_steps": 3, "per_device_train_batch_size": 2, "learning_rate": 5e-3, "logging_steps": 1}
                | quiet,
            },
        ],
    }
    recipe = validate_recipe(raw)
    metrics = run_recipe(recipe)["dpo"]
    stage = tmp_path / "run" / "dpo"
    history = json.loads((stage / "log_history.json").read_text())
    logged = [entry["rewards/accuracies"] for entry in history if "rewards/accuracies" in entry]
    assert len(logged) == 3 and all(0.0 <= value <= 1.0 for value in logged)
    assert 0.0 <= metrics["eval/rewards/accuracies"] <= 1.0 and "eval/rewards/margins" in metrics
    assert metrics["data/train_rows"] >= 6 and metrics["data/eval_rows"] >= 1 and metrics["data/dropped_rows"] > 0

    runs = [read_offline_run(run) for run in sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))]
    (logged,) = [run for run in runs if run["run"]["job_type"] == "dpo"]
    assert logged["run"]["name"] == "stories-dpo/dpo" and logged["config"]["stage"]["init_from"] == "sft"
    assert len([row for row in logged["history"] if "train/rewards/accuracies" in row]) == 3
    assert logged["summary"]["eval/rewards/accuracies"] == pytest.approx(metrics["eval/rewards/accuracies"])

    model, _ = load_trained_policy(stage)
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    saved = load_file(stage / "adapter_model.safetensors")
    loaded = {name.replace(f".{POLICY}.", "."): p for name, p in model.named_parameters() if f".{POLICY}." in name}
    assert sorted(saved) == sorted(loaded) and all(torch.equal(saved[key], loaded[key]) for key in saved)
    before = load_file(tmp_path / "run" / "sft" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[key], before[key]) for key in saved)  # DPO moved the policy


@pytest.mark.slow
def test_shipped_toy_dpo_recipe_gains_ten_points_over_early_sft(tmp_path):
    """recipes/toy/dpo.yaml as users run it: DPO from the early-stopped SFT stage, same held-out prompts.
    Measured in the toy's own chat template: 0.375 → 0.611 (+0.236), DPO stage 86 s on 2 AVX2 cores (issue 5
    asks +10 points within 5 minutes)."""
    recipe = load_recipe(ROOT / "recipes" / "toy" / "dpo.yaml", [f"output_dir={tmp_path}", "tracking.mode=disabled"])
    results = run_recipe(recipe)
    gain = results["dpo"]["eval/exact_match"] - results["sft"]["eval/exact_match"]
    manifest = json.loads((tmp_path / "dpo" / "manifest.json").read_text())
    print(f"toy dpo: exact match gain {gain:.3f}, stage {manifest['duration_s']} s")
    assert gain >= 0.10  # the stage's wall time is printed and quoted in docs/benchmarks.md, not asserted

    _, page, numbers = write_report(tmp_path)  # the run's report: win rates against the SFT policy
    gold = numbers["win_rates"]["dpo"]["eval"]["gold checker"]
    assert gold.count == 280 and (gold.wins - gold.losses) / gold.count == pytest.approx(gain)
    worse = {  # every group DPO answers worse than the SFT policy is flagged
        key.split("/")[-1]
        for key, value in results["dpo"].items()
        if key.startswith("eval/exact_match/") and value < results["sft"][key]
    }
    assert {warning.split(" eval ")[1].split()[0] for warning in numbers["warnings"] if " eval " in warning} == worse
    assert "data:image/png;base64," in page.read_text()
