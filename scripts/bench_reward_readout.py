"""How fast a toy reward model learns, outside the stage: one variant per run, accuracy on fresh pairs per epoch.

The reward stage takes minutes per setting; this loop trains the same thing (the toy base as a
one-label classifier, a LoRA adapter, the Bradley-Terry loss, on the reward recipe's own training
pairs) with every knob the stage does not have, and scores 999 pairs drawn with another seed after
each epoch, so variants compare on more than the stage's 300 held-out pairs. `--readout sum|mean`
scores every response token with the head and pools them, instead of reading the last token;
`softmin` takes a soft minimum of those token scores; `attention` reads the last token through the
suite's `AttentionScalarHead` (`--heads`, `--head-dim`, `--head-lr`, `--value-std`);
`--aux-sum W` reads the last token but adds W times the summed read-out's loss in training.
The "without sums" column leaves out the single-digit sums, which the stage's held-out pairs
hardly contain. It runs on a GPU when there is one (the sixth and seventh sessions' sweeps).
`--time-steps N` only times N training steps (ms per step) and stops.

    python scripts/bench_reward_readout.py                                 # LoRA from the base, 4 epochs
    python scripts/bench_reward_readout.py --init runs/toy-reward/sft      # from the SFT adapter
    python scripts/bench_reward_readout.py --readout sum --epochs 3
    python scripts/bench_reward_readout.py --init runs/toy-reward/sft --readout attention --heads 64 --head-dim 8 \
        --head-lr 1e-3 --center 0.01 --epochs 3
    python scripts/bench_reward_readout.py --bf16 --attn eager --time-steps 25
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from alignment.data.build import TRAIN, build_stage_data
from alignment.models.batching import encode_conversations
from alignment.models.heads import AttentionScalarHead
from alignment.models.loading import load_base_model, load_tokenizer
from alignment.recipes.load import load_recipe
from alignment.stages.reward import load_init_weights, pair_metrics
from alignment.toy.base import shipped_toy_base

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "toy" / "reward.yaml"
FRESH_SEED, FRESH_ROWS = 12345, 1000


def pairs_of(recipe_overrides: list[str], seed: int, tokenizer) -> list[tuple[list, list, str]]:
    recipe = load_recipe(RECIPE, recipe_overrides)
    data = build_stage_data(recipe.stage("reward").data, "preference", seed, tokenizer, 96)
    return [
        (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"], row["group"]) for row in data.splits[TRAIN]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default="base", help="'base' or a stage folder whose adapter to start from")
    parser.add_argument("--base", help="toy base folder (default: the cached toy base)")
    parser.add_argument("--rows", type=int, default=6000, help="toy rows of the reward recipe (5%% held out)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = rank); must match --init's")
    parser.add_argument("--alpha", type=float, default=0.0, help="LoRA alpha (default: the rank)")
    parser.add_argument("--loraplus-ratio", type=float, default=0.0, help="LoRA+: B matrices at this times the lr")
    parser.add_argument("--readout", choices=["last", "sum", "mean", "attention", "softmin"], default="last")
    parser.add_argument("--heads", type=int, default=64, help="--readout attention: attention heads")
    parser.add_argument("--head-dim", type=int, default=8, help="--readout attention: query/key size per head")
    parser.add_argument("--value-std", type=float, default=-1.0, help="--readout attention: values' init std")
    parser.add_argument("--center", type=float, default=0.0, help="reward-centering coefficient (as RewardConfig's)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--head-lr", type=float, default=0.0, help="learning rate of the attention head (default --lr)")
    parser.add_argument(
        "--aux-sum", type=float, default=0.0, help="with --readout last: add this times the summed read-out's loss"
    )
    parser.add_argument("--quantization", choices=["4bit", "none"], default="4bit")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (and 4-bit compute dtype)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh head's weights and of LoRA's init")
    parser.add_argument("--time-steps", type=int, default=0, help="time this many steps, then stop")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    recipe = load_recipe(RECIPE, [f"stages.reward.data.datasets.0.options.rows={args.rows}"])
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    train = pairs_of([f"stages.reward.data.datasets.0.options.rows={args.rows}"], recipe.seed, tokenizer)
    fresh = pairs_of(
        [f"stages.reward.data.datasets.0.options.rows={FRESH_ROWS}", "stages.reward.data.eval_split=1"],
        FRESH_SEED,
        tokenizer,
    )

    model_config = recipe.model
    model_config.quantization.mode = args.quantization
    model_config.quantization.compute_dtype = "bfloat16" if args.bf16 else "float32"
    model_config.name_or_path = str(args.base or shipped_toy_base())
    model_config.attn_implementation = args.attn
    model = load_base_model(model_config, auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha or args.rank,
        target_modules="all-linear",
        modules_to_save=["score"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, lora)
    if args.init != "base":
        load_init_weights(model, Path(args.init))
    device = next(model.parameters()).device
    attention_head = None
    if args.readout == "attention":
        attention_head = AttentionScalarHead(model.config.hidden_size, args.heads, args.head_dim).to(device)
        if args.value_std >= 0:
            torch.nn.init.normal_(attention_head.value_weight, std=args.value_std)
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if attention_head is not None:
        head_group = {"params": list(attention_head.parameters()), "lr": args.head_lr or args.lr}
        optimizer = torch.optim.AdamW(
            [{"params": list(trainable)}, head_group], lr=args.lr, weight_decay=args.weight_decay
        )
        trainable += head_group["params"]
    elif args.loraplus_ratio:
        from peft.optimizers import create_loraplus_optimizer

        optimizer = create_loraplus_optimizer(
            model, torch.optim.AdamW, lr=args.lr, loraplus_lr_ratio=args.loraplus_ratio
        )
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    total_steps = args.epochs * (len(train) // args.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * (1 - step / total_steps)
    )

    def rewards(conversations: list[list[dict]], readout: str = args.readout):
        """Rewards of a batch; for "last+sum", the last-token and the summed rewards."""
        batch = {key: value.to(device) for key, value in encode_conversations(tokenizer, conversations).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            if readout == "last":
                return model(**batch, use_cache=False).logits.squeeze(-1).float()
            output = model(**batch, use_cache=False, output_hidden_states=True)
            if readout == "attention":
                return attention_head.last_token_scores(output.hidden_states[-1].float(), batch["attention_mask"])
            token_scores = model.base_model.model.score(output.hidden_states[-1]).squeeze(-1).float()
        if readout == "softmin":
            response_mask = response_mask_of(batch, conversations)
            return -torch.logsumexp((-token_scores).masked_fill(response_mask == 0, -1e4), -1)
        if readout == "last+sum":
            return output.logits.squeeze(-1).float(), summed(token_scores, batch, conversations)
        return summed(token_scores, batch, conversations, readout == "mean")

    def response_mask_of(batch, conversations) -> torch.Tensor:
        response_mask = batch["attention_mask"].clone()
        for row, messages in enumerate(conversations):
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)
            response_mask[row, : len(prompt["input_ids"])] = 0
        return response_mask

    def summed(token_scores, batch, conversations, mean: bool = False) -> torch.Tensor:
        response_mask = response_mask_of(batch, conversations)
        pooled = (token_scores * response_mask).sum(-1)
        return pooled / response_mask.sum(-1) if mean else pooled

    def accuracy() -> dict[str, float]:
        """The stage's own pair metrics (accuracy overall and per family) on the fresh pairs."""
        model.eval()
        if attention_head is not None:
            attention_head.eval()
        chosen_rewards: list[float] = []
        rejected_rewards: list[float] = []
        with torch.no_grad():
            for start in range(0, len(fresh), 64):
                batch = fresh[start : start + 64]
                scores = rewards([chosen for chosen, _, _ in batch] + [rejected for _, rejected, _ in batch]).tolist()
                chosen_rewards += scores[: len(batch)]
                rejected_rewards += scores[len(batch) :]
        model.train()
        return pair_metrics(chosen_rewards, rejected_rewards, [family for _, _, family in fresh], "fresh")

    print(f"{len(train)} training pairs, {len(fresh)} fresh pairs; {vars(args)}")
    print("| epoch | wall time | accuracy | without sums | by family |")
    print("| --- | --- | --- | --- | --- |")
    started, step = time.time(), 0
    model.train()
    for epoch in range(args.epochs):
        random.Random(epoch + 1000 * args.seed).shuffle(train)
        for start in range(0, len(train) - args.batch_size + 1, args.batch_size):
            if args.time_steps and step == 5:
                timed_from = time.time()
            if args.time_steps and step == 5 + args.time_steps:
                print(f"{(time.time() - timed_from) / args.time_steps * 1000:.0f} ms per step")
                return
            batch = train[start : start + args.batch_size]
            conversations = [chosen for chosen, _, _ in batch] + [rejected for _, rejected, _ in batch]
            if args.aux_sum:
                scores, summed_scores = rewards(conversations, "last+sum")
                summed_margins = summed_scores[: len(batch)] - summed_scores[len(batch) :]
                auxiliary = -torch.nn.functional.logsigmoid(summed_margins).mean()
            else:
                scores, auxiliary = rewards(conversations), 0.0
            margins = scores[: len(batch)] - scores[len(batch) :]
            loss = -torch.nn.functional.logsigmoid(margins).mean() + args.aux_sum * auxiliary
            loss = loss + args.center * ((scores[: len(batch)] + scores[len(batch) :]) ** 2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            step += 1
        metrics = accuracy()
        overall = metrics.pop("fresh/pairwise_accuracy")
        sums = sum(family == "add" for _, _, family in fresh)
        without_sums = (overall * len(fresh) - metrics.get("fresh/pairwise_accuracy/add", 0.0) * sums) / (
            len(fresh) - sums
        )
        families = ", ".join(
            f"{key.rsplit('/', 1)[1]} {value:.2f}"
            for key, value in metrics.items()
            if key.startswith("fresh/pairwise_accuracy/")
        )
        print(
            f"| {epoch + 1} | {time.time() - started:.0f} s | {overall:.3f} | {without_sums:.3f} | {families} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
