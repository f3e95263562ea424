"""The PPO stage on the embedded tiny model: the four roles on one 4-bit base, step-0 sanity,
role isolation against the SFT and reward stages loaded alone, and resume after SIGKILL."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from hub_server import HubProtocolServer
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from alignment import cli
from alignment.allocator import active_allocator, release_freed_memory
from alignment.data.build import TRAIN, build_stage_data
from alignment.models.chat_templates import BUILTIN_CHAT_TEMPLATES
from alignment.models.heads import active_adapter
from alignment.models.loading import attach_adapter, keep_cpu_4bit_exact, load_base_model, load_tokenizer
from alignment.models.precision import compute_dtype as model_compute_dtype
from alignment.models.sampling import Responses, turn_suffix_ids
from alignment.models.scoring import load_reward_role, score_conversations
from alignment.names import POLICY, REFERENCE, SCORE_HEAD_FILE
from alignment.ppo import core
from alignment.ppo.trainer import PPOTrainer
from alignment.recipes.load import load_recipe, validate_recipe
from alignment.recipes.validate import RecipeError
from alignment.report import CURVES, curves_png, logged_panels, write_report
from alignment.runner import make_stage, run_recipe
from alignment.tracking import Tracker, read_offline_run

from conftest import ROOT, STORIES, need_shared

TOY_DATA = {"datasets": [{"path": "toy", "options": {"rows": 600}, "held_out_templates": 1}], "eval_split": 0.1}
COMMON_ARGS = {
    "per_device_train_batch_size": 16,
    "learning_rate": 3e-3,
    "activation_checkpointing": False,
    "max_length": 96,
    "save_strategy": "no",
    "logging_steps": 5,
}


def pipeline(
    output_dir: Path, ppo_args: dict | None = None, score_head: dict | None = None, **ppo_keys: object
) -> dict:
    return {
        "name": "ppo-test",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {
            "name_or_path": "toy",
            "dtype": "float32",
            "quantization": {"mode": "4bit", "compute_dtype": "float32"},
        },
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "chat_template": "tokenizer",
        "tracking": {"mode": "disabled"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": TOY_DATA,
                "evaluation": {"num_prompts": 0},
                "args": {**COMMON_ARGS, "max_steps": 10},
            },
            {
                "name": "reward",
                "type": "reward",
                "init_from": "sft",
                "score_head": score_head or {},
                "data": TOY_DATA,
                "args": {**COMMON_ARGS, "max_steps": 10},
            },
            {
                "name": "ppo",
                "type": "ppo",
                "init_from": "sft",
                "reward_from": "reward",
                "data": TOY_DATA,
                "evaluation": {"num_prompts": 16, "max_new_tokens": 8},
                "args": {
                    "num_iterations": 2,
                    "rollout_batch_size": 8,
                    "num_mini_batches": 2,
                    "num_ppo_epochs": 2,
                    "learning_rate": 1e-3,
                    "max_new_tokens": 8,
                    "save_steps": 1,
                    **(ppo_args or {}),
                },
                **ppo_keys,
            },
        ],
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """SFT → reward → PPO (2 iterations), run once for the tests of this module."""
    output_dir = tmp_path_factory.mktemp("ppo") / "run"
    recipe = validate_recipe(pipeline(output_dir))
    run_recipe(recipe)
    return recipe, output_dir


def reward_model_pipeline(prepared: Path, run_dir: Path, reward_model: dict, ppo_args: dict) -> dict:
    """The module's SFT stage copied into `run_dir` and a PPO stage rewarded by a separate `reward_model`
    (no reward stage; the value role starts from the policy)."""
    shutil.copytree(prepared / "sft", run_dir / "sft")
    raw = pipeline(run_dir, ppo_args, value_from="policy")
    raw["stages"] = [stage for stage in raw["stages"] if stage["name"] != "reward"]
    del raw["stages"][1]["reward_from"]
    raw["stages"][1]["reward_model"] = {"dtype": "float32"} | reward_model
    return raw


def roles_of(recipe):
    """The PPO stage of `recipe`, its tokenizer and prompt data, and its four roles on a fresh base."""
    stage = make_stage(recipe, recipe.stage("ppo"))
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    data = build_stage_data(recipe.stage("ppo").data, "prompt", 0, tokenizer)
    return stage, tokenizer, data, stage.build_roles(tokenizer, data)


def fixed_batch(tokenizer, texts=("Reverse the string abc.", "What is 2+3?")) -> dict[str, torch.Tensor]:
    conversations = [[{"role": "user", "content": text}, {"role": "assistant", "content": "cba"}] for text in texts]
    tokenizer.padding_side = "right"
    encoded = tokenizer.apply_chat_template(
        conversations, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def sequence_logprobs(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(**batch, position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)).logits
    return core.response_logprobs(logits, batch["input_ids"], 1) * batch["attention_mask"][:, 1:]


def test_ppo_writes_policy_adapter_metrics_and_manifest(trained):
    _, output_dir = trained
    stage = output_dir / "ppo"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "completed" and set(manifest["inputs"]["stages"]) == {"sft", "reward"}
    assert (stage / "adapter_model.safetensors").exists() and (stage / "adapters" / "value" / SCORE_HEAD_FILE).exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    for key in (
        "objective/kl",
        "objective/entropy",
        "objective/scores",
        "objective/rlhf_reward",
        "objective/non_score_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/explained_variance",
        "val/num_eos_tokens",
        "kl_coef",
        "lr",
        "episode",
        "time/rollout_s",
        "tokens_per_second/rollout",
        "objective/gold_accuracy",
    ):
        assert f"train/{key}" in metrics, key
    assert metrics["train/episode"] == 16
    assert "eval/exact_match" in metrics and "eval_initial/exact_match" in metrics and "eval/reward_score" in metrics
    history = json.loads((stage / "log_history.json").read_text())
    assert [row["iteration"] for row in history] == [1, 2]
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0


def test_the_run_report_judges_ppo_against_its_start_as_the_metrics_and_samples_say(trained, tmp_path):
    """`alignment report`: the gold checker's win rate of PPO over its starting policy is the exact-match
    gain (wins − losses = n × gain), the reward model's counts are those of the scores PPO wrote for both
    policies' answers, the files hold the tables and plots, and the report's W&B run has them too."""
    recipe, output_dir = trained
    run_dir = tmp_path / "run"
    shutil.copytree(output_dir, run_dir)
    offline = copy.deepcopy(recipe)
    offline.tracking.mode, offline.tracking.project = "offline", "alignment-tests"
    markdown, page, numbers = write_report(run_dir, recipe=offline)

    metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    gold = numbers["win_rates"]["ppo"]["eval"]["gold checker"]
    assert gold.count == 16
    gain = metrics["eval/exact_match"] - metrics["eval_initial/exact_match"]
    assert (gold.wins - gold.losses) / gold.count == pytest.approx(gain)
    after, before = (
        [json.loads(line) for line in (run_dir / "ppo" / "samples" / f"{split}.jsonl").read_text().splitlines()]
        for split in ("eval", "eval_initial")
    )
    outcomes = [(a["reward"] > b["reward"]) - (a["reward"] < b["reward"]) for a, b in zip(after, before, strict=True)]
    reward = numbers["win_rates"]["ppo"]["eval"]["reward model"]
    assert (reward.wins, reward.ties, reward.losses) == (outcomes.count(1), outcomes.count(0), outcomes.count(-1))
    reward_metrics = json.loads((run_dir / "reward" / "metrics.json").read_text())
    group_counts = [value for key, value in reward_metrics.items() if key.startswith("eval/num_pairs/")]
    assert len(group_counts) > 1 and sum(group_counts) == reward_metrics["eval/num_pairs"]  # each group's pairs
    below_chance = {  # the report flags each group (and the whole split) the reward model ranks below chance
        "(all)" if key == "eval/pairwise_accuracy" else key.split("/")[-1]
        for key, value in reward_metrics.items()
        if (key == "eval/pairwise_accuracy" or key.startswith("eval/pairwise_accuracy/")) and value < 0.5
    }
    flagged = {warning.split(" eval ")[1].split()[0] for warning in numbers["warnings"] if " eval " in warning}
    assert flagged == below_chance

    text = markdown.read_text()
    assert f"| eval | gold checker | 16 | {gold.wins} | {gold.ties} | {gold.losses} | {gold.rate:.3f} ± " in text
    assert "](report_files/ppo.png)" in text
    assert (run_dir / "report_files" / "ppo.png").read_bytes()[:4] == b"\x89PNG"
    assert page.read_text().count("data:image/png;base64,") == 3  # the curves of sft, reward and ppo, inline

    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    logged = read_offline_run(wandb_run)
    assert logged["run"]["job_type"] == "report" and logged["run"]["group"] == recipe.name
    keys = {key: value for row in logged["history"] for key, value in row.items()}
    assert keys["report/win_rates_ppo_against_sft"]["_type"] == "table-file"
    assert keys["report/training_curves_ppo"]["_type"] == "image-file"


def test_roles_share_one_base_and_frozen_roles_do_not_move(trained):
    recipe, output_dir = trained
    stage, tokenizer, data, (model, value_head, reward, _) = roles_of(recipe)
    assert set(model.peft_config) == {"policy", "reference", "reward", "value"}
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    single = load_base_model(recipe.model)
    assert len(four_bit) == len([m for m in single.modules() if isinstance(m, bnb.nn.Linear4bit)]) == 28
    assert len({m.weight.data_ptr() for m in four_bit}) == 28  # one copy of the quantized weights

    batch = fixed_batch(tokenizer)
    config = stage.args_class(**{**recipe.stage("ppo").args, "num_iterations": 2})
    trainer = PPOTrainer(
        config,
        model,
        value_head,
        reward,
        tokenizer,
        data.splits[TRAIN],
        output_dir / "isolation-work",
        Tracker.disabled(),
        seed=0,
    )
    with torch.no_grad():
        from alignment.models.heads import active_adapter

        with active_adapter(model, REFERENCE):
            reference_before = sequence_logprobs(model, batch)
        with active_adapter(model, POLICY):
            policy_before = sequence_logprobs(model, batch)
    answers = Responses.from_texts(tokenizer, [[{"role": "user", "content": "What is 2+3?"}]] * 2, ["5", "6"])
    rewards_before = reward(answers)
    assert torch.equal(reference_before, policy_before)  # the policy starts as the SFT adapter
    trainer.train()

    with active_adapter(model, REFERENCE):
        reference_after = sequence_logprobs(model, batch)
    with active_adapter(model, POLICY):
        policy_after = sequence_logprobs(model, batch)
    rewards_after = reward(answers)
    assert torch.equal(reference_after, reference_before) and torch.equal(rewards_after, rewards_before)
    assert not torch.allclose(policy_after, policy_before)  # the policy did move

    # The reference equals the SFT stage loaded on its own, and the reward the reward stage.
    sft_alone = attach_adapter(load_base_model(recipe.model), "default", from_path=output_dir / "sft", trainable=False)
    torch.testing.assert_close(sequence_logprobs(sft_alone, batch), reference_after, atol=1e-5, rtol=1e-5)
    reward_model, reward_head = load_reward_role(load_base_model(recipe.model), output_dir / "reward")
    alone = score_conversations(
        reward_model,
        reward_head,
        tokenizer,
        [[{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": a}] for a in ("5", "6")],
        adapter="reward",
    )
    torch.testing.assert_close(torch.tensor(alone), rewards_after.cpu(), atol=1e-4, rtol=1e-4)


def test_step_zero_sanity_ratio_one_kl_zero(trained):
    recipe, output_dir = trained
    stage, tokenizer, data, (model, value_head, reward, stats) = roles_of(recipe)
    config = stage.args_class(**recipe.stage("ppo").args)
    trainer = PPOTrainer(
        config,
        model,
        value_head,
        reward,
        tokenizer,
        data.splits[TRAIN],
        output_dir / "sanity-work",
        Tracker.disabled(),
        reward_stats=stats,
        seed=0,
    )
    rollout = trainer.rollout(trainer._prompt_batch(0))
    kl = core.kl_penalty(rollout.logprobs, rollout.reference_logprobs, "k1")
    assert torch.equal(kl * rollout.response_mask, torch.zeros_like(kl))
    half = slice(0, 4)  # the first mini-batch, recomputed as the update does
    ids, mask = rollout.input_ids[half], rollout.attention_mask[half]
    new_logprobs = trainer._logprobs(POLICY, ids, mask, rollout.query_ids.shape[1], config.temperature)
    advantages = torch.randn_like(new_logprobs)
    _, approxkl, clipfrac = core.policy_loss(
        new_logprobs, rollout.logprobs[half], advantages, rollout.response_mask[half], config.cliprange
    )
    ratio = torch.exp(new_logprobs - rollout.logprobs[half])[rollout.response_mask[half].bool()]
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
    assert approxkl.item() < 1e-10 and clipfrac.item() == 0.0


def test_an_attention_reward_head_becomes_the_value_head_and_reads_left_padded_rollouts(tmp_path):
    """The value role starts as the reward adapter and head; with an attention head its per-token values
    must not see the left padding of a rollout batch, nor the tokens after them."""
    output_dir = tmp_path / "run"
    recipe = validate_recipe(pipeline(output_dir, score_head={"type": "attention", "heads": 4, "head_dim": 8}))
    metrics = run_recipe(recipe)["ppo"]
    assert all(torch.isfinite(torch.tensor(metrics[f"train/{key}"])) for key in ("loss/value_avg", "objective/scores"))
    saved_value_head = load_file(output_dir / "ppo" / "adapters" / "value" / SCORE_HEAD_FILE)  # no pickle
    assert {name: tuple(tensor.shape) for name, tensor in saved_value_head.items()} == {
        "query_weight": (32, 128),
        "key_weight": (32, 128),
        "value_weight": (4, 128),
        "bias": (1,),  # the reward head rescaled to the normalised rewards' units carries their offset
    }

    stage, tokenizer, data, (model, value_head, reward, stats) = roles_of(recipe)
    assert type(value_head).__name__ == "AttentionScalarHead" and value_head.value_weight.requires_grad
    trainer = PPOTrainer(
        stage.args_class(**recipe.stage("ppo").args), model, value_head, reward, tokenizer, data.splits[TRAIN],
        output_dir / "values-work", Tracker.disabled(), reward_stats=stats, seed=0,
    )  # fmt: skip
    with torch.no_grad():  # an untrained query attends uniformly: make it attend by content, as a trained one does
        value_head.query_weight.normal_(std=0.5)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        for text in ("Reverse the string abcdef.", "What is 2+3?")
    ]
    response = tokenizer("cba", add_special_tokens=False)["input_ids"]
    width = max(len(prompt) for prompt in prompts)
    device = trainer.device
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p + response for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(response)) for p in prompts], device=device)
    with torch.no_grad():
        batched = trainer._values(ids, mask, width)
        for row, prompt in enumerate(prompts):
            alone_ids = torch.tensor([prompt + response], device=device)
            alone = trainer._values(alone_ids, torch.ones_like(alone_ids), len(prompt))
            torch.testing.assert_close(batched[row], alone[0], atol=1e-4, rtol=0)
        # The value at the first response token does not change with the tokens after it.
        changed = ids.clone()
        changed[:, width + 1 :] = torch.tensor(tokenizer("zz", add_special_tokens=False)["input_ids"], device=device)
        torch.testing.assert_close(trainer._values(changed, mask, width)[:, :2], batched[:, :2], atol=1e-5, rtol=0)


def test_reward_sources_are_validated_by_name(tmp_path):
    raw = pipeline(tmp_path / "run")
    ppo = raw["stages"][2]
    del ppo["reward_from"]
    with pytest.raises(RecipeError, match="give a reward: reward_from"):
        validate_recipe(raw)
    ppo["reward_model"] = {"name_or_path": "some/reward-model"}
    with pytest.raises(RecipeError, match="value_from: reward needs reward_from"):
        validate_recipe(raw)
    ppo["value_from"] = "policy"
    spec = validate_recipe(raw).stage("ppo")
    assert spec.reward_model.name_or_path == "some/reward-model" and spec.reward_model.chat_template == "tokenizer"
    ppo |= {"reward_from": "reward", "reward_function": [CHECKER, "alignment.evaluation.checkers:gsm8k_reward"]}
    ppo["reward_weights"] = {"exact_match_reward": 0.5, "gsm8k": 2.0}
    with pytest.raises(RecipeError, match=r"reward_weights\.gsm8k.*no reward source is called 'gsm8k'.*gsm8k_reward"):
        validate_recipe(raw)
    ppo["reward_weights"] = {"exact_match_reward": 0.5, "gsm8k_reward": 2.0}
    spec = validate_recipe(raw).stage("ppo")
    assert spec.reward_source_names() == ["reward", "reward_model", "exact_match_reward", "gsm8k_reward"]
    ppo["reward_function"] = [CHECKER, CHECKER]
    with pytest.raises(RecipeError, match="two reward sources have one name"):
        validate_recipe(raw)


def test_a_weighted_sum_of_a_reward_model_and_a_checker_logs_each_source(trained, tmp_path):
    """reward_from + reward_function with weights: the reward is the normalised reward-model score plus
    half the checker's, and each source is logged on its own, in training and in the evaluation."""
    _, prepared = trained
    run_dir = tmp_path / "run"
    for stage in ("sft", "reward"):
        shutil.copytree(prepared / stage, run_dir / stage)
    raw = pipeline(run_dir, {"num_iterations": 1}, reward_function=CHECKER, reward_weights={"exact_match_reward": 0.5})
    metrics = run_recipe(validate_recipe(raw), only=["ppo"])["ppo"]
    for split in ("eval", "eval_initial"):
        reward_model, checker = metrics[f"{split}/reward/reward"], metrics[f"{split}/reward/exact_match_reward"]
        assert checker == pytest.approx(metrics[f"{split}/exact_match"])  # the checker's own mean is gold accuracy
        assert metrics[f"{split}/reward_score"] == pytest.approx(reward_model + 0.5 * checker, abs=1e-5)
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert {"objective/reward/reward", "objective/reward/exact_match_reward"} <= set(history[0])
    assert 0 <= history[0]["objective/reward/exact_match_reward"] <= 1
    assert history[0]["objective/raw_scores"] == pytest.approx(
        history[0]["objective/reward/reward"] + 0.5 * history[0]["objective/reward/exact_match_reward"], abs=1e-5
    )
    # The reward model's part is in its normalised units: the module's run (the reward model alone)
    # scored the same greedy initial answers raw.
    alone = json.loads((prepared / "ppo" / "metrics.json").read_text())["eval_initial/reward_score"]
    stats = json.loads((run_dir / "reward" / "reward_stats.json").read_text())
    assert metrics["eval_initial/reward/reward"] == pytest.approx((alone - stats["mean"]) / stats["std"], abs=1e-4)
    # The report names the judge by its sources: the samples' reward is this sum, not a reward model's.
    _, _, numbers = write_report(run_dir)
    assert set(numbers["win_rates"]["ppo"]["eval"]) == {"gold checker", "reward (reward + exact_match_reward)"}
    panel = [("reward sources", ["objective/reward/*"])]  # every source's curve, whatever its name
    assert curves_png(history, panel, "ppo").startswith(b"\x89PNG")
    assert curves_png([{"iteration": 1, "objective/scores": 0.5}], panel, "ppo") is None


