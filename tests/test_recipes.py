"""Recipe format: every shipped recipe validates, and each kind of mistake is named precisely."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from alignment import cli, plugins
from alignment.data.build import TRAIN, build_stage_data
from alignment.recipes.load import apply_override, load_recipe, validate_recipe
from alignment.recipes.validate import RecipeError

from conftest import ACCELERATE_CONFIGS, ROOT, SHIPPED_RECIPES, minimal_recipe

SHIPPED = SHIPPED_RECIPES


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_recipe_validates(path: Path, monkeypatch):
    monkeypatch.chdir(ROOT)  # recipes name their local files relative to the project root
    recipe = load_recipe(path)
    assert recipe.stages, path
    assert all(stage.name and stage.type for stage in recipe.stages)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[path.name for path in ACCELERATE_CONFIGS])
def test_every_shipped_accelerate_config_reads_as_accelerate_reads_it(path: Path):
    """Each launch config parses as accelerate's own config file, names its launch command, and sets
    what its kind needs: FSDP with QLoRA keeps flat parameters and loads on one rank, ZeRO stage 3."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert f"accelerate launch --config_file recipes/accelerate/{path.name}" in path.read_text()
    assert config.num_machines == 1 and not config.use_cpu
    kinds = {"ddp.yaml": "MULTI_GPU", "fsdp-qlora.yaml": "FSDP", "deepspeed-zero3.yaml": "DEEPSPEED"}
    assert str(config.distributed_type).rsplit(".", 1)[-1] == kinds[path.name]
    if path.name == "fsdp-qlora.yaml":
        assert config.fsdp_config["fsdp_use_orig_params"] is False
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    if path.name == "deepspeed-zero3.yaml":
        assert config.deepspeed_config["zero_stage"] == 3


def test_shipped_recipes_cover_the_issue():
    names = {str(p.relative_to(ROOT / "recipes")) for p in SHIPPED}
    assert "toy/sft.yaml" in names
    assert len([n for n in names if n.startswith("alpaca")]) >= 2


