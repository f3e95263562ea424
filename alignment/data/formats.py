"""Row formats: how a dataset's rows read, checked and turned into the examples stages train on.

Every format turns a raw row into one of three example kinds, all conversational so that the
recipe's chat template renders them the same way in every stage:
- `sft`: {prompt: [messages], completion: [assistant message], reference, checker, group}
- `prompt`: {prompt: [messages], reference, checker, group} (PPO prompts, generation evaluation)
- `preference`: {prompt: [messages], chosen: [message], rejected: [message], group} (reward model, DPO),
  plus `margin` when the data has one
`reference` is the gold answer when there is one, `checker` names the function that compares a
generated answer against it, and `group` labels rows for per-group accuracy (a task family).
A format checks a row before converting it and raises RowError naming the field at fault.

Preference pairs come in three shapes: an explicit prompt (`prompt`/`chosen`/`rejected`, text or
messages), an implicit prompt (`chosen`/`rejected` only: whole transcripts, as in HH-RLHF, or whole
conversations, whose shared part is the prompt), and ShareGPT pairs (`conversations` plus a
`chosen` and a `rejected` message). Pairs that cannot teach a preference (an empty response, or
chosen identical to rejected) raise RowError, so `on_bad_rows: drop` drops and counts them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from alignment.data.templates import render_instruction
from alignment.plugins import load_plugins

KINDS = ("sft", "prompt", "preference")


class RowError(ValueError):
    """A problem with one row; `field` names the canonical field at fault."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"field '{field}': {message}")


@dataclass
class RowContext:
    """What a conversion needs besides the row: the template drawn for it and the system prompt."""

    template: str | None = None
    system: str | None = None
    checker: str | None = None
    seed: int = 0


