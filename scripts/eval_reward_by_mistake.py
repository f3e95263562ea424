"""A toy reward model's pairwise accuracy per task family and kind of wrong answer.

Pairwise accuracy over all pairs hides shortcuts: a reward model can rank "2" above "3" for every
letter count because smaller counts are more often right, and still score well overall. Split by
the kind of mistake (off by +1 or -1, the input left unreversed, letters permuted, ...), such a
shortcut shows as one kind near 1.0 and its mirror near 0.0, and a family the model cannot verify
shows as its hard kinds near 0.5.

With `--likelihood`, the stage is a policy (SFT) stage and the judge is its own log-probability of
the assistant turn: whether the knowledge to rank a pair is in the language model at all, whatever
a reward model trained from it can read out at its last token.

    python scripts/eval_reward_by_mistake.py runs/toy-reward/reward [--rows 1400]
    python scripts/eval_reward_by_mistake.py runs/toy-reward/sft --likelihood
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable

import torch

from alignment.models.loading import load_trained_policy
from alignment.models.scoring import load_trained_reward_model, score_conversations
from alignment.names import REWARD
from alignment.ppo.core import response_logprobs
from alignment.toy.tasks import FAMILIES, toy_rows, wrong_answer

NUMBER_FAMILIES = ("add", "length", "count_a")


def mistake_kind(family: str, x: str, answer: str, wrong: str) -> str:
    """Names how `wrong` differs from `answer` (the corruptions of `alignment.toy.tasks`, seen from outside)."""
    if family in NUMBER_FAMILIES:
        offset = int(wrong) - int(answer)
        return f"off by {offset:+d}" if abs(offset) < 3 else "off by 3 or more"
    if wrong == x and family in ("reverse", "repeat"):
        return "input unchanged" if family == "reverse" else "said once"
    if len(wrong) == len(answer):
        if sorted(wrong) == sorted(answer):
            return "letters permuted"
        return "case changed" if wrong.lower() == answer.lower() else "letter replaced"
    if len(wrong) < len(answer):
        return "letter dropped" if len(wrong) == len(answer) - 1 else "cut short"
    return "letter added"


Judge = Callable[[list[list[dict]]], list[float]]


def reward_model_judge(stage_dir: str) -> Judge:
    model, head, tokenizer = load_trained_reward_model(stage_dir, REWARD)
    return lambda conversations: score_conversations(model, head, tokenizer, conversations, adapter=REWARD)


def likelihood_judge(stage_dir: str) -> Judge:
    """log pi(assistant turn | prompt) under a policy stage, one conversation at a time (no padding to get wrong)."""
    model, tokenizer = load_trained_policy(stage_dir)

    @torch.no_grad()
    def judge(conversations: list[list[dict]]) -> list[float]:
        scores = []
        for messages in conversations:
            prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=True)
            whole = tokenizer.apply_chat_template(messages, return_dict=True)
            input_ids = torch.tensor([whole["input_ids"]], device=model.device)
            logits = model(input_ids=input_ids).logits
            scores.append(response_logprobs(logits, input_ids, len(prompt["input_ids"])).sum().item())
        return scores

    return judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", help="a reward stage folder of a toy run (a policy stage with --likelihood)")
    parser.add_argument("--rows", type=int, default=1400, help="fresh instances, round-robin over the families")
    parser.add_argument("--likelihood", action="store_true", help="judge by a policy's log-probability of the answer")
    args = parser.parse_args()

    judge = likelihood_judge(args.stage) if args.likelihood else reward_model_judge(args.stage)
    rows = toy_rows(args.rows, seed=12345)
    wrong = [wrong_answer(row["family"], row["input"], seed=99) for row in rows]

    def conversations(answers: list[str]) -> list[list[dict]]:
        return [
            [
                {"role": "user", "content": FAMILIES[row["family"]].render(row["input"], 0)},
                {"role": "assistant", "content": answer},
            ]
            for row, answer in zip(rows, answers, strict=True)
        ]

    right_scores = judge(conversations([row["answer"] for row in rows]))
    wrong_scores = judge(conversations(wrong))
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for row, mistake, right, bad in zip(rows, wrong, right_scores, wrong_scores, strict=True):
        hits[(row["family"], mistake_kind(row["family"], row["input"], row["answer"], mistake))].append(right > bad)
    print("| family | wrong answer | pairs | right answer ranked higher |")
    print("| --- | --- | --- | --- |")
    for (family, kind), values in sorted(hits.items()):
        print(f"| {family} | {kind} | {len(values)} | {sum(values) / len(values):.2f} |")
    total = [value for values in hits.values() for value in values]
    print(f"| all | | {len(total)} | {sum(total) / len(total):.3f} |")


if __name__ == "__main__":
    main()