def test_a_pushed_reward_model_brings_its_statistics_and_ppo_normalises_with_them(trained, tmp_path, monkeypatch):
    """The ship loop: a reward stage exported and pushed (`alignment export --push-to-hub`), then named by its
    repo id as another run's `reward_model`. It loads from the hub (a local server speaking the hub's
    protocol; the hub itself is out of reach here) with its reward_stats.json, and PPO standardises its
    scores with those statistics as it does a reward stage's."""

    _, prepared = trained
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with HubProtocolServer(tmp_path / "hub") as hub:
        for module, name, value in hub.client_settings(tmp_path / "hub-cache"):
            monkeypatch.setattr(module, name, value)
        exported = tmp_path / "exported-rm"
        assert (
            cli.main(
                ["export", str(prepared / "reward"), str(exported), "--dtype", "float32", "--push-to-hub", "me/toy-rm"]
            )
            == 0
        )
        stats = json.loads((exported / "reward_stats.json").read_text())
        run_dir = tmp_path / "run"
        args = {"num_iterations": 1, "missing_eos_penalty": None}
        raw = reward_model_pipeline(prepared, run_dir, {"name_or_path": "me/toy-rm"}, args)
        metrics = run_recipe(validate_recipe(raw), only=["ppo"])["ppo"]
    assert {"model.safetensors", "reward_stats.json"} <= set(hub.downloads)  # loaded from the hub, stats too
    assert {key: metrics[f"reward_model_stats/{key}"] for key in stats} == stats
    (first,) = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert first["objective/scores"] == pytest.approx(
        (first["objective/raw_scores"] - stats["mean"]) / stats["std"], abs=1e-5
    )
    assert abs(first["objective/raw_scores"] - stats["mean"]) > 1e-3  # so the check above can tell


