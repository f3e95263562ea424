"""Preference pairs through the data layer: real HH-RLHF and ShareGPT pairs, every shape, bad rows."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from build_toy_base import build_toy_tokenizer

from alignment.data.build import EVAL, EVAL_HELD_OUT, TRAIN, build_stage_data
from alignment.data.formats import (
    ASSISTANT_MARKER,
    FORMATS,
    HUMAN_MARKER,
    RowContext,
    RowError,
    detect_format,
    split_transcript_pair,
    transcript_messages,
)
from alignment.data.loading import DataError
from alignment.models.chat_templates import apply_chat_template_choice
from alignment.recipes.schema import DatasetSpec, DataSpec
from alignment.toy.tasks import FAMILIES, wrong_answer

from conftest import SHARED, need_shared

HH = SHARED / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
DPO_DEMO = SHARED / "data" / "llamafactory-demo" / "dpo_en_demo.json"


def spec(*datasets: DatasetSpec, **kwargs) -> DataSpec:
    return DataSpec(datasets=list(datasets), **kwargs)


def write_json(path, rows) -> str:
    path.write_text(json.dumps(rows))
    return str(path)


def hh_rows() -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


# --- Real data ------------------------------------------------------------------------------


def test_all_2312_hh_pairs_load_and_the_four_empty_answers_are_dropped_and_counted():
    need_shared(HH)
    data = build_stage_data(spec(DatasetSpec(path=str(HH)), on_bad_rows="drop"), "preference", seed=0)
    report = data.report[0]
    assert report["format"] == "implicit_preference" and report["rows"] == 2312
    assert len(data.splits[TRAIN]) == 2308 and data.dropped == 4
    assert report["dropped"] == {"chosen: is empty": 4}
    example = data.splits[TRAIN][0]
    assert example["prompt"][-1]["role"] == "user"
    assert example["chosen"][0]["role"] == example["rejected"][0]["role"] == "assistant"

    with pytest.raises(DataError) as caught:
        build_stage_data(spec(DatasetSpec(path=str(HH))), "preference", seed=0)
    assert "harmless-base_test.jsonl.gz: row " in str(caught.value)
    assert "field 'chosen' is empty" in str(caught.value)


def test_hh_prompt_plus_each_response_gives_back_the_transcript_and_ends_at_the_last_human_turn():
    need_shared(HH)
    rows = hh_rows()
    for index, row in enumerate(rows):
        prompt, chosen, rejected = split_transcript_pair(row["chosen"], row["rejected"])
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"], index
        # The prompt ends with the Assistant marker that opens the answer, right after the last human turn.
        assert prompt.endswith(ASSISTANT_MARKER), index
        last_human = prompt.rfind(HUMAN_MARKER)
        assert last_human >= 0 and ASSISTANT_MARKER not in prompt[last_human : -len(ASSISTANT_MARKER)], index
        messages = transcript_messages(prompt, "chosen")
        assert messages[0]["role"] == "user" and messages[-1]["role"] == "user", index
        assert messages[-1]["content"] == prompt[last_human + len(HUMAN_MARKER) : -len(ASSISTANT_MARKER)].strip()
    # A multi-turn row: the earlier turns stay in the prompt, as alternating messages.
    multi_turn = next(row for row in rows if row["chosen"].count(HUMAN_MARKER) >= 3)
    example = FORMATS["implicit_preference"].convert("preference", multi_turn, RowContext())
    roles = [message["role"] for message in example["prompt"]]
    assert roles[:4] == ["user", "assistant", "user", "assistant"] and roles[-1] == "user"


def test_hh_pairs_render_with_the_recipes_chat_template():
    need_shared(HH)
    row = hh_rows()[0]
    example = FORMATS["implicit_preference"].convert("preference", row, RowContext())
    tokenizer = build_toy_tokenizer()
    apply_chat_template_choice(tokenizer, "chatml")  # as the Qwen2.5 and SmolLM2 recipes render HH
    text = tokenizer.apply_chat_template(example["prompt"] + example["chosen"], tokenize=False)
    assert "Human:" not in text and "Assistant:" not in text
    assert text.startswith("<|im_start|>user\nwhat are some pranks with a pen i can do?<|im_end|>\n")
    assert text.endswith(f"<|im_start|>assistant\n{example['chosen'][0]['content']}<|im_end|>\n")
    _, chosen, _ = split_transcript_pair(row["chosen"], row["rejected"])
    assert example["chosen"][0]["content"] == chosen.strip()


def test_all_300_sharegpt_pairs_load_with_system_prompts_and_multi_turn_context():
    need_shared(DPO_DEMO)
    rows = json.loads(DPO_DEMO.read_text())
    data = build_stage_data(spec(DatasetSpec(path=str(DPO_DEMO))), "preference", seed=0)
    assert data.report[0]["format"] == "sharegpt_pairs"
    assert len(data.splits[TRAIN]) == 300 and data.dropped == 0
    by_chosen = {example["chosen"][0]["content"]: example for example in data.splits[TRAIN]}
    for row in rows:
        example = by_chosen[row["chosen"]["value"]]
        assert example["rejected"] == [{"role": "assistant", "content": row["rejected"]["value"]}]
        assert [message["content"] for message in example["prompt"]] == [turn["value"] for turn in row["conversations"]]
        assert example["prompt"][-1]["role"] == "user"
    with_system = next(row for row in rows if row["conversations"][0]["from"] == "system")
    assert by_chosen[with_system["chosen"]["value"]]["prompt"][0]["role"] == "system"


# --- Every shape --------------------------------------------------------------------------


def convert(fmt: str, row: dict, kind: str = "preference", **ctx) -> dict:
    return FORMATS[fmt].convert(kind, row, RowContext(**ctx))


def test_explicit_pairs_in_text_messages_and_whole_conversations():
    text = convert("preference", {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"})
    assert text == {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris"}],
        "rejected": [{"role": "assistant", "content": "Rome"}],
        "group": "",
    }
    prompt = [{"role": "user", "content": "Capital of France?"}]
    messages = convert(
        "preference",
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "Paris"}],
            "rejected": [{"role": "assistant", "content": "Rome"}],
        },
    )
    assert messages == text
    # UltraFeedback-style: chosen and rejected repeat the prompt before the answer.
    whole = convert(
        "preference",
        {
            "prompt": "Capital of France?",
            "chosen": [*prompt, {"role": "assistant", "content": "Paris"}],
            "rejected": [*prompt, {"role": "assistant", "content": "Rome"}],
        },
    )
    assert whole == text
    # An HH-style prompt text is read as the conversation it is.
    hh = convert(
        "preference",
        {
            "prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:",
            "chosen": " ciao",
            "rejected": " no",
        },
    )
    assert [message["role"] for message in hh["prompt"]] == ["user", "assistant", "user"]
    with_system = convert("preference", {"prompt": "q", "chosen": "a", "rejected": "b"}, system="Be brief.")
    assert with_system["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_implicit_pairs_of_whole_conversations():
    context = [{"role": "user", "content": "2+2?"}]
    example = convert(
        "implicit_preference",
        {
            "chosen": [*context, {"role": "assistant", "content": "4"}],
            "rejected": [*context, {"role": "assistant", "content": "5"}],
        },
    )
    assert example["prompt"] == context and example["chosen"][0]["content"] == "4"
    with pytest.raises(RowError, match="share the conversation"):
        convert(
            "implicit_preference",
            {
                "chosen": [*context, {"role": "assistant", "content": "4"}],
                "rejected": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}],
            },
        )


def test_format_detection_prefers_the_format_with_the_most_fields():
    assert detect_format(["conversations", "chosen", "rejected"]).name == "sharegpt_pairs"
    assert detect_format(["conversations"]).name == "sharegpt"
    assert detect_format(["prompt", "chosen", "rejected"]).name == "preference"
    assert detect_format(["chosen", "rejected"]).name == "implicit_preference"


def test_column_mapping_for_other_names(tmp_path):
    rows = [{"question": f"q{i}", "good": f"yes {i}", "bad": f"no {i}"} for i in range(5)]
    path = write_json(tmp_path / "pairs.json", rows)
    mapped = DatasetSpec(path=path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    data = build_stage_data(spec(mapped), "preference", seed=0)
    assert data.report[0]["format"] == "preference" and len(data.splits[TRAIN]) == 5
    assert {example["chosen"][0]["content"] for example in data.splits[TRAIN]} == {f"yes {i}" for i in range(5)}


def test_preference_rows_also_give_sft_and_prompt_examples(tmp_path):
    path = write_json(tmp_path / "pairs.json", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    sft = build_stage_data(spec(DatasetSpec(path=path)), "sft", seed=0).splits[TRAIN][0]
    assert sft["completion"] == [{"role": "assistant", "content": "a"}]
    prompts = build_stage_data(spec(DatasetSpec(path=path)), "prompt", seed=0).splits[TRAIN][0]
    assert prompts["prompt"] == [{"role": "user", "content": "q"}]


def test_toy_pairs_put_the_right_answer_against_a_wrong_one_with_held_out_pairs():
    toy = DatasetSpec(path="toy", options={"rows": 140}, held_out_templates=1)
    data = build_stage_data(spec(toy, eval_split=0.2), "preference", seed=0)
    assert len(data.splits[TRAIN]) == 112 and len(data.splits[EVAL]) == len(data.splits[EVAL_HELD_OUT]) == 28
    for example in data.splits[TRAIN]:
        assert example["chosen"] != example["rejected"] and example["group"] in FAMILIES
    train_prompts = {example["prompt"][-1]["content"] for example in data.splits[TRAIN]}
    assert not train_prompts & {example["prompt"][-1]["content"] for example in data.splits[EVAL]}


def test_toy_wrong_answers_are_never_right_and_allow_no_single_shortcut():
    """Half the wrong answers are the family's own mistake, half generic slips: for upper case, many
    wrong answers are all capitals too, so a reward model cannot win by rewarding capitals."""
    for name, family in FAMILIES.items():
        rng = random.Random(name)
        inputs = [family.make_input(rng) for _ in range(300)]
        wrong = [wrong_answer(name, x, seed=0) for x in inputs]
        assert all(answer != family.solve(x) for x, answer in zip(inputs, wrong, strict=True)), name
        if family.solve(inputs[0]).isdigit():
            assert all(answer.isdigit() for answer in wrong), name  # never negative
    uppercase = FAMILIES["uppercase"]
    capitals = [
        wrong_answer("uppercase", x, 0).isupper() for x in (uppercase.make_input(random.Random(i)) for i in range(300))
    ]
    assert 0.3 < sum(capitals) / len(capitals) < 0.7


# --- Bad rows ---------------------------------------------------------------------------


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path):
    rows = [
        {"prompt": "q0", "chosen": "a", "rejected": "b"},
        {"prompt": "q1", "chosen": "same", "rejected": "same "},
        {"prompt": "q2", "chosen": "", "rejected": "b"},
        {"prompt": "q3", "chosen": "a", "rejected": "  "},
        {"prompt": "q4", "chosen": "a", "rejected": "c"},
    ]
    path = write_json(tmp_path / "pairs.json", rows)
    data = build_stage_data(spec(DatasetSpec(path=path), on_bad_rows="drop"), "preference", seed=0)
    assert len(data.splits[TRAIN]) == 2 and data.dropped == 3
    assert data.report[0]["dropped"] == {
        "rejected: is identical to chosen": 1,
        "chosen: is empty": 1,
        "rejected: is empty": 1,
    }
    assert data.metrics()["data/dropped_rows"] == 3
    identical = write_json(tmp_path / "identical.json", rows[:2])
    with pytest.raises(DataError, match=r"identical.json: row 1: field 'rejected' is identical to chosen"):
        build_stage_data(spec(DatasetSpec(path=identical)), "preference", seed=0)
    hh = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: hello"}
    with pytest.raises(RowError, match="identical"):
        convert("implicit_preference", hh)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "q", "chosen": "a"}, "row 1: field 'rejected' is missing"),
        ({"prompt": "q", "chosen": 5, "rejected": "b"}, "row 1: field 'chosen' expected a string, got int 5"),
        ({"prompt": "q", "chosen": "a", "rejected": ["b"]}, "row 1: field 'rejected[0]' expected a message mapping"),
        (
            {"prompt": "q", "chosen": {"role": "assistant", "content": 3}, "rejected": "b"},
            "row 1: field 'chosen[0].content'",
        ),
        (
            {"prompt": "q", "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            "row 1: field 'chosen' expected one assistant message",
        ),
    ],
)
def test_bad_input_names_the_row_and_field(tmp_path, row, message):
    rows = [{"prompt": "q0", "chosen": "a", "rejected": "b"}, row]
    path = write_json(tmp_path / "pairs.json", rows)
    with pytest.raises(DataError) as caught:
        build_stage_data(spec(DatasetSpec(path=path, format="preference")), "preference", seed=0)
    assert "pairs.json: " in str(caught.value) and message in str(caught.value)


def test_bad_transcripts_and_sharegpt_pairs_name_the_field(tmp_path):
    with pytest.raises(RowError, match="share no"):
        convert("implicit_preference", {"chosen": "hello", "rejected": "bye"})
    with pytest.raises(RowError, match="'rejected': expected a string, got int"):
        convert("implicit_preference", {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": 7})
    with pytest.raises(RowError, match="'conversations': must end with the human turn"):
        convert(
            "sharegpt_pairs",
            {
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
        )


def test_an_optional_margin_column_passes_through_and_is_checked(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "score_gap": 2}]
    path = write_json(tmp_path / "pairs.json", rows)
    data = build_stage_data(spec(DatasetSpec(path=path, columns={"margin": "score_gap"})), "preference", seed=0)
    assert data.splits[TRAIN][0]["margin"] == 2.0
    with pytest.raises(RowError, match="'margin': expected a number, got str"):
        convert("preference", {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"})
