"""SFT end to end on a real pre-trained checkpoint: stories260k in 4-bit NF4 with LoRA, on real Alpaca rows.

Also reads back what the offline W&B run wrote, and what the stage folder holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import HubProtocolServer
from transformers import AutoModelForCausalLM, AutoTokenizer

from alignment import cli
from alignment.evaluation.generation import generate_answers
from alignment.models.loading import attach_adapter, load_base_model, load_stage_recipe, load_trained_policy
from alignment.recipes.load import validate_recipe
from alignment.recipes.schema import GenerationEvalConfig
from alignment.runner import run_recipe
from alignment.tracking import read_offline_run

from conftest import ALPACA, STORIES, need_shared


def stories_recipe(output_dir: Path, tracking_mode: str = "offline", **args) -> dict:
    return {
        "name": "stories-sft",
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {
            "name_or_path": str(STORIES),
            "dtype": "float32",
            "quantization": {"mode": "4bit", "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "chat_template": "alpaca",
        "tracking": {"project": "alignment-tests", "mode": tracking_mode, "tags": ["test"]},
        "stages": [
            {
                "name": "sft",
                "type": "sft",
                "data": {
                    "datasets": [{"path": str(ALPACA), "format": "alpaca", "max_rows": 96}],
                    "eval_split": 16,
                    "on_bad_rows": "drop",
                },
                "evaluation": {"num_prompts": 4, "max_new_tokens": 8, "batch_size": 4},
                "args": {
                    "max_steps": 12,
                    "per_device_train_batch_size": 8,
                    "learning_rate": 1e-2,
                    "logging_steps": 1,
                    "max_length": 256,
                    "activation_checkpointing": False,
                    "save_strategy": "no",
                    **args,
                },
            }
        ],
    }


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory):
    need_shared(STORIES)
    need_shared(ALPACA)
    output_dir = tmp_path_factory.mktemp("stories") / "run"
    recipe = validate_recipe(stories_recipe(output_dir))
    metrics = run_recipe(recipe)["sft"]
    return output_dir, metrics


def test_loss_falls_on_real_alpaca_rows_in_4bit(stories_run):
    output_dir, metrics = stories_run
    config = json.loads((output_dir / "sft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["peft_type"] == "LORA"
    history = json.loads((output_dir / "sft" / "metrics.json").read_text())
    assert history["train/loss"] > 0 and "eval/loss" in history and "eval/mean_token_accuracy" in history
    log_history = json.loads((output_dir / "sft" / "log_history.json").read_text())
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses


def test_stage_folder_holds_adapter_tokenizer_recipe_metrics_manifest(stories_run):
    output_dir, _ = stories_run
    stage = output_dir / "sft"
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "recipe.yaml",
        "metrics.json",
        "manifest.json",
        "log_history.json",
    ):
        assert (stage / name).exists(), name
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["type"] == "sft"
    assert manifest["started_at"] <= manifest["finished_at"]
    assert {"torch", "transformers", "trl", "peft", "datasets", "bitsandbytes"} <= set(manifest["versions"])
    assert manifest["inputs"]["datasets"] == [str(ALPACA)]
    assert yaml.safe_load((stage / "recipe.yaml").read_text())["name"] == "stories-sft"
    assert not (output_dir / ".work" / "sft").exists()  # the work folder goes once the output is whole


def test_saved_adapter_reloads_and_generates(stories_run):
    output_dir, _ = stories_run
    model, tokenizer = load_trained_policy(output_dir / "sft")
    assert model.peft_config["default"].r == 8
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    assert tokenizer.chat_template and "### Response" in tokenizer.chat_template
    samples = [json.loads(line) for line in (output_dir / "sft" / "samples" / "eval.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    prompts = [[{"role": "user", "content": sample["prompt"]}] for sample in samples]
    answers = generate_answers(model, tokenizer, prompts, GenerationEvalConfig(max_new_tokens=8))
    assert answers == [sample["response"] for sample in samples]  # the reloaded adapter is the trained one


def test_offline_wandb_run_holds_config_metrics_and_samples(stories_run):
    output_dir, _ = stories_run
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_offline_run(runs[0])
    assert logged["run"] == {
        "name": "stories-sft/sft",
        "group": "stories-sft",
        "job_type": "sft",
        "project": "alignment-tests",
        "tags": ["test"],
    }
    assert logged["config"]["recipe"]["name"] == "stories-sft"
    assert logged["config"]["stage"]["args"]["max_steps"] == 12
    assert logged["config"]["learning_rate"] == 0.01  # TRL's arguments land in the same run
    steps = [row["train/loss"] for row in logged["history"] if "train/loss" in row]
    assert len(steps) == 12
    metrics = json.loads((output_dir / "sft" / "metrics.json").read_text())
    assert logged["summary"]["eval/loss"] == pytest.approx(metrics["eval/loss"])
    assert logged["summary"]["data/dropped_rows"] == metrics["data/dropped_rows"] > 0
    assert logged["summary"]["eval/samples"]["_type"] == "table-file"
    tables = list((runs[0] / "files" / "media" / "table").rglob("*.table.json"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["prompt", "response", "reference", "correct", "group"] and len(table["data"]) == 4


def test_an_exported_sft_stage_loads_with_plain_transformers_and_gives_the_suites_logits(stories_run, tmp_path):
    """`alignment export`: the LoRA merged into the unquantized base. Plain transformers' logits equal the
    suite's own loading of the same unquantized base with the adapter (1e-4); against the 4-bit model the
    stage trained on they differ by the base's NF4 quantization error (relative error below 0.2)."""
    output_dir, _ = stories_run
    stage = output_dir / "sft"
    assert cli.main(["export", str(stage), str(tmp_path / "exported"), "--dtype", "float32"]) == 0
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "exported"))
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(stage)).chat_template  # the training template
    assert tokenizer.eos_token_id in exported.generation_config.eos_token_id
    assert not any(".lora_" in name for name, _ in exported.named_parameters())  # merged, nothing left to load

    recipe = load_stage_recipe(stage)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short story about a cat."}], add_generation_prompt=True,
        tokenize=True, return_dict=True, return_tensors="pt",
    )  # fmt: skip
    logits = {}
    for mode in ("none", "4bit"):
        recipe.model.quantization.mode = mode
        model = attach_adapter(load_base_model(recipe.model), "default", from_path=stage, trainable=False).eval()
        with torch.no_grad():
            logits[mode] = model(**ids).logits
    with torch.no_grad():
        plain = exported(**ids).logits
    torch.testing.assert_close(plain, logits["none"], atol=1e-4, rtol=1e-4)
    relative_error = ((plain - logits["4bit"]).norm() / logits["4bit"].norm()).item()
    print(f"exported vs the 4-bit model trained on: relative logit error {relative_error:.3f}")
    # NF4's rounding of stories260k's base: 0.08 measured; the base without the adapter is 0.41 away.
    assert relative_error < 0.2