def test_a_reward_models_statistics_come_from_the_initial_policys_answers_the_same_on_every_start(trained):
    """Without shipped statistics, a separate reward model is standardised by its scores of the SFT policy's
    sampled answers to `reward_stats_prompts` training prompts, taken in rollout-sized batches; seeded, so
    a resumed run gets the same numbers, and the caller's random state is untouched."""
    from alignment.stages.ppo import initial_policy_reward_stats

    recipe, output_dir = trained
    stage, tokenizer, data, (model, *_) = roles_of(recipe)
    prompts = data.splits["train"]
    config = stage.args_class(**{**recipe.stage("ppo").args, "reward_stats_prompts": 10, "rollout_batch_size": 4})
    calls = []

    def position_in_batch(responses):  # 0, 1, 2, 3 in each batch of four: 10 answers give 0-3, 0-3, 0-1
        calls.append(len(responses))
        return torch.arange(len(responses), dtype=torch.float32)

    stats = initial_policy_reward_stats(model, tokenizer, position_in_batch, prompts, config, 0, torch.float32)
    expected = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert calls == [4, 4, 2] and stats["count"] == 10 and stats["mean"] == pytest.approx(sum(expected) / 10)
    assert stats["std"] == pytest.approx(torch.tensor(expected, dtype=torch.float64).std().item())

    def response_length(responses):  # depends on what was sampled
        return responses.response_mask.sum(dim=1).float()

    before = torch.random.get_rng_state()
    first = initial_policy_reward_stats(model, tokenizer, response_length, prompts, config, 0, torch.float32)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert initial_policy_reward_stats(model, tokenizer, response_length, prompts, config, 0, torch.float32) == first
    with pytest.raises(RecipeError, match="reward_stats_prompts: the reward model gave all 10 answers"):
        initial_policy_reward_stats(model, tokenizer, lambda r: torch.ones(len(r)), prompts, config, 0, torch.float32)


