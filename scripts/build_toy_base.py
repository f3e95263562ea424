"""Builds the toy base that ships in `alignment/toy/weights`: a tiny Llama and a byte-level tokenizer,
pre-trained from this file's recipe and seed, with its sha256 in the folder's `manifest.json`.

InstructGPT starts from a pre-trained language model, so the toy base is pre-trained too: briefly,
on plain text about the suite's skills, mostly (60%) in a bare `family: input = answer` form, the rest as an
instruction phrasing followed by its answer, never inside a chat template and never with the last
(held-out) template of a family. The loss is on the answers only: the inputs are random letters, whose
loss is noise no model can reduce, and leaving it out learns the skills about three times faster
(reverse: 0.93 exact match after 2,250 steps, against 0.13 after 1,000 with the loss on every token).
Instruction tuning then has to teach the chat format and to answer as the assistant turn, and
phrasings held out of both stages measure generalisation.

Run it after changing the recipe (and bump `TOY_VERSION`); about 7 minutes on an idle 2-core CPU,
with a progress bar. The package only loads the result (`alignment.toy.base`).

    python scripts/build_toy_base.py [--out alignment/toy/weights] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from alignment.io import atomic_directory, read_json, write_json
from alignment.models.batching import pad_with_labels
from alignment.toy.base import MANIFEST_FILE, SHIPPED_DIR, weights_sha256
from alignment.toy.tasks import FAMILIES

TOY_VERSION = "v6"
PRETRAIN_STEPS = 3000
PRETRAIN_BATCH = 64
PRETRAIN_LR = 3e-3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
# The toy's own chat template marks each turn with one role token (ids after the bytes, inside the
# embedding rows the base was built with), so a conversation costs 4 tokens of scaffolding instead of
# ChatML's 21 spelled byte by byte: about a third of every toy sequence, and of the toy stages' compute.
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
TOY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOY_CONFIG = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
)


def build_toy_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte, so any text is representable and the vocabulary is tiny,
    plus the special tokens of the toy's chat template and of ChatML."""
    byte_alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: len(SPECIAL_TOKENS) + index for index, char in enumerate(byte_alphabet)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS + ROLE_TOKENS)  # the role tokens after the bytes
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        model_max_length=TOY_CONFIG["max_position_embeddings"],
    )
    tokenizer.chat_template = TOY_CHAT_TEMPLATE  # `chat_template: chatml` works too: its tokens are here
    return tokenizer


def build_toy_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    vocab_size = (len(tokenizer) + 15) // 16 * 16
    config = LlamaConfig(
        vocab_size=vocab_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TOY_CONFIG,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pretraining_text(rng: random.Random) -> tuple[str, str]:
    """One line of the toy pre-training corpus, as (text before the answer, answer)."""
    family = FAMILIES[rng.choice(sorted(FAMILIES))]
    x = family.make_input(rng)
    if rng.random() < 0.6:
        return bare_form({"family": family.name, "input": x}), family.solve(x)
    template = rng.randrange(len(family.templates) - 1)
    return f"{family.render(x, template)}\n", family.solve(x)


def pretraining_batch(rng: random.Random, tokenizer: PreTrainedTokenizerFast) -> dict[str, torch.Tensor]:
    """A right-padded batch whose labels are the answers and their end-of-text token."""
    sequences = []
    for _ in range(PRETRAIN_BATCH):
        question, answer = pretraining_text(rng)
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        sequences.append((question_ids + answer_ids, [-100] * len(question_ids) + answer_ids))
    return pad_with_labels(tokenizer, [ids for ids, _ in sequences], [labels for _, labels in sequences])


def pretrain_toy_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> float:
    """Full-weight pre-training on the primitive skills; returns the final loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * max(0.05, 1 - step / PRETRAIN_STEPS)
    )
    model.train()
    loss = torch.tensor(0.0)
    progress = tqdm(range(PRETRAIN_STEPS), desc="toy base: pre-training", mininterval=2.0)
    for step in progress:
        loss = model(**pretraining_batch(rng, tokenizer)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if step % 50 == 0 or step == PRETRAIN_STEPS - 1:
            progress.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


def bare_form(row: dict[str, str]) -> str:
    """A task instance in the pre-training corpus' plain form, which the base answers before any tuning."""
    return f"{row['family']}: {row['input']} = "


@torch.no_grad()
def exact_match_by_family(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, rows: list[dict], render: Any = bare_form
) -> dict[str, float]:
    """Greedy answers to `render(row)` prompts (no chat template), the first line checked against the answer;
    exact match per family and over all rows (`all`)."""
    tokenizer.padding_side = "left"
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(rows), 70):
        batch_rows = rows[start : start + 70]
        batch = tokenizer(
            [render(row) for row in batch_rows], return_tensors="pt", padding=True, add_special_tokens=False
        )
        output = model.generate(**batch, max_new_tokens=14, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, answer in zip(batch_rows, answers, strict=True):
            hits.setdefault(row["family"], []).append(answer.split("\n")[0].strip() == row["answer"])
    everything = [hit for values in hits.values() for hit in values]
    return {family: sum(values) / len(values) for family, values in hits.items()} | {
        "all": sum(everything) / len(everything)
    }


def build_toy_base(path: Path, seed: int = 0) -> Path:
    """Builds and pre-trains the toy base into `path` (atomically), with a manifest of how and its hash."""
    tokenizer = build_toy_tokenizer()
    model = build_toy_model(tokenizer, seed)
    final_loss = pretrain_toy_model(model, tokenizer, seed)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        manifest = {
            "version": TOY_VERSION,
            "seed": seed,
            "pretrain_steps": PRETRAIN_STEPS,
            "pretrain_batch": PRETRAIN_BATCH,
            "pretrain_lr": PRETRAIN_LR,
            "final_loss": round(final_loss, 4),
            "torch": torch.__version__,
            "sha256": weights_sha256(Path(tmp)),
        }
        write_json(Path(tmp) / MANIFEST_FILE, manifest)
    return path


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