def write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def error_of(tmp_path: Path, data: dict | str, *overrides: str) -> str:
    with pytest.raises(RecipeError) as caught:
        load_recipe(write(tmp_path, data), overrides)
    return str(caught.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    message = error_of(tmp_path, "name: x\nmodel: [unclosed\nstages: []\n")
    assert "recipe.yaml" in message and "malformed YAML" in message and "line 3" in message


def test_unknown_top_level_key_suggests_the_closest(tmp_path):
    message = error_of(tmp_path, minimal_recipe(trackng={"project": "x"}))
    assert "trackng" in message and "Did you mean 'tracking'?" in message


def test_unknown_nested_key_names_its_path(tmp_path):
    recipe = minimal_recipe()
    recipe["model"]["quantisation"] = {"mode": "4bit"}
    message = error_of(tmp_path, recipe)
    assert "model.quantisation" in message and "Did you mean 'quantization'?" in message


def test_wrong_type_names_path_and_expectation(tmp_path):
    recipe = minimal_recipe()
    recipe["lora"] = {"r": "sixteen"}
    message = error_of(tmp_path, recipe)
    assert "lora.r" in message and "expected an integer" in message and "sixteen" in message


def test_wrong_choice_lists_the_choices(tmp_path):
    recipe = minimal_recipe()
    recipe["model"]["quantization"] = {"mode": "3bit"}
    message = error_of(tmp_path, recipe)
    assert "model.quantization.mode" in message and "'4bit'" in message and "'none'" in message


def test_unknown_trainer_argument_lists_valid_ones_and_suggests(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["args"] = {"learning_rat": 1e-4}
    message = error_of(tmp_path, recipe)
    assert "stages.sft.args.learning_rat" in message
    assert "unknown SFTConfig field" in message and "Did you mean 'learning_rate'?" in message
    assert "per_device_train_batch_size" in message  # the list of valid fields


def test_trainer_argument_types_are_checked(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["args"] = {"num_train_epochs": "three"}
    message = error_of(tmp_path, recipe)
    assert "stages.sft.args.num_train_epochs" in message and "expected a number" in message


def test_every_sft_config_field_passes_through(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["args"] = {"packing": True, "neftune_noise_alpha": 5, "learning_rate": "1e-4"}
    stage = load_recipe(write(tmp_path, recipe)).stage("sft")
    assert stage.args == {"packing": True, "neftune_noise_alpha": 5.0, "learning_rate": 1e-4}


def test_unknown_stage_type_and_bad_dependency(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["type"] = "stf"
    assert "Did you mean 'sft'?" in error_of(tmp_path, recipe)
    recipe = minimal_recipe()
    recipe["stages"][0]["init_from"] = "nowhere"
    assert "not an earlier stage" in error_of(tmp_path, recipe)


def test_duplicate_stage_names(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"].append(dict(recipe["stages"][0]))
    assert "used twice" in error_of(tmp_path, recipe)


def test_missing_local_dataset_file_is_caught_before_loading(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["data"] = {"datasets": [{"path": str(tmp_path / "nope.json")}]}
    message = error_of(tmp_path, recipe)
    assert "stages.sft.data.datasets[0].path" in message and "not found" in message and "nope.json" in message


def test_a_dataset_needs_a_path(tmp_path):
    recipe = minimal_recipe()
    recipe["stages"][0]["data"] = {"datasets": [{"format": "alpaca"}]}
    assert "stages.sft.data.datasets[0]" in error_of(tmp_path, recipe)


def test_overrides_set_nested_keys_and_stage_by_name(tmp_path):
    path = write(tmp_path, minimal_recipe())
    recipe = load_recipe(path, ["stages.sft.args.learning_rate=1e-4", "lora.r=8", "model.quantization.mode=none"])
    assert recipe.stage("sft").args["learning_rate"] == pytest.approx(1e-4)
    assert recipe.lora.r == 8 and recipe.model.quantization.mode == "none"


def test_override_errors_are_named(tmp_path):
    assert "no item named 'sfx'" in error_of(tmp_path, minimal_recipe(), "stages.sfx.args.learning_rate=1")
    assert "KEY=VALUE" in error_of(tmp_path, minimal_recipe(), "lora.r")
    assert "lora.rank" in error_of(tmp_path, minimal_recipe(), "lora.rank=4")


def test_override_of_a_list_by_index():
    data = minimal_recipe()
    apply_override(data, "stages.0.args.max_steps=3")
    assert validate_recipe(data).stage("sft").args["max_steps"] == 3


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python -m alignment ...` as a user runs it (about 10 s of imports: once per kind of check)."""
    return subprocess.run([sys.executable, "-m", "alignment", *args], cwd=cwd, capture_output=True, text=True)


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    """The CLI's exit code and stderr without a new interpreter."""
    code = cli.main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "mutation, expected",
    [
        (lambda r: r.update(lora={"r": "x"}), "lora.r"),
        (lambda r: r.update(modle={}), "Did you mean 'model'?"),
        (lambda r: r["stages"][0]["data"]["datasets"][0].update(path="missing.jsonl", options={}), "missing.jsonl"),
    ],
    ids=["wrong-type", "unknown-key", "missing-dataset-file"],
)
def test_cli_exits_non_zero_naming_the_key(tmp_path, monkeypatch, capsys, mutation, expected):
    recipe = minimal_recipe()
    mutation(recipe)
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(capsys, "validate", str(write(tmp_path, recipe)))
    assert code == 2, stderr
    assert expected in stderr and "recipe.yaml" in stderr


def test_cli_malformed_yaml_exits_non_zero(tmp_path):
    result = run_cli("validate", str(write(tmp_path, "stages: [\n")), cwd=tmp_path)
    assert result.returncode == 2 and "malformed YAML" in result.stderr


def test_cli_validate_prints_resolved_recipe_and_plan(tmp_path):
    result = run_cli("validate", str(write(tmp_path, minimal_recipe())), "--set", "lora.r=4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "r: 4" in result.stdout and "# plan" in result.stdout and "1. sft: sft" in result.stdout


def test_layers_to_transform_needs_listed_target_modules(tmp_path):
    message = error_of(tmp_path, minimal_recipe(lora={"layers_to_transform": [2, 3]}))
    assert "lora.target_modules" in message and "layers_to_transform" in message and "q_proj" in message
    listed = minimal_recipe(lora={"layers_to_transform": [2, 3], "target_modules": ["q_proj", "v_proj"]})
    assert load_recipe(write(tmp_path, listed)).lora.layers_to_transform == [2, 3]


def test_the_instructgpt_recipes_run_sft_then_reward_then_ppo_from_base_models(monkeypatch):
    """The GPU recipes of the whole pipeline start from base models (as InstructGPT does) and chain
    reward → SFT, PPO → SFT (policy and frozen reference) and the reward model."""
    monkeypatch.chdir(ROOT)
    bases = {}
    for path in sorted((ROOT / "recipes" / "instructgpt").glob("*.yaml")):
        recipe = load_recipe(path)
        assert [(stage.name, stage.type) for stage in recipe.stages] == [
            ("sft", "sft"),
            ("reward", "reward"),
            ("ppo", "ppo"),
        ], path
        reward, ppo = recipe.stage("reward"), recipe.stage("ppo")
        assert reward.init_from == "sft" and ppo.init_from == "sft" and ppo.reward_from == "reward"
        bases[path.name] = recipe.model.name_or_path
    assert {bases[name] for name in ("qwen2.5-0.5b-hh.yaml", "llama-3.2-1b-hh.yaml", "llama-3.1-8b-hh.yaml")} == {
        "Qwen/Qwen2.5-0.5B",
        "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.1-8B",
    }


@dataclass
class CountingOptions:
    rows: int = 3
    start: int = 0


def test_a_plugin_registers_a_data_source_whose_options_the_recipe_validates(tmp_path, monkeypatch):
    """The mechanism the embedded toy suite uses, open to any plugin: a source registered by name is read
    with its options; a wrong option is named at validation, before anything loads."""
    rows = lambda options, seed: [  # noqa: E731
        {"prompt": f"Count on from {n}.", "completion": str(n + 1)}
        for n in range(options.start, options.start + options.rows)
    ]
    monkeypatch.setitem(
        plugins.SOURCES, "counting", plugins.DataSource("counting", CountingOptions, rows, "prompt_completion")
    )
    recipe = minimal_recipe()
    recipe["stages"][0]["data"] = {"datasets": [{"path": "counting", "options": {"rows": 4, "start": 10}}]}
    stage = validate_recipe(recipe).stage("sft")
    data = build_stage_data(stage.data, "sft", seed=0, tokenizer=None)
    assert sorted(row["reference"] for row in data.splits[TRAIN]) == ["11", "12", "13", "14"]
    recipe["stages"][0]["data"]["datasets"][0]["options"] = {"rowz": 4}
    message = error_of(tmp_path, recipe)
    assert "stages.sft.data.datasets[0].options.rowz" in message and "rows" in message
    recipe["stages"][0]["data"]["datasets"][0] = {"path": str(tmp_path / "data.jsonl"), "options": {"rows": 4}}
    assert "stages.sft.data.datasets[0].options" in error_of(tmp_path, recipe)


def test_only_the_plugin_registry_names_the_toy_suite():
    """The toy suite is a plugin like any other: outside alignment/toy/, only alignment/plugins.py names it."""
    package = ROOT / "alignment"
    naming = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in package.rglob("*.py")
        if "toy" not in path.relative_to(package).parts and path.name != "plugins.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "toy" in line.lower()
    ]
    assert naming == []