def test_a_separate_reward_model_on_another_base_scores_with_its_own_tokenizer(trained, tmp_path):
    """A reward model of its own (here stories260k with a one-label head, saved as a hub reward model
    would be), loaded in 4-bit beside the shared toy base: PPO's scores are that model's own scores
    of the prompt and response rendered with its tokenizer and template."""
    need_shared(STORIES)
    _, prepared = trained
    torch.manual_seed(0)
    reward_model_dir = tmp_path / "stories-rm"
    AutoModelForSequenceClassification.from_pretrained(STORIES, num_labels=1).save_pretrained(reward_model_dir)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(reward_model_dir)
    run_dir = tmp_path / "run"
    quantization = {"mode": "4bit", "compute_dtype": "float32"}
    reward_model = {"name_or_path": str(reward_model_dir), "quantization": quantization, "chat_template": "alpaca"}
    raw = reward_model_pipeline(prepared, run_dir, reward_model, {"num_iterations": 1, "missing_eos_penalty": None})
    ppo = raw["stages"][1]
    ppo["evaluation"]["max_new_tokens"] = 4  # short answers (count_a's "2") end, long ones (sort's) are cut
    metrics = run_recipe(validate_recipe(raw), only=["ppo"])["ppo"]
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["inputs"]["stages"] == {"sft": str(run_dir / "sft")}

    # The same samples, scored one at a time by the reward model loaded plainly with transformers.
    samples = [json.loads(line) for line in (run_dir / "ppo" / "samples" / "eval.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATES["alpaca"]
    scorer = AutoModelForSequenceClassification.from_pretrained(
        reward_model_dir,
        num_labels=1,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    ).eval()
    keep_cpu_4bit_exact(scorer)  # as the stages load 4-bit models on CPU (no bf16 repacking)
    scores = []
    for sample in samples:  # a finished answer as a closed turn; one cut at the length limit left open
        prompt = [{"role": "user", "content": sample["prompt"]}]
        if sample["ended"]:
            text = tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": sample["response"]}], tokenize=False
            )
        else:
            text = (
                tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) + sample["response"]
            )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            scores.append(scorer(**ids).logits[0, 0].item())
    assert len(samples) == 16 and len({round(score, 4) for score in scores}) > 1
    assert {sample["ended"] for sample in samples} == {True, False}  # both renderings are checked
    assert metrics["eval/reward_score"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    # It ships no statistics: PPO standardised its scores by those of the SFT policy's answers.
    (first,) = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    mean, std = metrics["reward_model_stats/mean"], metrics["reward_model_stats/std"]
    assert metrics["reward_model_stats/count"] == 64 and std > 0
    assert first["objective/scores"] == pytest.approx((first["objective/raw_scores"] - mean) / std, abs=1e-5)


def test_grpo_runs_without_a_value_role_and_without_a_reference_pass_at_kl_coef_zero(trained, tmp_path):
    """advantage_estimator grpo: groups of samples per prompt, no value adapter trained or saved; with
    kl_coef 0 the reference never runs in training (no KL metric)."""
    _, prepared = trained
    run_dir = tmp_path / "run"
    for stage in ("sft", "reward"):
        shutil.copytree(prepared / stage, run_dir / stage)
    grpo_args = CRITIC_FREE | {
        "num_iterations": 2,
        "kl_coef": 0.0,
        "loss_aggregation": "sequence",
        "cliprange_high": 0.28,
    }
    raw = pipeline(run_dir, grpo_args, value_from="policy")
    stage = make_stage(validate_recipe(raw), validate_recipe(raw).stage("ppo"))
    tokenizer = load_tokenizer(stage.recipe.model, stage.recipe.chat_template)
    data = build_stage_data(stage.spec.data, "prompt", 0, tokenizer)
    model, value_head, _, _ = stage.build_roles(tokenizer, data)
    assert value_head is None and "value" not in model.peft_config
    metrics = run_recipe(validate_recipe(raw), only=["ppo"])["ppo"]
    assert metrics["train/episode"] == 16  # 2 iterations x 4 prompts x 2 samples
    assert "train/objective/kl" not in metrics and "train/val/explained_variance" not in metrics
    assert 0 <= metrics["train/group/equal_reward_share"] <= 1 and "train/group/reward_std" in metrics
    assert not (run_dir / "ppo" / "adapters" / "value").exists()
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert all("loss/value_avg" not in row for row in history)
    panels = dict(logged_panels(history, CURVES["ppo"]))  # the report plots the group quantities, no value loss
    assert panels["reward std within groups (GRPO, RLOO)"] == ["group/reward_std"]
    assert panels["groups of equal rewards (no signal)"] == ["group/equal_reward_share"]
    assert "value loss" not in panels and "KL to the SFT policy" not in panels


def run_ppo_stage(run_dir: Path, recipe_path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "alignment", "run", str(recipe_path), "--stages", "ppo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


CHECKER = "alignment.evaluation.checkers:exact_match_reward"
CRITIC_FREE = {"advantage_estimator": "grpo", "samples_per_prompt": 2, "rollout_batch_size": 4}


DYNAMIC_GRPO_ON_THE_CHECKER = CRITIC_FREE | {"dynamic_sampling": True, "max_sampling_rounds": 3}


@pytest.mark.slow
@pytest.mark.parametrize("estimator_args", [{}, DYNAMIC_GRPO_ON_THE_CHECKER], ids=["gae", "grpo-dynamic-sampling"])
def test_killed_ppo_stage_resumes_and_matches_an_uninterrupted_run(trained, tmp_path, estimator_args):
    """PPO-ptx (and GRPO with dynamic sampling on the checker's reward) killed with SIGKILL after its
    second checkpoint and run again: the same iterations and metrics as a run never interrupted (the ptx
    sampler's state is in the checkpoint; every sampling round's prompts come from the iteration's own
    blocks of the prompt order), and the initial evaluation is reused rather than run again."""
    _, prepared = trained
    logs = {}
    for name in ("straight", "killed"):
        run_dir = tmp_path / name
        for stage in ("sft", "reward"):
            shutil.copytree(prepared / stage, run_dir / stage)
        recipe_path = tmp_path / f"{name}.yaml"
        ppo_args = {"num_iterations": 6, "save_steps": 2, "ptx_coef": 0.5, **estimator_args}
        recipe = pipeline(run_dir, ppo_args, ptx_data=TOY_DATA)
        if estimator_args.get("dynamic_sampling"):  # the checker alone, so that some groups score all the same
            recipe["stages"][2] |= {"reward_function": CHECKER, "value_from": "policy"}
            del recipe["stages"][2]["reward_from"]
        recipe_path.write_text(yaml.safe_dump(recipe))
        if name == "killed":
            process = run_ppo_stage(run_dir, recipe_path)
            checkpoint = run_dir / ".work" / "ppo" / "ppo_checkpoint" / "trainer_state.json"
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and process.poll() is None:
                if checkpoint.exists() and json.loads(checkpoint.read_text())["iteration"] >= 2:
                    break
                time.sleep(0.2)
            assert process.poll() is None, "the run ended before it could be killed"
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            assert not (run_dir / "ppo").exists()  # no half-written output
            saved = checkpoint.parent  # accelerate's save_state: the trainable weights alone, nothing pickled to load
            assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= {
                item.name for item in saved.iterdir()
            }
            assert all(
                "lora_" in name or name.startswith("value_head.") for name in load_file(saved / "model.safetensors")
            )
            torch.load(saved / "optimizer.bin", weights_only=True)
        finished = run_ppo_stage(run_dir, recipe_path)
        output, _ = finished.communicate(timeout=900)
        assert finished.returncode == 0, output[-3000:]
        if name == "killed":
            assert "resumed from" in output and "initial evaluation reused" in output
        logs[name] = json.loads((run_dir / "ppo" / "log_history.json").read_text())
        logs[f"{name}/metrics"] = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    assert (
        [row["iteration"] for row in logs["killed"]]
        == [row["iteration"] for row in logs["straight"]]
        == [1, 2, 3, 4, 5, 6]
    )
    assert "loss/ptx_avg" in logs["straight"][-1]
    if estimator_args.get("dynamic_sampling"):
        assert max(row["rollout/sampling_rounds"] for row in logs["straight"]) > 1
    for straight, resumed in zip(logs["straight"], logs["killed"], strict=True):
        for key, value in straight.items():
            if not key.startswith(("time/", "tokens_per_second/")):
                assert resumed[key] == pytest.approx(value, rel=1e-4, abs=1e-5), (straight["iteration"], key)
    for key, value in logs["straight/metrics"].items():
        if key.startswith(("eval_initial/", "eval/")):
            assert logs["killed/metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@pytest.mark.slow
def test_accelerate_launch_runs_the_pipeline_on_two_processes(tmp_path):
    """`accelerate launch` with the shipped DDP config on two CPU processes: each rolls out its own prompts, the gradients are
    shared (the trainer fails if the replicas' weights diverge), and only the main process writes."""
    run_dir = tmp_path / "run"
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(pipeline(run_dir)))  # checkpoints after iteration 1
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml"]
    command += ["--num_processes", "2", "-m", "alignment", "run", str(recipe_path)]  # the shipped DDP config
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=environment)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]

    for stage in ("sft", "reward", "ppo"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "completed" and manifest["host"]["num_processes"] == 2, stage
    assert not list(run_dir.glob(".*tmp*")) and not list((run_dir / ".work").iterdir())  # no scratch left
    metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    assert metrics["train/episode"] == 2 * 8 * 2  # iterations × rollout batch × processes
    history = json.loads((run_dir / "ppo" / "log_history.json").read_text())
    assert [row["iteration"] for row in history] == [1, 2]
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    assert (run_dir / "ppo" / "adapter_model.safetensors").exists()


def test_two_processes_estimate_one_set_of_reward_statistics_from_their_shares(trained, tmp_path):
    """Under `accelerate launch` each process answers half of `reward_stats_prompts` and all of them get
    every score: the statistics count all 10 answers (5 each, gathered), so every process normalises alike."""
    _, prepared = trained
    reward_model = tmp_path / "reward-model"
    assert cli.main(["export", str(prepared / "reward"), str(reward_model), "--dtype", "float32"]) == 0
    (reward_model / "reward_stats.json").unlink()  # a reward model that ships no statistics
    run_dir = tmp_path / "run"
    raw = reward_model_pipeline(
        prepared, run_dir, {"name_or_path": str(reward_model)}, {"num_iterations": 1, "reward_stats_prompts": 10}
    )
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/ddp.yaml"]
    command += ["--num_processes", "2", "-m", "alignment", "run", str(recipe_path), "--stages", "ppo", "--no-report"]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=environment)
    assert finished.returncode == 0, (finished.stdout + finished.stderr)[-4000:]
    metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    assert metrics["reward_model_stats/count"] == 10 and metrics["reward_model_stats/std"] > 0