def require_text(row: dict, name: str, allow_empty: bool = False) -> str:
    if name not in row or row[name] is None:
        raise RowError(name, "is missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    if not allow_empty and not value.strip():
        raise RowError(name, "is empty")
    return value


def optional_text(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__} {value!r:.60}")
    return value


def require_messages(row: dict, name: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    """Checks a list of chat messages and returns it with the standard `role`/`content` keys."""
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    roles.update({"bot": "assistant", "model": "assistant"})
    if name not in row or row[name] is None:
        raise RowError(name, "is missing")
    messages = row[name]
    if not isinstance(messages, list) or not messages:
        raise RowError(name, f"expected a non-empty list of messages, got {type(messages).__name__}")
    result = []
    for index, message in enumerate(messages):
        where = f"{name}[{index}]"
        if not isinstance(message, dict):
            raise RowError(where, f"expected a message mapping, got {type(message).__name__}")
        role, content = message.get(role_key), message.get(content_key)
        if role not in roles:
            raise RowError(f"{where}.{role_key}", f"unknown role {role!r}; expected one of {sorted(roles)}")
        if not isinstance(content, str):
            raise RowError(f"{where}.{content_key}", f"expected a string, got {type(content).__name__}")
        if not content.strip():
            raise RowError(f"{where}.{content_key}", "is empty")
        result.append({"role": roles[role], "content": content})
    return result


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    if system and (not messages or messages[0]["role"] != "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def split_last_answer(messages: list[dict], field_name: str) -> tuple[list[dict], list[dict]]:
    """Splits a conversation into its context and its last assistant turn (the trained completion)."""
    if messages[-1]["role"] != "assistant":
        raise RowError(field_name, "the last message must be the assistant's answer")
    if not any(message["role"] == "user" for message in messages[:-1]):
        raise RowError(field_name, "needs a user message before the answer")
    return messages[:-1], messages[-1:]


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def sft_example(prompt: list[dict], answer: str, ctx: RowContext, group: str = "") -> dict:
    return {
        "prompt": prompt,
        "completion": assistant(answer),
        "reference": answer,
        "checker": ctx.checker or "",
        "group": group,
    }


def prompt_example(prompt: list[dict], reference: str, ctx: RowContext, group: str = "") -> dict:
    return {"prompt": prompt, "reference": reference, "checker": ctx.checker or "", "group": group}


@dataclass
class Format:
    """A row format: its canonical fields, how to recognise it, and its converters by example kind."""

    name: str
    fields: tuple[str, ...]
    converters: dict[str, Callable[[dict, RowContext], dict]]
    uses_templates: bool = False
    default_checker: str | None = None
    optional_fields: tuple[str, ...] = field(default_factory=tuple)
    row_templates: Callable[[dict], tuple[str, ...] | None] | None = None  # a row's own templates, if it has any

    def convert(self, kind: str, row: dict, ctx: RowContext) -> dict:
        if kind not in self.converters:
            raise ValueError(f"format '{self.name}' gives no {kind} examples; it gives: {', '.join(self.converters)}")
        return self.converters[kind](row, ctx)


# --- Alpaca: instruction, optional input, output ----------------------------------------------


def _alpaca_prompt(row: dict, ctx: RowContext) -> list[dict]:
    instruction = require_text(row, "instruction")
    text_input = optional_text(row, "input")
    return with_system(user(render_instruction(ctx.template, instruction=instruction, input=text_input)), ctx.system)


def _alpaca_sft(row: dict, ctx: RowContext) -> dict:
    prompt = _alpaca_prompt(row, ctx)
    return sft_example(prompt, require_text(row, "output"), ctx)


def _alpaca_prompt_only(row: dict, ctx: RowContext) -> dict:
    return prompt_example(_alpaca_prompt(row, ctx), optional_text(row, "output"), ctx)


# --- Chat messages ----------------------------------------------------------------------------


def _messages_sft(row: dict, ctx: RowContext, name: str = "messages", **keys: str) -> dict:
    context, answer = split_last_answer(require_messages(row, name, **keys), name)
    return sft_example(with_system(context, ctx.system), answer[0]["content"], ctx)


def _messages_prompt(row: dict, ctx: RowContext, name: str = "messages", **keys: str) -> dict:
    messages = require_messages(row, name, **keys)
    reference = ""
    if messages[-1]["role"] == "assistant":
        messages, reference = messages[:-1], messages[-1]["content"]
    if not any(message["role"] == "user" for message in messages):
        raise RowError(name, "needs a user message")
    return prompt_example(with_system(messages, ctx.system), reference, ctx)


def _sharegpt_sft(row: dict, ctx: RowContext) -> dict:
    return _messages_sft(row, ctx, "conversations", role_key="from", content_key="value")


def _sharegpt_prompt(row: dict, ctx: RowContext) -> dict:
    return _messages_prompt(row, ctx, "conversations", role_key="from", content_key="value")


# --- Prompt / completion (plain text or chat messages) ----------------------------------------


def _as_messages(row: dict, name: str, role: str) -> list[dict]:
    value = row.get(name)
    if isinstance(value, list):
        return require_messages(row, name)
    return [{"role": role, "content": require_text(row, name)}]


def _prompt_completion_sft(row: dict, ctx: RowContext) -> dict:
    prompt = with_system(_as_messages(row, "prompt", "user"), ctx.system)
    completion = _as_messages(row, "completion", "assistant")
    if completion[-1]["role"] != "assistant":
        raise RowError("completion", "must end with an assistant message")
    return sft_example(prompt, completion[-1]["content"], ctx)


def _prompt_completion_prompt(row: dict, ctx: RowContext) -> dict:
    prompt = with_system(_as_messages(row, "prompt", "user"), ctx.system)
    reference = row.get("completion")
    return prompt_example(prompt, reference if isinstance(reference, str) else "", ctx)


# --- Preference pairs -------------------------------------------------------------------------

HUMAN_MARKER, ASSISTANT_MARKER = "\n\nHuman:", "\n\nAssistant:"
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")


def preference_example(prompt: list[dict], chosen: str, rejected: str, group: str = "") -> dict:
    """A checked pair; empty or identical responses are refused because they teach no preference."""
    if not chosen.strip():
        raise RowError("chosen", "is empty")
    if not rejected.strip():
        raise RowError("rejected", "is empty")
    if chosen.strip() == rejected.strip():
        raise RowError("rejected", "is identical to chosen")
    return {"prompt": prompt, "chosen": assistant(chosen), "rejected": assistant(rejected), "group": group}


def split_transcript_pair(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two whole transcripts (HH-RLHF) into their shared prompt and the two responses, text-exact.

    The prompt is the shared prefix up to and including its last `\n\nAssistant:` marker: it ends at
    the last human turn both transcripts share, and prompt + response gives back each transcript.
    """
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise RowError(
            "chosen",
            "chosen and rejected share no '\\n\\nAssistant:' turn; implicit-prompt pairs are whole "
            "'\\n\\nHuman: … \\n\\nAssistant: …' transcripts that differ only in the last answer",
        )
    end = cut + len(ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def looks_like_transcript(text: str) -> bool:
    return text.startswith((HUMAN_MARKER, HUMAN_MARKER.lstrip())) and ASSISTANT_MARKER in text


def transcript_messages(text: str, field_name: str) -> list[dict]:
    """`\n\nHuman: … \n\nAssistant: …` → chat messages; a final open `Assistant:` turn is dropped."""
    if text.startswith(HUMAN_MARKER.lstrip()):
        text = "\n\n" + text
    parts = _TRANSCRIPT_TURN.split(text)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        raise RowError(field_name, "expected a transcript that starts with '\\n\\nHuman:'")
    messages = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    return messages


def _any_messages(row: dict, name: str) -> list[dict]:
    """Chat messages with `role`/`content` or ShareGPT's `from`/`value` keys."""
    value = row.get(name)
    first = value[0] if isinstance(value, list) and value and isinstance(value[0], dict) else {}
    keys = {"role_key": "from", "content_key": "value"} if "from" in first else {}
    return require_messages(row, name, **keys)


def _prompt_messages(row: dict, name: str = "prompt") -> list[dict]:
    """A prompt given as messages, as a transcript (`\n\nHuman: …`), or as a plain user message."""
    if isinstance(row.get(name), list):
        messages = _any_messages(row, name)
    else:
        text = require_text(row, name)
        messages = transcript_messages(text, name) if looks_like_transcript(text) else user(text)
    if messages[-1]["role"] != "user":
        raise RowError(name, "must end with the user turn that the responses answer")
    return messages


def _response_text(row: dict, name: str, prompt: list[dict]) -> str:
    """A response given as text, one message, or messages (a leading copy of the prompt is skipped)."""
    value = row.get(name)
    if not isinstance(value, (list, dict)):
        return require_text(row, name, allow_empty=True)
    if isinstance(value, dict):
        value = [value]
    messages = _any_messages({name: value}, name)
    if len(messages) > len(prompt) and messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(
            name, f"expected one assistant message after the prompt, got roles {[m['role'] for m in messages]}"
        )
    return messages[0]["content"]


def _explicit_pair(row: dict, ctx: RowContext) -> tuple[list[dict], str, str]:
    prompt = _prompt_messages(row)
    chosen, rejected = _response_text(row, "chosen", prompt), _response_text(row, "rejected", prompt)
    return with_system(prompt, ctx.system), chosen, rejected


def _implicit_pair(row: dict, ctx: RowContext) -> tuple[list[dict], str, str]:
    if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
        chosen, rejected = _any_messages(row, "chosen"), _any_messages(row, "rejected")
        for name, messages in (("chosen", chosen), ("rejected", rejected)):
            if messages[-1]["role"] != "assistant":
                raise RowError(name, "must end with the assistant's answer")
        if chosen[:-1] != rejected[:-1]:
            raise RowError("rejected", "must share the conversation with chosen up to the last answer")
        prompt, chosen_text, rejected_text = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
        if not prompt:
            raise RowError("chosen", "needs a user message before the answer")
    else:
        prompt_text, chosen_text, rejected_text = split_transcript_pair(
            require_text(row, "chosen", allow_empty=True), require_text(row, "rejected", allow_empty=True)
        )
        prompt = transcript_messages(prompt_text, "chosen")
        chosen_text, rejected_text = chosen_text.strip(), rejected_text.strip()
    if prompt[-1]["role"] != "user":
        raise RowError("chosen", "the shared prompt must end with a user turn")
    return with_system(prompt, ctx.system), chosen_text, rejected_text


def _sharegpt_pair(row: dict, ctx: RowContext) -> tuple[list[dict], str, str]:
    prompt = _any_messages(row, "conversations")
    if prompt[-1]["role"] != "user":
        raise RowError("conversations", "must end with the human turn that chosen and rejected answer")
    prompt = with_system(prompt, optional_text(row, "system") or None)
    chosen, rejected = _response_text(row, "chosen", prompt), _response_text(row, "rejected", prompt)
    return with_system(prompt, ctx.system), chosen, rejected


def _margin(row: dict) -> float:
    """An optional per-pair margin (how much better chosen is), which the reward loss then asks for."""
    value = row["margin"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RowError("margin", f"expected a number, got {type(value).__name__} {value!r:.60}")
    return float(value)


def pair_converters(parse: Callable[[dict, RowContext], tuple[list[dict], str, str]]) -> dict[str, Callable]:
    """Preference pairs for the reward model and DPO; the chosen answer for SFT; the prompt for PPO."""

    def preference(row: dict, ctx: RowContext) -> dict:
        example = preference_example(*parse(row, ctx))
        if row.get("margin") is not None:
            example["margin"] = _margin(row)
        return example

    def sft(row: dict, ctx: RowContext) -> dict:
        prompt, chosen, _ = parse(row, ctx)
        if not chosen.strip():
            raise RowError("chosen", "is empty")
        return sft_example(prompt, chosen, ctx)

    def prompt_only(row: dict, ctx: RowContext) -> dict:
        return prompt_example(parse(row, ctx)[0], "", ctx)

    return {"preference": preference, "sft": sft, "prompt": prompt_only}


FORMATS: dict[str, Format] = {
    fmt.name: fmt
    for fmt in [
        Format(
            "alpaca",
            ("instruction", "output"),
            {"sft": _alpaca_sft, "prompt": _alpaca_prompt_only},
            uses_templates=True,
            optional_fields=("input",),
        ),
        Format("messages", ("messages",), {"sft": _messages_sft, "prompt": _messages_prompt}),
        Format("sharegpt", ("conversations",), {"sft": _sharegpt_sft, "prompt": _sharegpt_prompt}),
        Format(
            "prompt_completion",
            ("prompt", "completion"),
            {"sft": _prompt_completion_sft, "prompt": _prompt_completion_prompt},
        ),
        Format(
            "sharegpt_pairs",
            ("conversations", "chosen", "rejected"),
            pair_converters(_sharegpt_pair),
            optional_fields=("system", "margin"),
        ),
        Format(
            "preference",
            ("prompt", "chosen", "rejected"),
            pair_converters(_explicit_pair),
            optional_fields=("margin",),
        ),
        Format(
            "implicit_preference",
            ("chosen", "rejected"),
            pair_converters(_implicit_pair),
            optional_fields=("margin",),
        ),
    ]
}


def formats() -> dict[str, Format]:
    """Every format by name, the plugins' included."""
    load_plugins()
    return FORMATS


def detect_format(columns: list[str]) -> Format | None:
    """The first format whose canonical fields are all present (most specific formats first)."""
    for fmt in sorted(formats().values(), key=lambda f: -len(f.fields)):
        if all(name in columns for name in fmt.fields):
            return fmt
    return None


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt
