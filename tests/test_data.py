"""The data layer: real Alpaca files, every format, column mapping, mixtures, splits, templates, bad rows."""

from __future__ import annotations

import gzip
import json
import random

import pytest
from build_toy_base import PRETRAIN_BATCH, build_toy_tokenizer, pretraining_batch
from datasets import Dataset

from alignment.data.build import EVAL, EVAL_HELD_OUT, TRAIN, build_stage_data
from alignment.data.loading import DataError
from alignment.data.templates import BUILTIN_TEMPLATE_SETS
from alignment.recipes.schema import DatasetSpec, DataSpec
from alignment.recipes.validate import RecipeError

from conftest import ALPACA, ALPACA_DEMO, SHARED, need_shared


def spec(*datasets: DatasetSpec, **kwargs) -> DataSpec:
    return DataSpec(datasets=list(datasets), **kwargs)


def write_jsonl(path, rows, compress=False):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return str(path)


ALPACA_ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour", "input": "", "output": "red"},
]


def test_all_5000_alpaca_rows_load_and_the_two_empty_outputs_are_named():
    need_shared(ALPACA)
    with pytest.raises(DataError) as caught:
        build_stage_data(spec(DatasetSpec(path=str(ALPACA), format="alpaca")), "sft", seed=0)
    message = str(caught.value)
    assert "alpaca_5000.json" in message and "field 'output' is empty" in message and "row " in message
    rows = json.loads(ALPACA.read_text())
    empty = [index for index, row in enumerate(rows) if not row["output"].strip()]
    assert len(empty) == 2 and f"row {empty[0]}:" in message or f"row {empty[1]}:" in message

    data = build_stage_data(spec(DatasetSpec(path=str(ALPACA)), on_bad_rows="drop"), "sft", seed=0)
    assert len(data.splits[TRAIN]) == 4998 and data.dropped == 2
    assert data.report[0]["format"] == "alpaca" and data.report[0]["dropped"] == {"output: is empty": 2}
    example = data.splits[TRAIN][0]
    assert example["prompt"][-1]["role"] == "user" and example["completion"][0]["role"] == "assistant"


def test_all_999_llamafactory_alpaca_rows_load():
    need_shared(ALPACA_DEMO)
    data = build_stage_data(spec(DatasetSpec(path=str(ALPACA_DEMO), format="alpaca")), "sft", seed=0)
    assert len(data.splits[TRAIN]) == 999 and data.dropped == 0


def test_alpaca_input_is_rendered_with_the_instruction(tmp_path):
    data = build_stage_data(spec(DatasetSpec(path=write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS))), "sft", seed=0)
    by_answer = {row["reference"]: row for row in data.splits[TRAIN]}
    assert by_answer["5"]["prompt"] == [{"role": "user", "content": "Add\n\n2 and 3"}]
    assert by_answer["hi"]["prompt"] == [{"role": "user", "content": "Say hi"}]


def test_row_without_instruction_is_named(tmp_path):
    rows = [*ALPACA_ROWS, {"input": "", "output": "x"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 3: field 'instruction' is missing"):
        build_stage_data(spec(DatasetSpec(path=path, format="alpaca")), "sft", seed=0)


def test_wrong_type_is_named_even_when_arrow_refuses_the_file(tmp_path):
    rows = [*ALPACA_ROWS, {"instruction": "n", "input": "", "output": 5}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"mixed\.json: row 3: field 'output' expected a string, got int"):
        build_stage_data(spec(DatasetSpec(path=str(path), format="alpaca")), "sft", seed=0)


def test_over_long_rows_error_or_drop(tmp_path):
    rows = [*ALPACA_ROWS, {"instruction": "long " * 200, "input": "", "output": "y"}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    tokenizer = build_toy_tokenizer()
    with pytest.raises(DataError, match=r"row 3: field '<tokens>' is over-long: \d+ tokens > max_length 200"):
        build_stage_data(spec(DatasetSpec(path=path)), "sft", seed=0, tokenizer=tokenizer, max_length=200)
    data = build_stage_data(spec(DatasetSpec(path=path), on_bad_rows="drop"), "sft", 0, tokenizer, 200)
    assert len(data.splits[TRAIN]) == 3 and data.dropped == 1


@pytest.mark.parametrize(
    "rows, expected_format",
    [
        ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}], "messages"),
        ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}], "sharegpt"),
        ([{"prompt": "q", "completion": "a"}], "prompt_completion"),
        (
            [{"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}],
            "prompt_completion",
        ),
    ],
    ids=["messages", "sharegpt", "prompt-completion-text", "prompt-completion-chat"],
)
def test_formats_are_detected_and_converted(tmp_path, rows, expected_format):
    data = build_stage_data(spec(DatasetSpec(path=write_jsonl(tmp_path / "d.jsonl", rows))), "sft", seed=0)
    example = data.splits[TRAIN][0]
    assert data.report[0]["format"] == expected_format
    assert example["prompt"] == [{"role": "user", "content": "q"}]
    assert example["completion"] == [{"role": "assistant", "content": "a"}]


def test_multi_turn_messages_train_on_the_last_answer_with_system_prompt(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "1"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "3"},
                {"role": "assistant", "content": "4"},
            ]
        }
    ]
    dataset = DatasetSpec(path=write_jsonl(tmp_path / "m.jsonl", rows), system="Be brief.")
    example = build_stage_data(spec(dataset), "sft", seed=0).splits[TRAIN][0]
    assert [m["content"] for m in example["prompt"]] == ["Be brief.", "1", "2", "3"]
    assert example["completion"][0]["content"] == "4"


def test_column_mapping_needs_no_code(tmp_path):
    rows = [{"question": "2+2?", "answer": "4"}, {"question": "3+3?", "answer": "6"}]
    dataset = DatasetSpec(
        path=write_jsonl(tmp_path / "qa.jsonl", rows),
        format="alpaca",
        columns={"instruction": "question", "output": "answer"},
    )
    data = build_stage_data(spec(dataset), "sft", seed=0)
    assert sorted(row["reference"] for row in data.splits[TRAIN]) == ["4", "6"]
    bad = DatasetSpec(path=dataset.path, format="alpaca", columns={"instruction": "query"})
    with pytest.raises(DataError, match="columns.instruction names column 'query'"):
        build_stage_data(spec(bad), "sft", seed=0)


@pytest.mark.parametrize("kind", ["jsonl.gz", "parquet", "csv"])
def test_local_file_kinds(tmp_path, kind):
    if kind == "jsonl.gz":
        path = write_jsonl(tmp_path / "a.jsonl.gz", ALPACA_ROWS, compress=True)
    elif kind == "parquet":
        path = str(tmp_path / "a.parquet")
        Dataset.from_list(ALPACA_ROWS).to_parquet(path)
    else:
        path = str(tmp_path / "a.csv")
        Dataset.from_list(ALPACA_ROWS).to_csv(path)
    data = build_stage_data(spec(DatasetSpec(path=path, format="alpaca")), "sft", seed=0)
    assert sorted(row["reference"] for row in data.splits[TRAIN]) == ["5", "hi", "red"]


def test_unknown_format_and_undetectable_columns(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"foo": "bar"}])
    with pytest.raises(DataError, match=r"cannot tell the format from the columns \['foo'\]"):
        build_stage_data(spec(DatasetSpec(path=path)), "sft", seed=0)
    with pytest.raises(DataError, match="unknown format 'alpacca'"):
        build_stage_data(spec(DatasetSpec(path=path, format="alpacca")), "sft", seed=0)