@pytest.mark.slow
def test_shipped_toy_ppo_checker_recipe_gains_ten_points_over_early_sft(tmp_path):
    """recipes/toy/ppo-checker.yaml as users run it: PPO against the exact checker from the
    early-stopped SFT stage, on the same held-out prompts. Measured in the toy's own chat template: 0.375 →
    0.539, PPO stage 329 s on 2 AVX2 cores."""
    overrides = [f"output_dir={tmp_path}", "tracking.mode=disabled"]
    results = run_recipe(load_recipe(ROOT / "recipes" / "toy" / "ppo-checker.yaml", overrides))
    metrics = results["ppo"]
    gain = metrics["eval/exact_match"] - results["sft"]["eval/exact_match"]
    manifest = json.loads((tmp_path / "ppo" / "manifest.json").read_text())
    print(
        f"toy ppo-checker: exact match gain {gain:.3f}, KL {metrics['train/objective/kl']:.3f}, stage {manifest['duration_s']} s"
    )
    assert metrics["eval_initial/exact_match"] == pytest.approx(results["sft"]["eval/exact_match"])
    assert gain >= 0.10  # the stage's wall time is printed and quoted in docs/benchmarks.md, not asserted
    _, _, numbers = write_report(tmp_path)
    gold = numbers["win_rates"]["ppo"]["eval"]["gold checker"]
    assert gold.count == 280 and (gold.wins - gold.losses) / gold.count == pytest.approx(gain)
    # The samples' rewards are the checker's, named so (not "reward model"), and judge as the gold checker does.
    assert numbers["win_rates"]["ppo"]["eval"]["reward (exact_match_reward)"] == gold


