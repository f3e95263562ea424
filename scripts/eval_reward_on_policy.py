"""How often a reward stage ranks the reference above a policy's own wrong answers, per group.

PPO needs exactly this: a reward model that prefers the right answer to the mistakes the policy
actually makes. The samples are a stage's greedy answers to held-out prompts (`samples/eval.jsonl`
of an SFT or PPO stage), so the prompts are ones neither stage trained on.

    python scripts/eval_reward_on_policy.py runs/toy-instructgpt/reward runs/toy-instructgpt/sft/samples/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from alignment.models.scoring import load_trained_reward_model, score_conversations
from alignment.names import REWARD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reward_stage", help="a reward stage folder")
    parser.add_argument("samples", help="a samples JSONL with prompt, response, reference, correct, group")
    args = parser.parse_args()

    model, head, tokenizer = load_trained_reward_model(args.reward_stage, REWARD)
    with open(args.samples) as handle:
        wrong = [row for row in map(json.loads, handle) if not row["correct"]]

    def conversations(field: str) -> list[list[dict]]:
        return [
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[field]}] for row in wrong
        ]

    reference_scores = score_conversations(model, head, tokenizer, conversations("reference"), adapter=REWARD)
    policy_scores = score_conversations(model, head, tokenizer, conversations("response"), adapter=REWARD)
    hits: dict[str, list[bool]] = defaultdict(list)
    for row, reference, policy in zip(wrong, reference_scores, policy_scores, strict=True):
        hits[row.get("group") or "-"].append(reference > policy)
    print("| group | wrong answers | reference ranked higher |")
    print("| --- | --- | --- |")
    for group, values in sorted(hits.items()):
        print(f"| {group} | {len(values)} | {sum(values) / len(values):.2f} |")
    total = [value for values in hits.values() for value in values]
    print(f"| all | {len(total)} | {sum(total) / max(len(total), 1):.2f} |")


if __name__ == "__main__":
    main()
