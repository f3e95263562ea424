"""The embedded toy base ships with the package (issue 16): `toy` loads at once, builds nothing, and is
the pre-trained model the docs describe; a damaged copy is refused with the command that fixes it."""

from __future__ import annotations

import shutil

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
    assert manifest["version"] == base.TOY_VERSION
    assert manifest["pretrain_steps"] == base.PRETRAIN_STEPS
    assert base.weights_sha256(base.SHIPPED_DIR) == manifest["sha256"]
    assert not (tmp_path / "cache").exists()


def test_the_shipped_base_answers_the_bare_form_tasks_in_4bit_as_the_docs_say():
    """docs/benchmarks.md: 0.991 bare-form exact match on 350 held-out instances in 4-bit NF4."""
    config = ModelConfig(name_or_path="toy", dtype="float32")
    tokenizer = load_tokenizer(config, "chatml")
    model = load_base_model(config, gradient_checkpointing=False).eval()
    exact_match = base.exact_match_by_family(model, tokenizer, toy_rows(140, seed=12345))
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


def test_without_shipped_weights_the_base_is_built_once_into_the_cache_with_its_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "SHIPPED_DIR", tmp_path / "not-shipped")
    monkeypatch.setattr(base, "PRETRAIN_STEPS", 2)
    monkeypatch.setenv("ALIGNMENT_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_path(ModelConfig(name_or_path="toy"))
    assert folder == str(tmp_path / "cache" / f"toy-base-{base.TOY_VERSION}")
    manifest = read_json(tmp_path / "cache" / f"toy-base-{base.TOY_VERSION}" / base.MANIFEST_FILE)
    assert manifest["pretrain_steps"] == 2 and manifest["seed"] == 0
    assert manifest["sha256"] == base.weights_sha256(tmp_path / "cache" / f"toy-base-{base.TOY_VERSION}")


def test_the_toy_chat_template_spends_one_token_per_role_and_ends_turns_as_chatml_does():
    """The toy tokenizer's own template (the toy recipes' `chat_template: tokenizer`): a role token per
    turn and `<|im_end|>` after it, 4 tokens of scaffolding for a question and its answer where ChatML
    spells 21 byte by byte. The shipped tokenizer is the one the code builds."""
    tokenizer = load_tokenizer(ModelConfig(name_or_path="toy"), "tokenizer")
    assert tokenizer.get_vocab() == base.build_toy_tokenizer().get_vocab()
    assert tokenizer.chat_template == base.TOY_CHAT_TEMPLATE
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