def make_trainer(recipe, work_dir: Path, compute_dtype: str = "float32", **args) -> PPOTrainer:
    """A PPO trainer on the four roles of `recipe` (its SFT and reward stages already run), with `args`
    overriding the PPO stage's and the base's compute dtype set to `compute_dtype`."""
    recipe.model.quantization.compute_dtype = compute_dtype
    stage, tokenizer, data, (model, value_head, reward, stats) = roles_of(recipe)
    config = stage.args_class(**{**recipe.stage("ppo").args, **args})
    return PPOTrainer(
        config, model, value_head, reward, tokenizer, data.splits[TRAIN], work_dir, Tracker.disabled(),
        reward_stats=stats, seed=0, compute_dtype=model_compute_dtype(recipe.model),
    )  # fmt: skip


def trainable_copy(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.trainable_state().items()}


def test_one_bfloat16_ppo_step_at_a_small_learning_rate_changes_every_trainable_entry(trained, tmp_path):
    """Float32 master weights: with a bfloat16 compute dtype the trainable adapters and the value head stay
    in float32 (the passes run under autocast), so an AdamW step of about the learning rate, 1e-5, moves
    every entry. Stored in bfloat16, most entries would not move: the step is below their rounding step."""
    recipe, _ = trained
    trainer = make_trainer(recipe, tmp_path / "work", "bfloat16", learning_rate=1e-5, num_mini_batches=1,
                           num_ppo_epochs=1, max_grad_norm=None)  # fmt: skip
    assert all(tensor.dtype == torch.float32 for tensor in trainer.trainable_state().values())
    before = trainable_copy(trainer)
    torch.manual_seed(0)
    rollout = trainer.rollout(trainer._prompt_batch(0))
    assert rollout.logprobs.dtype == torch.float32
    trainer.update(rollout)
    after = trainer.trainable_state()
    entries = sum(tensor.numel() for tensor in before.values())
    changed = sum(int((after[name] != tensor).sum()) for name, tensor in before.items())
    # The same step rounded to bfloat16 storage: what the old cast to the compute dtype kept of it.
    kept_in_bf16 = sum(int((after[name].bfloat16() != tensor.bfloat16()).sum()) for name, tensor in before.items())
    print(f"entries changed: {changed / entries:.5f} in float32, {kept_in_bf16 / entries:.3f} if stored in bfloat16")
    assert changed / entries > 0.999  # every entry whose gradient is not vanishingly small
    assert kept_in_bf16 / entries < 0.5


