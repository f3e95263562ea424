"""The reward stage on a real pre-trained checkpoint (stories260k in 4-bit NF4) and real HH-RLHF pairs.

A short SFT stage first, then the reward stage from its adapter; then the saved adapter and head go
onto a second adapter slot of one causal-LM base and must score the held-out pairs as the trained
classifier did, whatever the padding side or the batch. The toy suite's accuracy run is `slow`.
"""

from __future__ import annotations

import contextlib
import io
import json
import threading
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoTokenizer

from alignment import cli
from alignment.data.build import EVAL, build_stage_data
from alignment.data.loading import DataError
from alignment.models.batching import encode_conversations
from alignment.models.heads import read_reward_stats
from alignment.models.loading import attach_adapter, keep_cpu_4bit_exact, load_base_model
from alignment.models.precision import native_bfloat16
from alignment.models.scoring import load_reward_role, score_conversations, sequence_scores
from alignment.recipes.load import load_recipe, validate_recipe
from alignment.recipes.validate import RecipeError
from alignment.runner import run_recipe
from alignment.stages.reward import (
    PAIR_REWARDS_FILE,
    add_pairs,
    load_init_weights,
    load_sequence_classifier,
    reward_lora_config,
)
from alignment.tracking import read_offline_run

from conftest import ROOT, SHARED, STORIES, minimal_recipe, need_shared

HH = SHARED / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
REWARD_STEPS = 6


def stories_recipe(output_dir: Path, data_path: str = str(HH), score_head: str = "linear") -> dict:
    hh = {"path": data_path, "format": "implicit_preference"}
    common_args = {
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "max_length": 256,
        "activation_checkpointing": False,
        "save_strategy": "no",
        "report_to": "none",
    }
    return {
        "name": "stories-reward",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {
            "name_or_path": str(STORIES),
            "dtype": "float32",
            "quantization": {"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "chat_template": "alpaca",
        "tracking": {"project": "alignment-tests", "mode": "offline", "tags": ["test"]},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": {"datasets": [{**hh, "max_rows": 40}], "on_bad_rows": "drop"},
                "evaluation": {"num_prompts": 0},
                "args": {**common_args, "max_steps": 2},
            },
            {
                "name": "reward",
                "type": "reward",
                "init_from": "sft",
                "score_head": {"type": score_head, "heads": 4, "head_dim": 8},
                # Most HH transcripts are longer than 256 stories260k tokens: 200 rows leave 63 pairs to train; 18 of 80 held out.
                "data": {"datasets": [{**hh, "max_rows": 200}], "eval_split": 80, "on_bad_rows": "drop"},
                "evaluation": {"batch_size": 5, "table_rows": 8, "stats_pairs": 20},
                "args": {**common_args, "max_steps": REWARD_STEPS, "center_rewards_coefficient": 0.01},
            },
        ],
    }


@pytest.fixture(scope="module", params=["linear", "attention"])
def stories_run(request, tmp_path_factory):
    """The whole run, once with each kind of score head: every test below holds for both."""
    need_shared(STORIES)
    need_shared(HH)
    output_dir = tmp_path_factory.mktemp(f"stories-reward-{request.param}") / "run"
    recipe = validate_recipe(stories_recipe(output_dir, score_head=request.param))
    metrics = run_recipe(recipe)["reward"]
    return recipe, output_dir, metrics


@pytest.fixture(scope="module")
def held_out_pairs(stories_run):
    """The reward stage's held-out pairs, rebuilt exactly as the stage built them."""
    recipe, output_dir, _ = stories_run
    tokenizer = AutoTokenizer.from_pretrained(str(output_dir / "reward"))
    pairs = build_stage_data(recipe.stage("reward").data, "preference", recipe.seed, tokenizer, 256).splits[EVAL]
    return pairs, tokenizer


@pytest.fixture(scope="module")
def shared_base(stories_run):
    """One causal-LM base holding the SFT adapter (the policy slot) and then the reward adapter (a second slot)."""
    recipe, output_dir, _ = stories_run
    model = attach_adapter(load_base_model(recipe.model), "policy", from_path=output_dir / "sft", trainable=False)
    model, head = load_reward_role(model, output_dir / "reward", "reward")
    model.eval()
    return model, head


def test_reward_stage_trains_on_hh_pairs_and_saves_adapter_head_stats(stories_run):
    recipe, output_dir, metrics = stories_run
    stage = output_dir / "reward"
    for name in ("adapter_model.safetensors", "adapter_config.json", "reward_stats.json",
                 PAIR_REWARDS_FILE, "tokenizer.json", "metrics.json", "manifest.json", "log_history.json"):  # fmt: skip
        assert (stage / name).exists(), name
    config = json.loads((stage / "adapter_config.json").read_text())  # PEFT's sequence-classification adapter
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"] and config["r"] == 8
    adapter = load_file(str(stage / "adapter_model.safetensors"))
    head = {key.split(".score.")[1]: tuple(tensor.shape) for key, tensor in adapter.items() if ".score." in key}
    assert all("lora_" in key for key in adapter if ".score." not in key)  # the head is saved through PEFT
    if recipe.stage("reward").score_head.type == "linear":
        assert head == {"weight": (1, 64)}
    else:  # 4 heads of 8 query/key units on stories260k's 64 hidden units
        assert head == {"query_weight": (32, 64), "key_weight": (32, 64), "value_weight": (4, 64)}

    losses = [entry["loss"] for entry in json.loads((stage / "log_history.json").read_text()) if "loss" in entry]
    assert len(losses) == REWARD_STEPS and all(loss > 0 for loss in losses)
    assert metrics["data/eval_rows"] == metrics["eval/num_pairs"] == 18 and metrics["data/train_rows"] == 63
    assert metrics["data/dropped_rows"] == 280 - 63 - 18  # over-long for stories260k's context, or empty
    for key in ("pairwise_accuracy", "mean_margin", "loss", "reward_chosen_mean", "reward_rejected_mean"):
        assert f"eval/{key}" in metrics, key
    assert 0.0 <= metrics["eval/pairwise_accuracy"] <= 1.0

    stats = read_reward_stats(stage)
    assert set(stats) == {"mean", "std", "count"} and stats["count"] == 40 and stats["std"] > 0
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["type"] == "reward"
    assert manifest["inputs"]["stages"] == {"sft": str(output_dir / "sft")}


