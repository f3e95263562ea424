"""The embedded toy base ships with the package (issue 16): `toy` loads at once, builds nothing, and is
the pre-trained model the docs describe; a damaged or missing copy is refused with the command that fixes it."""

from __future__ import annotations

import shutil

import build_toy_base as builder
import pytest

from alignment.io import read_json
from alignment.models.loading import load_base_model, load_tokenizer, resolve_model_path
from alignment.models.sampling import stop_token_ids, turn_suffix_ids
from alignment.recipes.schema import ModelConfig
from alignment.toy import base
from alignment.toy.tasks import toy_rows


@pytest.fixture(autouse=True)
def fresh_shipped_check():
    base.shipped_toy_base.cache_clear()
    yield
    base.shipped_toy_base.cache_clear()


def test_toy_resolves_to_the_shipped_weights_their_hash_recorded_and_nothing_is_built(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(ModelConfig(name_or_path="toy"))
    assert folder == str(base.SHIPPED_DIR)
    manifest = read_json(base.SHIPPED_DIR / base.MANIFEST_FILE)
    assert manifest["version"] == builder.TOY_VERSION
    assert manifest["pretrain_steps"] == builder.PRETRAIN_STEPS
    assert base.weights_sha256(base.SHIPPED_DIR) == manifest["sha256"]
    assert not (tmp_path / "cache").exists()


def test_the_shipped_base_answers_the_bare_form_tasks_in_4bit_as_the_docs_say():
    """docs/benchmarks.md: 0.991 bare-form exact match on 350 held-out instances in 4-bit NF4."""
    config = ModelConfig(name_or_path="toy", dtype="float32")
    tokenizer = load_tokenizer(config, "chatml")
    model = load_base_model(config, gradient_checkpointing=False).eval()
    exact_match = builder.exact_match_by_family(model, tokenizer, toy_rows(140, seed=12345))
    print(f"toy base, bare form: {exact_match}")
    assert exact_match["all"] >= 0.95
    assert min(exact_match.values()) >= 0.85


def test_a_damaged_shipped_copy_is_refused_with_how_to_restore_it(tmp_path, monkeypatch):
    damaged = tmp_path / "weights"
    shutil.copytree(base.SHIPPED_DIR, damaged)
    (damaged / base.WEIGHTS_FILE).write_text("version https://git-lfs.github.com/spec/v1\n")
    monkeypatch.setattr(base, "SHIPPED_DIR", damaged)
    with pytest.raises(RuntimeError, match=r"does not match the sha256.*scripts/build_toy_base.py"):
        resolve_model_path(ModelConfig(name_or_path="toy"))


def test_missing_shipped_weights_are_refused_with_how_to_restore_them(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "SHIPPED_DIR", tmp_path / "not-shipped")
    with pytest.raises(FileNotFoundError, match=r"missing from .*not-shipped.*scripts/build_toy_base.py"):
        resolve_model_path(ModelConfig(name_or_path="toy"))


def test_the_builder_writes_a_base_with_its_manifest_and_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(builder, "PRETRAIN_STEPS", 2)
    folder = builder.build_toy_base(tmp_path / "built")
    manifest = read_json(folder / base.MANIFEST_FILE)
    assert manifest["pretrain_steps"] == 2 and manifest["seed"] == 0 and manifest["version"] == builder.TOY_VERSION
    assert manifest["sha256"] == base.weights_sha256(folder)


def test_the_toy_chat_template_spends_one_token_per_role_and_ends_turns_as_chatml_does():
    """The toy tokenizer's own template (the toy recipes' `chat_template: tokenizer`): a role token per
    turn and `<|im_end|>` after it, 4 tokens of scaffolding for a question and its answer where ChatML
    spells 21 byte by byte. The shipped tokenizer is the one the code builds."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path="toy"), "tokenizer")
    assert tokenizer.get_vocab() == builder.build_toy_tokenizer().get_vocab()
    assert tokenizer.chat_template == builder.TOY_CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "Reverse abc."}, {"role": "assistant", "content": "cba"}]
    rendered = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    content = len("Reverse abc.") + len("cba")
    assert len(rendered["input_ids"]) == content + 4
    assert tokenizer.decode(rendered["input_ids"]) == "<|user|>Reverse abc.<|im_end|><|assistant|>cba<|im_end|>"
    assert sum(rendered["assistant_masks"]) == len("cba") + 1  # the answer and its end-of-turn token are trained
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True, return_dict=True)
    assert tokenizer.convert_ids_to_tokens(prompt["input_ids"])[-1] == "<|assistant|>"
    assert (
        stop_token_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        and turn_suffix_ids(tokenizer) == []
    )
    assert max(tokenizer.get_vocab().values()) < read_json(base.SHIPPED_DIR / "config.json")["vocab_size"]
    chatml = load_tokenizer(ModelConfig(name_or_path="toy"), "chatml")
    assert len(chatml.apply_chat_template(conversation, return_dict=True)["input_ids"]) == content + 21
