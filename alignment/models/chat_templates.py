"""Built-in chat templates, and choosing the template a run uses.

Assistant content is wrapped in `{% generation %}` markers so that TRL's assistant-only loss works
on multi-turn data. Each template ends the assistant turn with the tokenizer's end-of-turn token,
which generation stops at.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' }}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)

BUILTIN_CHAT_TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA}
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def apply_chat_template_choice(tokenizer: PreTrainedTokenizerBase, choice: str) -> None:
    """Sets the tokenizer's template: `tokenizer` (its own), a built-in name, or a Jinja string."""
    if choice == "tokenizer":
        if not tokenizer.chat_template:
            raise ValueError(
                "chat_template: 'tokenizer' asks for the tokenizer's own template, but this tokenizer has none; "
                f"use a built-in one ({', '.join(BUILTIN_CHAT_TEMPLATES)}) or a Jinja string"
            )
        return
    if choice == "chatml":
        missing = [token for token in CHATML_TOKENS if token not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"chat_template: 'chatml' needs the tokens {missing}, which this tokenizer lacks; "
                "use 'alpaca' (plain text markers) or the tokenizer's own template"
            )
        tokenizer.chat_template = CHATML
        tokenizer.eos_token = "<|im_end|>"
        return
    tokenizer.chat_template = BUILTIN_CHAT_TEMPLATES.get(choice, choice)