def test_saved_adapter_and_head_on_a_second_slot_score_as_right_after_training(
    stories_run, held_out_pairs, shared_base
):
    _, output_dir, _ = stories_run
    pairs, tokenizer = held_out_pairs
    model, head = shared_base
    assert set(model.peft_config) == {"policy", "reward"}  # one base, two adapters
    assert type(model.get_base_model().model.layers[0].mlp.up_proj.base_layer).__name__ == "Linear4bit"
    assert model.active_adapter == "policy"
    assert not any(parameter.requires_grad for parameter in head.parameters())

    trained = json.loads((output_dir / "reward" / PAIR_REWARDS_FILE).read_text())[EVAL]
    chosen = score_conversations(model, head, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], adapter="reward")
    rejected = score_conversations(
        model, head, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size=3, adapter="reward"
    )
    assert chosen == pytest.approx(trained["chosen"], abs=1e-4)
    assert rejected == pytest.approx(trained["rejected"], abs=1e-4)
    assert model.active_adapter == "policy"  # scoring with the reward role puts the policy back
    # The reward adapter is what makes the scores: the policy adapter under the same head scores differently.
    policy_scores = score_conversations(model, head, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    assert max(abs(a - b) for a, b in zip(policy_scores, chosen, strict=True)) > 1e-3


def test_a_linear_reward_stage_loads_with_plain_transformers_and_peft(stories_run, held_out_pairs):
    """The standard form: transformers' sequence classifier of the base with PEFT's adapter on it, no code
    of this suite, gives the rewards the stage wrote right after training."""
    recipe, output_dir, _ = stories_run
    if recipe.stage("reward").score_head.type != "linear":
        pytest.skip("the attention score head is this suite's own module; plain transformers builds a linear score")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    pairs, tokenizer = held_out_pairs
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )  # fmt: skip
    base = AutoModelForSequenceClassification.from_pretrained(
        str(STORIES), num_labels=1, quantization_config=quantization, dtype=torch.float32
    )
    model = PeftModel.from_pretrained(base, str(output_dir / "reward")).eval()
    keep_cpu_4bit_exact(model)  # bitsandbytes' bfloat16 CPU kernel (AVX512-BF16 CPUs only) would round differently
    trained = json.loads((output_dir / "reward" / PAIR_REWARDS_FILE).read_text())[EVAL]
    rewards = []
    for pair in pairs:
        ids = tokenizer.apply_chat_template(
            pair["prompt"] + pair["chosen"], tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            rewards.append(model(**ids).logits.item())
    assert rewards == pytest.approx(trained["chosen"], abs=1e-4)


def test_scores_do_not_depend_on_padding_side_or_batch_composition(held_out_pairs, shared_base):
    pairs, tokenizer = held_out_pairs
    model, head = shared_base
    conversations = [pair["prompt"] + pair[side] for pair in pairs.select(range(4)) for side in ("chosen", "rejected")]
    lengths = [
        len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in conversations
    ]
    assert len(set(lengths)) > 1  # the batch really is padded

    def scores(batch: list[list[dict]], padding_side: str) -> torch.Tensor:
        encoded = encode_conversations(tokenizer, batch, padding_side=padding_side)
        with torch.no_grad():
            return sequence_scores(model, head, encoded["input_ids"], encoded["attention_mask"], adapter="reward")

    alone = torch.cat([scores([conversation], "right") for conversation in conversations])
    assert alone.dtype == torch.float32
    for padding_side in ("right", "left"):
        assert torch.allclose(scores(conversations, padding_side), alone, atol=1e-4, rtol=0)
        assert torch.allclose(scores(conversations[::-1], padding_side).flip(0), alone, atol=1e-4, rtol=0)
        assert torch.allclose(scores(conversations[:3], padding_side), alone[:3], atol=1e-4, rtol=0)


def test_score_command_prints_the_reward(stories_run, held_out_pairs, shared_base):
    _, output_dir, _ = stories_run
    model, head = shared_base
    tokenizer = held_out_pairs[1]
    prompt, responses = "Tell me a story about a cat.", ["Once upon a time there was a cat.", "No."]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = cli.main(
            ["score", str(output_dir / "reward"), "--prompt", prompt, *sum([["--response", r] for r in responses], [])]
        )
    assert code == 0
    printed = [float(line.split("\t")[0]) for line in output.getvalue().splitlines()]
    conversations = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": r}] for r in responses]
    assert printed == pytest.approx(
        score_conversations(model, head, tokenizer, conversations, adapter="reward"), abs=1e-5
    )


def test_init_from_starts_the_reward_adapter_at_the_sft_adapter(stories_run):
    recipe, output_dir, _ = stories_run
    from peft import get_peft_model

    classifier = load_sequence_classifier(recipe, score_head=recipe.stage("reward").score_head)
    model = get_peft_model(classifier, reward_lora_config(recipe, output_dir / "sft"))
    load_init_weights(model, output_dir / "sft")
    saved = load_file(str(output_dir / "sft" / "adapter_model.safetensors"))
    parameters = dict(model.named_parameters())
    for key, value in saved.items():
        assert torch.equal(parameters[key.replace(".weight", ".default.weight")].detach(), value), key
    head = {name: p for name, p in parameters.items() if name.startswith("base_model.model.score.modules_to_save.")}
    assert head and all(parameter.requires_grad for parameter in head.values())
    assert not any("lora_" in name for name in head)  # the head is trained in full, never through LoRA


def test_an_offline_run_read_while_wandb_still_writes_it_is_read_once_complete(stories_run, tmp_path):
    """wandb's `finish()` can return before its service has flushed the run file (seen in CI under load:
    only the header was there). The reader waits for the run's exit record instead of reading half a run."""
    _, output_dir, _ = stories_run
    source = next((output_dir / "wandb").glob("offline-run-*"))
    (run_file,) = source.glob("run-*.wandb")
    folder = tmp_path / source.name
    folder.mkdir()
    written = folder / run_file.name
    written.write_bytes(run_file.read_bytes()[:7])  # the header alone, as wandb's service starts the file
    writer = threading.Timer(1.0, lambda: written.write_bytes(run_file.read_bytes()))
    writer.start()
    try:
        logged = read_offline_run(folder)
    finally:
        writer.join()
    assert logged["run"]["job_type"] in {"sft", "reward"}
    assert logged == read_offline_run(source)


def test_one_offline_wandb_run_per_stage_with_metrics_histograms_and_the_pair_table(stories_run):
    _, output_dir, metrics = stories_run
    runs = {read_offline_run(run)["run"]["job_type"]: run for run in (output_dir / "wandb").glob("offline-run-*")}
    assert set(runs) == {"sft", "reward"}
    logged = read_offline_run(runs["reward"])
    assert logged["run"]["name"] == "stories-reward/reward"
    assert logged["summary"]["eval/pairwise_accuracy"] == pytest.approx(metrics["eval/pairwise_accuracy"])
    assert logged["summary"]["reward_stats/std"] == pytest.approx(metrics["reward_stats/std"])
    assert logged["summary"]["eval/reward_chosen"]["_type"] == "histogram"
    assert logged["summary"]["eval/pairs"]["_type"] == "table-file"
    (table_file,) = (runs["reward"] / "files" / "media" / "table").rglob("*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "correct"]
    trained = json.loads((output_dir / "reward" / PAIR_REWARDS_FILE).read_text())[EVAL]
    assert len(table["data"]) == 8 and [row[3] for row in table["data"]] == pytest.approx(trained["chosen"][:8])


def test_bad_pairs_stop_the_reward_stage_naming_the_row_before_the_model_loads(tmp_path):
    need_shared(STORIES)
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": 3, "rejected": "b"},
    ]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    recipe = stories_recipe(tmp_path / "run", str(path))
    recipe["stages"] = [{**recipe["stages"][1], "init_from": None, "data": {"datasets": [{"path": str(path)}]}}]
    with pytest.raises(
        DataError,
        match=r"pairs.json: row (1: field 'rejected' is missing|2: field 'chosen' expected a string, got int)",
    ):
        run_recipe(validate_recipe(recipe))


@pytest.mark.slow
def test_toy_reward_model_tells_right_from_wrong_answers_on_held_out_pairs(tmp_path):
    """The shipped toy recipe: SFT, then the reward stage, which must reach 0.90 held-out pairwise accuracy
    (issue 3) whatever the CPU (issue 16): it computes in bfloat16 where that is native and in float32
    elsewhere. In the toy's own chat template it measured 0.920 in float32 on 2 AVX2 cores (reward stage
    389 s; in ChatML it was 0.893 in 482 s). Wall times are measurements (docs/benchmarks.md)."""
    recipe = load_recipe(ROOT / "recipes" / "toy" / "reward.yaml", [f"output_dir={tmp_path}", "tracking.mode=disabled"])
    metrics = run_recipe(recipe)["reward"]
    manifest = json.loads((tmp_path / "reward" / "manifest.json").read_text())
    print(
        f"toy reward (native bfloat16: {native_bfloat16()}): accuracy {metrics['eval/pairwise_accuracy']:.3f}, stage wall time {manifest['duration_s']} s"
    )
    assert metrics["eval/pairwise_accuracy"] >= 0.90  # wall time: printed, not asserted


def test_policy_samples_add_checker_labelled_pairs_of_the_sft_policys_own_mistakes(tmp_path):
    """InstructGPT's comparison data with the toy checker as labeller: every pair made from the SFT
    policy's samples pairs the reference against a wrong sample of a training prompt."""
    toy = {"datasets": [{"path": "toy", "options": {"rows": 400}, "held_out_templates": 1}], "eval_split": 0.1}
    args = {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "max_length": 96, "save_strategy": "no"}
    args |= {"activation_checkpointing": False, "report_to": []}
    samples = {"policy_from": "sft", "samples_per_prompt": 3, "max_prompts": 24, "max_new_tokens": 12}
    raw = {
        "name": "policy-pairs",
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": {"name_or_path": "toy", "dtype": "float32", "quantization": {"compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "chat_template": "tokenizer",
        "tracking": {"mode": "disabled"},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": toy,
                "evaluation": {"num_prompts": 0},
                "args": args | {"max_steps": 8},
            },
            {
                "name": "reward",
                "type": "reward",
                "data": toy,
                "policy_samples": samples,
                "args": args | {"max_steps": 4},
            },
        ],
    }
    metrics = run_recipe(validate_recipe(raw))["reward"]
    pairs = [json.loads(line) for line in (tmp_path / "run" / "reward" / "policy_pairs.jsonl").read_text().splitlines()]
    assert metrics["policy_samples/prompts"] == 24 and metrics["policy_samples/samples"] == 72
    assert len(pairs) == metrics["policy_samples/pairs"] > 10  # an 8-step SFT policy is mostly wrong
    assert metrics["policy_samples/accuracy"] < 0.5
    recipe = validate_recipe(raw)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "run" / "reward")
    prompt_view = build_stage_data(recipe.stage("reward").data, "prompt", 0, tokenizer)
    references = {row["prompt"][-1]["content"]: row["reference"] for row in prompt_view.splits["train"]}
    held_out = {row["prompt"][-1]["content"] for row in prompt_view.splits[EVAL]}
    for pair in pairs:
        prompt = pair["prompt"][-1]["content"]
        assert prompt in references and prompt not in held_out
        assert pair["chosen"] == [{"role": "assistant", "content": references[prompt]}]
        assert pair["rejected"][0]["content"] not in ("", references[prompt]) and pair["source"] == "policy_samples"
    assert len({(pair["prompt"][-1]["content"], pair["rejected"][0]["content"]) for pair in pairs}) == len(pairs)


