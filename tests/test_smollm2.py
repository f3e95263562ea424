"""The pipeline's RL path on a real pre-trained chat model: SmolLM2-135M-Instruct in 4-bit NF4.

Its pad token is its end-of-turn token (`<|im_end|>`, id 2), its chat template adds a system prompt
and closes a turn with a newline after `<|im_end|>`, and its vocabulary has 49,152 tokens: what a real
chat model brings and the toy does not. SFT, the reward stage and PPO each run a few steps on HH-RLHF;
the tests then check the rollouts, the step-0 sanity, what the reward model reads and how sampling is
set up. Made offline by `../shared/models/smollm2-135m.sh`; skipped with the reason when it cannot be.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignment.data.build import EVAL, TRAIN, build_stage_data
from alignment.models.heads import active_adapter
from alignment.models.loading import load_tokenizer
from alignment.models.sampling import sample, stop_token_ids, turn_suffix_ids
from alignment.models.scoring import read_score_head, score_conversations, sequence_scores
from alignment.names import POLICY, REWARD
from alignment.ppo import core
from alignment.ppo.trainer import PPOTrainer
from alignment.recipes.load import load_recipe, validate_recipe
from alignment.runner import make_stage, run_recipe
from alignment.tracking import Tracker

from conftest import ROOT, SHARED, need_shared

HH = SHARED / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
END_OF_TURN = 2  # <|im_end|>: SmolLM2's EOS and pad token


def smollm2_recipe(model_dir: Path, output_dir: Path) -> dict:
    hh = {"datasets": [{"path": str(HH), "format": "implicit_preference", "max_rows": 48}], "eval_split": 8}
    hh |= {"on_bad_rows": "drop", "max_length": 192}
    train_args = {
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-4,
        "activation_checkpointing": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "max_length": 192,
    }
    return {
        "name": "smollm2-test",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {
            "name_or_path": str(model_dir),
            "dtype": "float32",
            "quantization": {"mode": "4bit", "compute_dtype": "float32"},
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "chat_template": "tokenizer",
        "tracking": {"mode": "disabled"},
        "stages": [
            {"name": "sft", "type": "sft", "data": hh, "evaluation": {"num_prompts": 0}, "args": train_args},
            {
                "name": "reward",
                "type": "reward",
                "init_from": "sft",
                "data": hh,
                "evaluation": {"batch_size": 8, "stats_pairs": 16},
                "args": train_args,
            },
            {
                "name": "ppo",
                "type": "ppo",
                "init_from": "sft",
                "reward_from": "reward",
                "data": hh,
                "evaluation": {"num_prompts": 4, "max_new_tokens": 8, "batch_size": 4, "temperature": 1.0},
                "args": {
                    "num_iterations": 1,
                    "rollout_batch_size": 4,
                    "num_mini_batches": 2,
                    "num_ppo_epochs": 1,
                    "learning_rate": 1e-4,
                    "temperature": 1.0,
                    "max_new_tokens": 8,
                    "save_steps": None,
                },
            },
        ],
    }


@pytest.fixture(scope="module")
def pipeline(smollm2, tmp_path_factory):
    """SFT → reward → PPO on SmolLM2, a few steps each; returns the recipe and the run folder."""
    need_shared(HH)
    output_dir = tmp_path_factory.mktemp("smollm2") / "run"
    recipe = validate_recipe(smollm2_recipe(smollm2, output_dir))
    run_recipe(recipe)
    return recipe, output_dir


@pytest.fixture(scope="module")
def trainer(pipeline):
    """A PPO trainer holding the four roles on one 4-bit SmolLM2 base, as the stage builds them."""
    recipe, output_dir = pipeline
    stage = make_stage(recipe, recipe.stage("ppo"))
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    data = build_stage_data(recipe.stage("ppo").data, "prompt", 0, tokenizer)
    model, value_head, reward, stats = stage.build_roles(tokenizer, data)
    config = stage.args_class(**{**recipe.stage("ppo").args, "max_new_tokens": 24})
    return PPOTrainer(
        config, model, value_head, reward, tokenizer, data.splits[TRAIN], output_dir / "work", Tracker.disabled(),
        reward_stats=stats, seed=0,
    )  # fmt: skip


def test_the_pipeline_runs_on_a_chat_model_whose_pad_token_ends_its_turns(pipeline):
    recipe, output_dir = pipeline
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == END_OF_TURN
    assert stop_token_ids(tokenizer) == [END_OF_TURN] and tokenizer.decode(turn_suffix_ids(tokenizer)) == "\n"
    metrics = json.loads((output_dir / "ppo" / "metrics.json").read_text())
    for name in ("eval_initial", "eval"):
        assert 0 <= metrics[f"{name}/ended_share"] <= 1 and 1 <= metrics[f"{name}/response_length"] <= 8
        assert f"{name}/kl" in metrics and f"{name}/reward_score" in metrics
    assert metrics["eval_initial/kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the SFT policy
    assert "eval/reward_score_gain" in metrics and metrics["eval/reward_score_gain_ci95"] >= 0
    samples = [json.loads(line) for line in (output_dir / "ppo" / "samples" / "eval.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {"reward", "ended", "length"} <= set(samples[0])


def test_rollouts_stop_at_every_end_of_turn_id_and_keep_the_stop_token_in_the_mask(trainer):
    """The model's generation config lists a second stop token (the period, as a stand-in for Llama 3's
    `<|eot_id|>` beside `<|end_of_text|>`): responses stop at either; the stop token is the last real
    token, and the padding after it, though it is the end-of-turn id itself, is masked by position."""
    tokenizer, model = trainer.tokenizer, trainer.unwrapped
    period = tokenizer.convert_tokens_to_ids(".")
    model.get_base_model().generation_config.eos_token_id = [END_OF_TURN, period]
    try:
        torch.manual_seed(0)
        rollout = trainer.rollout(trainer._prompt_batch(0))
    finally:
        model.get_base_model().generation_config.eos_token_id = END_OF_TURN
    stops = {END_OF_TURN, period}
    for ids, mask, ended in zip(rollout.response_ids, rollout.response_mask, rollout.contains_eos, strict=True):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # one run of real tokens from the start
        real = ids[:length].tolist()
        assert not stops & set(real[:-1])  # nothing ran past a stop token
        assert bool(ended) == (real[-1] in stops)
        if ended:
            assert (ids[length:] == tokenizer.pad_token_id).all()
    assert rollout.contains_eos.any(), "no response stopped within 24 tokens"


def test_step_zero_ratio_is_one_and_kl_is_zero_with_the_models_own_template(trainer):
    torch.manual_seed(1)
    rollout = trainer.rollout(trainer._prompt_batch(1))
    assert "You are a helpful AI assistant named SmolLM" in trainer.tokenizer.decode(rollout.query_ids[0])
    mask = rollout.response_mask
    kl = core.kl_penalty(rollout.logprobs, rollout.reference_logprobs, "k1")
    assert torch.equal(kl * mask, torch.zeros_like(kl))
    start = rollout.query_ids.shape[1]
    new_logprobs = trainer._logprobs(POLICY, rollout.input_ids, rollout.attention_mask, start, 1.0)
    ratio = torch.exp(new_logprobs - rollout.logprobs)[mask.bool()]
    # The rollout scored the rows in micro-batches, this pass scores them all at once: float32 through 30
    # layers in other matrix shapes differs by about 1e-5 (measured up to 1.3e-5); a template, temperature or
    # sampling mismatch moves the ratio by orders of magnitude more.
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)


def test_the_reward_model_reads_the_sampled_ids_at_the_last_token(trainer, pipeline):
    """A finished response is scored as the reward stage trained: the template's closing newline after
    `<|im_end|>` is the last token. A response cut at the length limit is scored as sampled, without
    a closing it never wrote, so it scores differently from the same text rendered as a finished turn."""
    _, output_dir = pipeline
    tokenizer, model = trainer.tokenizer, trainer.unwrapped
    head = read_score_head(output_dir / "reward")
    prompts = [[{"role": "user", "content": "What is 2+2? Answer with a number."}]]
    with active_adapter(model, POLICY):
        full = sample(model, tokenizer, prompts, max_new_tokens=40)
        cut = sample(model, tokenizer, prompts, max_new_tokens=3)
    assert bool(full.ended[0]) and not bool(cut.ended[0])
    rewards = [trainer.reward(full).item(), trainer.reward(cut).item()]

    for responses, reward in zip((full, cut), rewards, strict=True):
        ids = responses.sampled_ids(0, turn_suffix_ids(tokenizer))
        assert ids[-1] == (198 if bool(responses.ended[0]) else responses.response_ids[0, -1].item())
        alone = torch.tensor([ids])
        expected = sequence_scores(model, head, alone, torch.ones_like(alone), adapter=REWARD)
        assert reward == pytest.approx(expected.item(), abs=1e-4)
    rendered = score_conversations(
        model,
        head,
        tokenizer,
        [prompts[0] + [{"role": "assistant", "content": text}] for text in (full.texts[0], cut.texts[0])],
        adapter=REWARD,
    )
    assert rendered[0] == pytest.approx(rewards[0], abs=1e-4)  # the stage's reading of a finished turn
    assert rendered[1] != pytest.approx(rewards[1], abs=1e-4)  # a cut answer is not a finished turn


def test_the_cpu_recipe_never_trains_on_its_held_out_rows(smollm2, monkeypatch):
    """recipes/instructgpt/smollm2-135m-hh.yaml: SFT answers, reward pairs and PPO prompts (each filtered
    by its own token limit) come from the rows outside the held-out split, which gives the reward
    model's held-out pairs and PPO's held-out prompts."""
    need_shared(HH)
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes" / "instructgpt" / "smollm2-135m-hh.yaml", [f"model.name_or_path={smollm2}"])
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    prompts = {}
    for stage, kind in (("sft", "sft"), ("reward", "preference"), ("ppo", "prompt")):
        splits = build_stage_data(recipe.stage(stage).data, kind, recipe.seed, tokenizer).splits
        prompts[stage] = {name: {json.dumps(row["prompt"]) for row in split} for name, split in splits.items()}
    held_out = prompts["reward"][EVAL] | prompts["ppo"][EVAL]
    assert len(prompts["reward"][EVAL]) >= 100 and len(prompts["ppo"][EVAL]) >= 64
    for stage in prompts:
        assert not prompts[stage][TRAIN] & held_out, stage


def test_exports_of_a_chat_model_whose_pad_token_ends_its_turns_load_and_score_as_the_suite(pipeline, tmp_path):
    """SmolLM2 pads with `<|im_end|>`, its end-of-turn token, which is where transformers' sequence classifiers
    look for padding. The exported reward model, batched and padded by its own tokenizer, still reads each
    conversation's last real token and gives the suite's rewards (same unquantized base, 1e-4); the exported
    PPO policy stops at `<|im_end|>` under plain `generate`."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from alignment import cli
    from alignment.models.loading import load_base_model
    from alignment.models.scoring import load_reward_role

    recipe, output_dir = pipeline
    reward_out, policy_out = tmp_path / "reward", tmp_path / "policy"
    assert cli.main(["export", str(output_dir / "reward"), str(reward_out), "--dtype", "float32"]) == 0
    assert cli.main(["export", str(output_dir / "ppo"), str(policy_out), "--dtype", "float32"]) == 0

    tokenizer = AutoTokenizer.from_pretrained(str(reward_out))
    assert tokenizer.pad_token_id == END_OF_TURN
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
        [{"role": "user", "content": "Tell me a joke about cats, please."}, {"role": "assistant", "content": "No."}],
    ]
    texts = [tokenizer.apply_chat_template(conversation, tokenize=False) for conversation in conversations]
    batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    assert (batch["input_ids"] == END_OF_TURN).any(dim=1).all()  # ends of turns and the padding share the id
    classifier = AutoModelForSequenceClassification.from_pretrained(str(reward_out)).eval()
    with torch.no_grad():
        exported = classifier(**batch).logits[:, 0].tolist()
    recipe.model.quantization.mode = "none"
    model, head = load_reward_role(load_base_model(recipe.model), output_dir / "reward")
    suite = score_conversations(model.eval(), head, tokenizer, conversations, adapter=REWARD)
    assert exported == pytest.approx(suite, abs=1e-4)

    policy = AutoModelForCausalLM.from_pretrained(str(policy_out)).eval()
    assert END_OF_TURN in policy.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    answer = policy.generate(**prompt, max_new_tokens=64, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert answer[-1].item() == END_OF_TURN or len(answer) == 64
    assert END_OF_TURN not in answer[:-1].tolist()  # nothing generated past the end of the turn