def test_mixture_weights_and_held_out_split(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(100)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(40)])
    data = build_stage_data(
        spec(DatasetSpec(path=first, weight=0.5), DatasetSpec(path=second, weight=2.0), eval_split=0.1), "sft", 0
    )
    sources = [row["source"] for row in data.splits[TRAIN]]
    assert sources.count(first) == 45 and sources.count(second) == 72  # 90 * 0.5 and 36 * 2
    assert len(data.splits[EVAL]) == 14
    train_prompts = {row["prompt"][0]["content"] for row in data.splits[TRAIN]}
    assert not train_prompts & {row["prompt"][0]["content"] for row in data.splits[EVAL]}
    again = build_stage_data(
        spec(DatasetSpec(path=first, weight=0.5), DatasetSpec(path=second, weight=2.0), eval_split=0.1), "sft", 0
    )
    assert again.splits[TRAIN].to_list() == data.splits[TRAIN].to_list()  # seeded, reproducible


def test_a_held_out_prompt_is_never_trained_on_under_another_answer(tmp_path):
    """HH-RLHF repeats opening questions with other continuations: a training row whose prompt text is held
    out (here every prompt appears three times with different answers) is dropped, with the reason counted."""
    rows = [{"instruction": f"task {i % 20}", "output": f"answer {i}"} for i in range(60)]
    data = build_stage_data(spec(DatasetSpec(path=write_jsonl(tmp_path / "r.jsonl", rows)), eval_split=6), "sft", 0)
    held_out = {row["prompt"][0]["content"] for row in data.splits[EVAL]}
    trained = [row["prompt"][0]["content"] for row in data.splits[TRAIN]]
    assert len(data.splits[EVAL]) == 6 and not held_out & set(trained)
    assert len(trained) == 60 - 6 - data.report[0]["dropped"]["prompt is held out"]
    assert data.report[0]["dropped"]["prompt is held out"] == 3 * len(held_out) - 6
    assert data.report[0][TRAIN] == len(trained) and data.metrics()["data/dropped_rows"] == 3 * len(held_out) - 6