def test_policy_samples_need_a_policy_stage_before_the_reward_stage():
    raw = minimal_recipe()
    raw["stages"].append({"name": "reward", "type": "reward", "data": raw["stages"][0]["data"], "policy_samples": {}})
    with pytest.raises(RecipeError, match="policy_from"):
        validate_recipe(raw)
    raw["stages"][1]["policy_samples"] = {"policy_from": "sfft"}
    with pytest.raises(RecipeError, match="sfft"):
        validate_recipe(raw)


def test_added_pairs_join_the_split_with_its_columns_and_none_leave_it_unchanged():
    conversation = [{"role": "user", "content": "What is 1+1?"}]
    split = Dataset.from_list(
        [
            {"prompt": conversation, "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "3"}], "margin": 1.5, "group": "add", "source": "toy"}
        ]
    )  # fmt: skip
    assert add_pairs(split, Dataset.from_list([]), 0) is split
    sampled = Dataset.from_list(
        [
            {"prompt": conversation, "chosen": [{"role": "assistant", "content": "2"}],
             "rejected": [{"role": "assistant", "content": "4"}], "group": "add", "source": "policy_samples"}
        ]
    )  # fmt: skip
    joined = add_pairs(split, sampled, 0)
    assert sorted(joined.column_names) == sorted(split.column_names)
    assert sorted((row["rejected"][0]["content"], row["margin"]) for row in joined) == [("3", 1.5), ("4", 0.0)]


def test_an_exported_reward_stage_is_a_plain_sequence_classifier_with_the_suites_rewards(
    stories_run, held_out_pairs, tmp_path, capsys
):
    """`alignment export` of a reward stage: a one-label classifier that plain transformers loads, whose
    rewards equal the suite's scoring of the same unquantized base (1e-4); the attention head is refused."""
    recipe, output_dir, _ = stories_run
    stage, out = output_dir / "reward", tmp_path / "exported"
    if recipe.stage("reward").score_head.type != "linear":
        assert cli.main(["export", str(stage), str(out)]) == 2
        assert "linear score head" in capsys.readouterr().err and not out.exists()
        return
    assert cli.main(["export", str(stage), str(out), "--dtype", "float32"]) == 0
    from transformers import AutoModelForSequenceClassification

    exported = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    pairs, tokenizer = held_out_pairs
    conversations = [pair["prompt"] + pair["chosen"] for pair in pairs]
    plain = []
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
        with torch.no_grad():
            plain.append(exported(**ids).logits.item())
    recipe.model.quantization.mode = "none"
    model, head = load_reward_role(load_base_model(recipe.model), stage)
    assert plain == pytest.approx(
        score_conversations(model, head, tokenizer, conversations, adapter="reward"), abs=1e-4
    )
    card = (out / "README.md").read_text()  # the model card: a classifier, from the SFT stage, with its stats
    assert "pipeline_tag: text-classification" in card and "- sft\n- reward\n" in card
    stats = json.loads((stage / "reward_stats.json").read_text())
    assert json.loads((out / "reward_stats.json").read_text()) == stats
    assert f"mean {stats['mean']:.4g} and standard deviation {stats['std']:.4g}" in card
    trained = json.loads((stage / PAIR_REWARDS_FILE).read_text())[EVAL]["chosen"]  # the 4-bit model's
    print(
        f"exported reward vs the 4-bit model: max |Δ| {max(abs(a - b) for a, b in zip(plain, trained, strict=True)):.3f}"
    )


def test_offline_runs_record_each_stage_as_an_artifact_and_the_reward_stage_its_sft_input(stories_run):
    """W&B lineage: each stage logs its output folder as an artifact; the reward stage declares the SFT
    stage's artifact as its input, by name and digest (in the config: wandb cannot `use_artifact` offline)."""
    _, output_dir, _ = stories_run
    runs = {}
    for folder in (output_dir / "wandb").glob("offline-run-*"):
        logged = read_offline_run(folder)
        runs[logged["run"]["job_type"]] = logged
    # (W&B logs each logged table as an artifact of its own too: the stage's is the one of the stage's type)
    (sft_artifact,) = [artifact for artifact in runs["sft"]["artifacts"] if artifact["type"] == "sft"]
    (reward_artifact,) = [artifact for artifact in runs["reward"]["artifacts"] if artifact["type"] == "reward"]
    assert sft_artifact["name"] == "stories-reward-sft" and sft_artifact["type"] == "sft"
    assert reward_artifact["name"] == "stories-reward-reward" and reward_artifact["type"] == "reward"
    assert runs["reward"]["config"]["inputs"] == {
        "sft": {"artifact": "stories-reward-sft", "type": "sft", "digest": sft_artifact["digest"]}
    }
    assert "inputs" not in runs["sft"]["config"] and runs["sft"]["run"]["group"] == runs["reward"]["run"]["group"]
