"""Sampling responses from a chat model exactly as the log-probabilities later assume, and where turns end.

Three things a real chat model brings that a plain `generate` call gets wrong for RL:
- its `generation_config.json` adds logits processors (`repetition_penalty`, `no_repeat_ngram_size`,
  `min_p`, `suppress_tokens`, ...) that `generate` applies unless told otherwise, while PPO's
  log-probabilities assume plain softmax(logits / T); `sample` runs `generate` with a clean
  generation config, so only temperature and top-p act;
- a turn ends with other tokens than `eos_token` (Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`, a
  list in `generation_config.eos_token_id`); `stop_token_ids` gathers all of them;
- a chat template may close a turn with text after the end-of-turn token (ChatML's newline after
  `<|im_end|>`); `turn_suffix_ids` gives it, so that a reward model reads a sampled, finished answer
  at the same token it was trained at, and a cut one stays visibly unfinished.
Masks come from positions (everything up to and including the first stop token), never from
comparing ids with the pad id, which is the end-of-turn token itself in many chat models.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

_PROBE = "Probe answer 7"  # the content of an assistant turn rendered to find the template's turn ending


@dataclass
class Responses:
    """A batch of prompts and the responses sampled for them, as token ids and as text.

    `query_ids` are the rendered prompts, left-padded; `response_ids` are cut after the first stop
    token (padding after it); `response_mask` is 1 up to and including that stop token; `ended` says
    which responses stopped by themselves rather than at the length limit.
    """

    prompts: list[list[dict]]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    texts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_texts(cls, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]], answers: Sequence[str]):
        """Finished answers given as text, tokenized as the chat template renders them in a whole
        conversation (what a reward stage trains on), as if they had been sampled."""
        suffix = turn_suffix_ids(tokenizer)
        queries, responses = [], []
        for prompt, answer in zip(prompts, answers, strict=True):
            query = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
            full = tokenizer.apply_chat_template(
                [*prompt, {"role": "assistant", "content": answer}], tokenize=True, return_dict=True
            )
            query, full = query["input_ids"], full["input_ids"]
            if full[: len(query)] != query or (suffix and full[-len(suffix) :] != suffix):
                raise ValueError(f"the chat template does not render {answer!r} as a turn after its prompt")
            queries.append(query)
            responses.append(full[len(query) : len(full) - len(suffix)])
        query = tokenizer.pad({"input_ids": queries}, padding=True, padding_side="left", return_tensors="pt")
        response = tokenizer.pad({"input_ids": responses}, padding=True, padding_side="right", return_tensors="pt")
        ended = torch.ones(len(answers), dtype=torch.bool)
        return cls(list(prompts), query["input_ids"], query["attention_mask"], response["input_ids"],
                   response["attention_mask"], ended, list(answers))  # fmt: skip

    def select(self, rows: Sequence[int]) -> Responses:
        """These rows only, in this order."""
        index = torch.tensor(list(rows), dtype=torch.long)
        return Responses(
            [self.prompts[row] for row in rows], self.query_ids[index], self.query_mask[index],
            self.response_ids[index], self.response_mask[index], self.ended[index], [self.texts[row] for row in rows],
        )  # fmt: skip

    @classmethod
    def concatenate(cls, parts: Sequence[Responses], pad_id: int) -> Responses:
        """Several batches as one: prompts left-padded and responses right-padded to the widest part's."""
        query_width = max(part.query_ids.shape[1] for part in parts)
        response_width = max(part.response_ids.shape[1] for part in parts)

        def padded(tensors: list[torch.Tensor], width: int, left: bool, value: int) -> torch.Tensor:
            return torch.cat([
                torch.nn.functional.pad(t, (width - t.shape[1], 0) if left else (0, width - t.shape[1]), value=value)
                for t in tensors
            ])  # fmt: skip

        return cls(
            [prompt for part in parts for prompt in part.prompts],
            padded([part.query_ids for part in parts], query_width, True, pad_id),
            padded([part.query_mask for part in parts], query_width, True, 0),
            padded([part.response_ids for part in parts], response_width, False, pad_id),
            padded([part.response_mask for part in parts], response_width, False, 0),
            torch.cat([part.ended for part in parts]),
            [text for part in parts for text in part.texts],
        )

    def sampled_ids(self, row: int, turn_suffix: Sequence[int] = ()) -> list[int]:
        """Prompt and response tokens of one row, padding removed; a finished response gets `turn_suffix`."""
        query = self.query_ids[row][self.query_mask[row].bool()].tolist()
        response = self.response_ids[row][self.response_mask[row].bool()].tolist()
        return query + response + (list(turn_suffix) if bool(self.ended[row]) else [])