def test_an_export_carries_a_model_card_with_its_lineage_metrics_and_how_to_load_it(stories_run, tmp_path):
    """README.md: the metadata block the hub reads (read back with huggingface_hub's own parser), the stage's
    metrics as in its metrics.json, and a loading snippet naming the folder."""
    from huggingface_hub import ModelCard

    output_dir, _ = stories_run
    out = tmp_path / "exported"
    assert cli.main(["export", str(output_dir / "sft"), str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["alignment", "sft"]
    assert card.data.base_model is None  # a local folder, not a hub id the hub could link to
    metrics = json.loads((output_dir / "sft" / "metrics.json").read_text())
    assert "| eval/loss | train/loss |" in card.text
    assert f" | {metrics['eval/loss']:.4g} | {metrics['train/loss']:.4g} |" in card.text
    assert "# stories-sft · sft\n" in card.text and "(bfloat16)" in card.text
    assert f'AutoModelForCausalLM.from_pretrained("{out}")' in card.text
    assert "lora:" in card.text  # the resolved recipe


def test_export_refuses_an_incomplete_stage_with_how_to_finish_it(stories_run, tmp_path, capsys):
    output_dir, _ = stories_run
    incomplete = tmp_path / "sft"
    shutil.copytree(output_dir / "sft", incomplete)
    manifest = json.loads((incomplete / "manifest.json").read_text())
    (incomplete / "manifest.json").write_text(json.dumps(manifest | {"status": "failed"}))
    assert cli.main(["export", str(incomplete), str(tmp_path / "out")]) == 2
    assert "did not complete" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli.main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a stage output folder" in capsys.readouterr().err


def test_push_to_hub_refuses_without_a_login_before_exporting(stories_run, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no stored login
    output_dir, _ = stories_run
    assert cli.main(["export", str(output_dir / "sft"), str(tmp_path / "out"), "--push-to-hub", "me/model"]) == 2
    error = capsys.readouterr().err
    assert "not logged in to the Hugging Face Hub" in error and "hf auth login" in error
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # the help names the same login command, one the installed hub client has
        cli.main(["export", "--help"])
    assert "hf auth login" in capsys.readouterr().out


def test_push_to_hub_uploads_the_exported_folder_as_it_is(stories_run, tmp_path, monkeypatch, capsys):
    """The real hub client against a local server speaking the hub's upload protocol (the hub itself is not
    reachable here): the repo is created, every exported file arrives byte for byte in one commit, and what
    arrived loads with plain `transformers`."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    output_dir, _ = stories_run
    out = tmp_path / "out"
    with HubProtocolServer(tmp_path / "hub") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        assert cli.main(["export", str(output_dir / "sft"), str(out), "--push-to-hub", "me/stories-sft"]) == 0
    assert "and pushed it to me/stories-sft" in capsys.readouterr().out
    assert ("POST", "/api/repos/create") in hub.requests
    assert [commit["summary"] for commit in hub.commits] == ["alignment export of out"]
    pushed = hub.repo_folder("me/stories-sft")
    exported_files = sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file())
    assert sorted(path.relative_to(pushed) for path in pushed.rglob("*") if path.is_file()) == exported_files
    assert all((pushed / name).read_bytes() == (out / name).read_bytes() for name in exported_files)
    assert "model.safetensors" in {str(name) for name in exported_files}
    assert AutoModelForCausalLM.from_pretrained(str(pushed)).config.model_type == "llama"
    assert hub.validated and hub.validated[0]["tags"] == ["alignment", "sft"]  # the card's metadata, checked first
    assert 'from_pretrained("me/stories-sft")' in (pushed / "README.md").read_text()  # the card names the repo


def test_a_base_model_named_by_hub_id_trains_exports_and_is_credited_on_the_card(tmp_path, monkeypatch):
    """The hub-loading path of a base model: stories260k pushed to a local server speaking the hub's protocol,
    named as `me/stories260k` at revision `main`. SFT trains on it, the manifest records the hub id, and the
    export's card names it as `base_model` (the hub links the two)."""
    from huggingface_hub import HfApi, ModelCard

    need_shared(STORIES)
    need_shared(ALPACA)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with HubProtocolServer(tmp_path / "hub") as hub:
        for module, name, value in hub.client_settings(tmp_path / "hub-cache"):
            monkeypatch.setattr(module, name, value)
        HfApi().create_repo("me/stories260k")
        HfApi().upload_folder(folder_path=str(STORIES), repo_id="me/stories260k")
        raw = stories_recipe(tmp_path / "run", tracking_mode="disabled", max_steps=2)
        raw["model"] |= {"name_or_path": "me/stories260k", "revision": "main"}
        run_recipe(validate_recipe(raw))
        assert cli.main(["export", str(tmp_path / "run" / "sft"), str(tmp_path / "out")]) == 0
    assert "model.safetensors" in hub.downloads or "pytorch_model.bin" in hub.downloads
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["inputs"]["base_model"] == {"name_or_path": "me/stories260k", "revision": "main"}
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "me/stories260k" and "trained from `me/stories260k`" in card.text


def test_a_failed_push_says_so_and_leaves_the_exported_model_complete(stories_run, tmp_path, monkeypatch, capsys):
    """Logged in, but the hub cannot be reached (an endpoint where nothing listens): the real client fails,
    the error names the repo and how to upload later, and the exported folder is whole and loads."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    output_dir, _ = stories_run
    out = tmp_path / "out"
    assert cli.main(["export", str(output_dir / "sft"), str(out), "--push-to-hub", "me/model"]) == 2
    error = capsys.readouterr().err
    assert "could not push" in error and "me/model" in error and f"hf upload me/model {out}" in error
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.model_type == "llama"