def test_split_is_the_same_wherever_the_file_lives(tmp_path):
    """The shuffle is seeded by the file's name, so CI and a laptop hold out the same rows."""
    rows = [{"instruction": f"task {i}", "output": "x"} for i in range(60)]
    splits = []
    for folder in ("here", "elsewhere/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        path = write_jsonl(tmp_path / folder / "rows.jsonl", rows)
        data = build_stage_data(spec(DatasetSpec(path=path), eval_split=0.2), "sft", seed=0)
        splits.append([row["prompt"][0]["content"] for row in data.splits[EVAL]])
    assert len(splits[0]) == 12 and splits[0] == splits[1]
    renamed = write_jsonl(tmp_path / "other.jsonl", rows)
    other = build_stage_data(spec(DatasetSpec(path=renamed), eval_split=0.2), "sft", seed=0)
    assert [row["prompt"][0]["content"] for row in other.splits[EVAL]] != splits[0]  # the name does seed it


def test_flan_templates_with_held_out_phrasings(tmp_path):
    rows = [{"instruction": f"Task {i}", "input": f"in {i}", "output": "o"} for i in range(200)]
    dataset = DatasetSpec(path=write_jsonl(tmp_path / "t.jsonl", rows), templates="flan", held_out_templates=2)
    data = build_stage_data(spec(dataset, eval_split=0.2), "sft", seed=3)
    flan = BUILTIN_TEMPLATE_SETS["flan"]
    held_out_prefixes = ("Please do the following:", "Task: Task")
    train_texts = [row["prompt"][0]["content"] for row in data.splits[TRAIN]]
    held_texts = [row["prompt"][0]["content"] for row in data.splits[EVAL_HELD_OUT]]
    assert not any(text.startswith(held_out_prefixes) for text in train_texts)
    assert all(text.startswith(held_out_prefixes) for text in held_texts)
    assert len({text.split("Task")[0] for text in train_texts}) > 1  # several seen templates are used
    assert len(data.splits[EVAL_HELD_OUT]) == len(data.splits[EVAL]) == 40
    assert len(flan) == 6


def test_toy_suite_splits_instances_and_templates():
    data = build_stage_data(
        spec(DatasetSpec(path="toy", options={"rows": 700}, held_out_templates=1), eval_split=0.1), "sft", seed=0
    )
    train, held = data.splits[TRAIN], data.splits[EVAL_HELD_OUT]
    assert len(train) == 630 and len(held) == 70
    train_inputs = {(r["group"], r["prompt"][0]["content"]) for r in train}
    assert not train_inputs & {(r["group"], r["prompt"][0]["content"]) for r in data.splits[EVAL]}
    assert all(row["checker"] == "exact" and row["reference"] for row in train)
    assert len({row["group"] for row in train}) == 7


def test_toy_pretraining_batch_puts_the_loss_on_answers_only():
    tokenizer = build_toy_tokenizer()
    batch = pretraining_batch(random.Random(0), tokenizer)
    assert batch["input_ids"].shape[0] == PRETRAIN_BATCH
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        text = tokenizer.decode(ids[mask.bool()])
        answer = tokenizer.decode(labels[labels != -100])
        question = text[: len(text) - len(answer)]
        assert text.endswith(answer) and answer.endswith(tokenizer.eos_token)
        assert (
            question.endswith((" = ", "\n"))
            and answer[: -len(tokenizer.eos_token)].strip() == answer[: -len(tokenizer.eos_token)]
        )
        assert (labels[~mask.bool()] == -100).all()  # padding is never a label


def test_a_hub_dataset_loads_from_its_subfolder_at_a_pinned_revision(tmp_path, monkeypatch):
    """`path: owner/name` with `data_dir` and `revision`, through `datasets` against a local server that
    speaks the hub's protocol (the hub itself is out of reach here): HH-RLHF's harmless-base test file,
    uploaded under `harmless-base/`, loads whole at the commit that uploaded it; a revision the repo does
    not have is an error naming the dataset and the revision."""
    import shutil

    from hub_server import HubProtocolServer
    from huggingface_hub import HfApi

    from alignment.data.loading import load_raw

    hh = SHARED / "data" / "hh-rlhf" / "harmless-base_test.jsonl.gz"
    need_shared(hh)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    (tmp_path / "upload" / "harmless-base").mkdir(parents=True)
    shutil.copy(hh, tmp_path / "upload" / "harmless-base" / "test.jsonl.gz")
    with HubProtocolServer(tmp_path / "hub") as hub:
        for module, name, value in hub.client_settings(tmp_path / "cache"):
            monkeypatch.setattr(module, name, value)
        HfApi().create_repo("me/hh-rlhf", repo_type="dataset")
        commit = (
            HfApi().upload_folder(folder_path=str(tmp_path / "upload"), repo_id="me/hh-rlhf", repo_type="dataset").oid
        )
        spec = DatasetSpec(path="me/hh-rlhf", data_dir="harmless-base", revision=commit, split="test")
        rows, columns = load_raw(spec, seed=0)
        with pytest.raises(DataError, match="me/hh-rlhf: cannot load from the hub .*revision 'v9'"):
            load_raw(DatasetSpec(path="me/hh-rlhf", data_dir="harmless-base", revision="v9", split="test"), seed=0)
    with gzip.open(hh, "rt") as file:
        expected = [json.loads(line) for line in file if line.strip()]
    assert columns == ["chosen", "rejected"] and rows == expected
    assert ("GET", f"/datasets/me/hh-rlhf/resolve/{commit}/harmless-base/test.jsonl.gz") in hub.requests


def test_data_dir_and_revision_are_for_hub_datasets_only():
    with pytest.raises(RecipeError, match="data_dir: only a hub dataset has one; toy is"):
        DatasetSpec(path="toy", data_dir="x")
    with pytest.raises(RecipeError, match="revision: only a hub dataset has one; data/train.jsonl is"):
        DatasetSpec(path="data/train.jsonl", revision="main")