def _assistant_turn_tail(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the chat template renders after an assistant message's content."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}], tokenize=False
    )
    end = text.rfind(_PROBE)
    if end < 0:
        return []
    return tokenizer(text[end + len(_PROBE) :], add_special_tokens=False)["input_ids"]


def template_end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...)."""
    tail = _assistant_turn_tail(tokenizer)
    if tail and tail[0] in tokenizer.added_tokens_decoder:
        return tail[0]
    return None


def turn_suffix_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the template renders after the end-of-turn token (ChatML: a newline; Llama 3: nothing)."""
    tail = _assistant_turn_tail(tokenizer)
    return tail[1:] if template_end_of_turn_id(tokenizer) is not None else []


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module | None = None) -> list[int]:
    """Every token that ends a response: the tokenizer's EOS, the model's generation-config EOS list and
    the chat template's end-of-turn token."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation_config = getattr(_transformer(model), "generation_config", None) if model is not None else None
    configured = getattr(generation_config, "eos_token_id", None)
    if configured is not None:
        ids.update(int(token) for token in (configured if isinstance(configured, (list, tuple)) else [configured]))
    end_of_turn = template_end_of_turn_id(tokenizer)
    if end_of_turn is not None:
        ids.add(end_of_turn)
    if not ids:
        raise ValueError(
            "the tokenizer has no EOS token and the chat template no end-of-turn token: nothing ends a response"
        )
    return sorted(ids)


def truncate_after_eos(
    response_tokens: torch.Tensor, stop_ids: int | Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cuts each sampled response after its first stop token.

    Returns (tokens with everything after the first stop token set to `pad_id`, mask with 1 up to and
    including it, contains_eos per row). A row without a stop token keeps all its tokens; it hit the
    length limit. The mask comes from positions, so a pad id equal to a stop id changes nothing.
    """
    stops = torch.tensor([stop_ids] if isinstance(stop_ids, int) else list(stop_ids), device=response_tokens.device)
    is_stop = torch.isin(response_tokens, stops)
    contains_eos = is_stop.any(dim=1)
    length = response_tokens.shape[1]
    positions = torch.arange(length, device=response_tokens.device).expand_as(response_tokens)
    first_stop = torch.where(
        contains_eos, is_stop.int().argmax(dim=1), torch.full_like(contains_eos, length, dtype=torch.long)
    )
    mask = positions <= first_stop.unsqueeze(1)
    truncated_tokens = torch.where(mask, response_tokens, torch.full_like(response_tokens, pad_id))
    return truncated_tokens, mask.long(), contains_eos


def _transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under PEFT's wrappers: the one whose `generation_config` `generate` reads."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def plain_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hides the model's own generation config (its logits processors and defaults) for the duration."""
    transformer = _transformer(model)
    saved = transformer.generation_config
    transformer.generation_config = GenerationConfig()
    try:
        yield
    finally:
        transformer.generation_config = saved


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[dict]]) -> dict[str, torch.Tensor]:
    """Chat prompts rendered with the generation prompt and left-padded, so every response starts at one column."""
    texts = [tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) for prompt in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> Responses:
    """Responses to chat prompts from softmax(logits / temperature) (top-p truncated below 1), or greedy at 0.

    Only these settings act: the model's own generation config is hidden, so no repetition penalty or
    other processor changes the distribution that PPO's log-probabilities describe. Generation stops at
    every stop token of the model and template.
    """
    device = next(model.parameters()).device
    query = encode_prompts(tokenizer, prompts).to(device)
    stops = stop_token_ids(tokenizer, model)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with plain_generation_config(model):
        generated = model.generate(**query, generation_config=config)
    response_ids, response_mask, ended = truncate_after_eos(
        generated[:, query["input_ids"].shape[1] :], stops, tokenizer.pad_token_id
    )
    texts = [
        tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        for ids, mask in zip(response_ids, response_mask, strict=True)
    ]
    return Responses(
        list(prompts), query["input_ids"], query["attention_mask"], response_ids, response_mask, ended, texts
    )