def test_the_update_frees_the_policy_pass_before_the_value_pass(trained, tmp_path):
    """One process: the policy loss goes back before the value pass runs, so the two passes' activations are
    never held at once. Measured as the bytes of activations saved for backward that are still alive when
    the value pass starts: a small share of those the policy pass saved (without the early backward: all)."""
    recipe, _ = trained
    trainer = make_trainer(recipe, tmp_path / "work", num_mini_batches=1, num_ppo_epochs=1)
    rollout = trainer.rollout(trainer._prompt_batch(0))
    saved: list[tuple[weakref.ref, int]] = []
    alive_at_value_pass: list[tuple[int, int]] = []  # (bytes still alive, bytes saved so far)

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_leaf:  # activations, not weights
            saved.append((weakref.ref(tensor), tensor.numel() * tensor.element_size()))
        return tensor

    values = trainer._values

    def values_noting_what_is_alive(*args, **kwargs):
        alive_at_value_pass.append((sum(size for ref, size in saved if ref() is not None), sum(s for _, s in saved)))
        saved.clear()  # the next micro-batch's policy pass is measured on its own
        return values(*args, **kwargs)

    trainer._values = values_noting_what_is_alive
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.update(rollout)
    assert alive_at_value_pass and all(alive < 0.1 * policy_pass for alive, policy_pass in alive_at_value_pass)


def test_the_value_head_starts_in_the_units_of_the_normalised_rewards(trained, tmp_path):
    """With value_from: reward, V starts as the reward head rescaled to (score − mean) / std, the units
    of the rewards it predicts: at the last token of a conversation it equals the normalised reward."""
    recipe, _ = trained
    trainer = make_trainer(recipe, tmp_path / "work")
    answers = Responses.from_texts(
        trainer.tokenizer, [[{"role": "user", "content": "Reverse the string abc."}]] * 2, ["cba", "abc"]
    )
    raw = trainer.reward(answers)
    normalised = (raw - trainer.reward_stats["mean"]) / trainer.reward_stats["std"]
    suffix = turn_suffix_ids(trainer.tokenizer)
    for row in range(2):
        ids = torch.tensor([answers.sampled_ids(row, suffix) + [trainer.tokenizer.pad_token_id]])
        with torch.no_grad():  # the value at the position after the last token reads the last token's state
            values = trainer._values(ids, torch.ones_like(ids), ids.shape[1] - 1)
        assert values[0, -1].item() == pytest.approx(normalised[row].item(), abs=1e-4)
    assert abs(trainer.reward_stats["mean"]) > 0.05  # the old raw-unit start would differ by this offset


def test_weight_decay_is_zero_by_default_and_configurable(trained, tmp_path):
    recipe, _ = trained
    trainer = make_trainer(recipe, tmp_path / "work")
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {0.0}
    trainer = make_trainer(recipe, tmp_path / "work2", weight_decay=0.1)
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {0.1}


def test_gradient_accumulation_leaves_the_update_unchanged(trained, tmp_path):
    """One update of one rollout (ragged response lengths) with the mini-batch in one micro-batch and in
    four: the same weights after it, because every loss is normalised by the mini-batch's token count."""
    recipe, _ = trained
    weights = []
    for steps in (1, 4):
        trainer = make_trainer(recipe, tmp_path / f"work{steps}", num_mini_batches=1, num_ppo_epochs=1,
                               gradient_accumulation_steps=steps, learning_rate=1e-3)  # fmt: skip
        torch.manual_seed(0)
        rollout = trainer.rollout(trainer._prompt_batch(0))
        lengths = rollout.response_mask.sum(1)
        assert lengths.min() < lengths.max()  # ragged rows, or the test could not tell the difference
        trainer.update(rollout)
        weights.append(trainer.trainable_state())
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, atol=2e-6, rtol=1e-4, msg=name)


def test_a_checkpoint_of_another_config_is_refused_naming_what_changed(trained, tmp_path):
    recipe, _ = trained
    trainer = make_trainer(recipe, tmp_path / "work")
    trainer.save_checkpoint()
    changed = make_trainer(recipe, tmp_path / "work", kl_coef=0.2)
    with pytest.raises(RuntimeError, match=r"another config \(kl_coef: 0\.05 then, 0\.2 now\).*delete"):
        changed.load_checkpoint()
    same = make_trainer(recipe, tmp_path / "work")
    assert same.load_checkpoint()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_merged_sampling_draws_what_the_adapters_draw_and_frees_its_copy(trained, tmp_path, compute_dtype):
    """The rollout samples from a plain copy of the base with the policy merged in: its logits are the
    4-bit base + policy adapter's (float32: to rounding; bfloat16: within its precision), after an update
    as well (the copy is made from the current weights); in float32 the same seed draws the same responses
    as sampling through the adapters. The copy's weights exist only during sampling, and the shared 4-bit
    base is never changed."""
    recipe, _ = trained
    merged = make_trainer(recipe, tmp_path / "merged", compute_dtype, num_mini_batches=1, num_ppo_epochs=1)
    through_adapters = make_trainer(recipe, tmp_path / "adapters", compute_dtype, merged_sampling=False)
    assert through_adapters.merged_copy is None

    def params_4bit(trainer):
        return [p for p in trainer.unwrapped.parameters() if isinstance(p, bnb.nn.Params4bit)]

    quantized = params_4bit(merged)
    base_before = [p.data.view(torch.uint8).clone() for p in quantized]  # packed bytes (float32 storage has NaNs)
    batch = fixed_batch(merged.tokenizer)
    tolerance = 1e-4 if compute_dtype == "float32" else 0.1
    rows = merged._prompt_batch(0)
    for step in range(2):  # before and after an update
        with torch.no_grad(), merged.autocast():
            with active_adapter(merged.unwrapped, POLICY):
                expected = merged.unwrapped(**batch).logits.float()
            with merged._sampling_policy() as policy:
                assert policy is merged.merged_copy.model and not isinstance(policy, PeftModel)
                actual = policy(**batch).logits.float()
        assert (actual - expected).abs().max().item() < tolerance * expected.abs().max().item()
        assert all(p.device.type == "meta" for p in merged.merged_copy.model.parameters())  # freed after use
        torch.manual_seed(step)
        rollout = merged.rollout(rows)
        if step == 0 and compute_dtype == "float32":
            torch.manual_seed(step)
            assert torch.equal(through_adapters.rollout(rows).response_ids, rollout.response_ids)
        merged.update(rollout)
    assert all(torch.equal(p.data.view(torch.uint8), before) for p, before in zip(quantized, base_before, strict=True))
    assert all(parameter is p for parameter, p in zip(quantized, params_4bit(merged), strict=True))


@pytest.mark.skipif(active_allocator() != "system" or not sys.platform.startswith("linux"),
                    reason="glibc's malloc_trim: Linux with the C library's malloc only")  # fmt: skip
def test_memory_a_phase_freed_goes_back_to_the_os_between_phases():
    """Tensors freed in the middle of glibc's heap stay in the process (the top of the heap pins them) until
    `release_freed_memory`, which the PPO loop calls after each rollout and each update."""

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    tensors = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KiB each, from the heap: 250 MiB
    pinned = tensors.pop()  # the last one keeps the heap's top in use
    before = rss_mib()
    del tensors
    kept = rss_mib()
    release_freed_memory()
    after = rss_mib()
    assert before - kept < 50 < kept - after, (before, kept, after)
    del pinned


def test_dynamic_sampling_trains_on_groups_whose_checker_scores_differ(trained, tmp_path):
    """DAPO's dynamic sampling with the exact checker as the reward: further prompt batches of the
    iteration are sampled until rollout_batch_size groups with differing scores are found (or the rounds
    run out); the update's batch keeps its size and holds those groups first, and the logged scores, gold
    accuracy and group statistics are of everything sampled, not of the selection."""
    _, prepared = trained
    run_dir = tmp_path / "run"
    shutil.copytree(prepared / "sft", run_dir / "sft")
    raw = pipeline(run_dir, CRITIC_FREE, reward_function=CHECKER, value_from="policy")
    del raw["stages"][2]["reward_from"], raw["stages"][1]  # the checker alone: scores 1 or 0 (−1 if unfinished)
    rounds_allowed = 12
    trainer = make_trainer(validate_recipe(raw), tmp_path / "work", dynamic_sampling=True,
                           max_sampling_rounds=rounds_allowed, temperature=0.8)  # fmt: skip
    torch.manual_seed(0)
    rollout = trainer.rollout(trainer._prompt_batch(0))
    metrics = rollout.sampling_metrics
    rounds, group, batch_groups = int(metrics["rollout/sampling_rounds"]), 2, CRITIC_FREE["rollout_batch_size"]
    assert metrics["rollout/sampled_episodes"] == rounds * batch_groups * group
    found = round((1 - metrics["group/equal_reward_share"]) * rounds * batch_groups)
    print(f"rounds {rounds}, groups with signal found {found}, gold {metrics['objective/gold_accuracy']:.3f}")
    assert found > 0 and rounds > 1  # this seed exercises both: a search over rounds, and groups to keep
    assert rounds == rounds_allowed or found >= batch_groups  # it stops as soon as it has enough
    assert len(rollout.responses) == batch_groups * group  # the update's batch keeps its size
    kept = core.groups_with_signal(rollout.scores, group)
    assert int(kept.sum()) == min(found, batch_groups)
    offered = [row["prompt"] for r in range(rounds) for row in trainer._prompt_batch(0, r)]
    assert all(prompt in offered for prompt in rollout.prompts)
    assert rollout.prompts[::group] == rollout.prompts[1::group]  # whole groups, each one prompt's answers
    assert metrics["objective/gold_accuracy"] * metrics["rollout/sampled_episodes"] >= sum(rollout.gold)
    update = trainer.update(rollout)
    assert update["rollout/sampling_rounds"] == rounds and math.isfinite(update["loss/policy_avg"])


@pytest.mark.parametrize(("release_memory", "releases"), [("phase", 0), ("step", 4)])
def test_release_memory_step_hands_freed_memory_back_after_every_optimiser_step(
    trained, tmp_path, monkeypatch, release_memory, releases
):
    """`release_memory: step` trims glibc's heap after each of the update's optimiser steps (2 epochs × 2
    mini-batches here); "phase" leaves it to the loop, after the whole update."""
    import alignment.ppo.trainer as trainer_module

    recipe, _ = trained
    calls = []

    def counted() -> None:
        calls.append(1)
        release_freed_memory()  # the real trim, counted

    monkeypatch.setattr(trainer_module, "release_freed_memory", counted)
    trainer = make_trainer(recipe, tmp_path / "work", release_memory=release_memory, num_mini_batches=2,
                           num_ppo_epochs=2)  # fmt: skip
    trainer.update(trainer.rollout(trainer._prompt_batch(0)))
    assert len(calls) == releases


@pytest.mark.parametrize("content", ['{"mean": 0.1}', '{"mean": 0.1, "std": 0}', "not json"])
def test_malformed_shipped_reward_statistics_are_refused_naming_the_file_and_the_fix(tmp_path, content):
    from alignment.stages.ppo import RewardModelConfig, shipped_reward_stats

    (tmp_path / "reward_stats.json").write_text(content)
    with pytest.raises(RecipeError, match="reward_model.name_or_path: .*reward_stats.json is not reward statistics"):
        shipped_reward_stats(RewardModelConfig(name_or_path=str(tmp_path)))
    (tmp_path / "reward_stats.json").write_text('{"mean": 0.1, "std": 2.0, "count": 8}')
    assert shipped_reward_stats(RewardModelConfig(name_or_path=str(tmp_path)))["std"] == 2.0
