"""The model card (README.md) of an exported stage: what the model is, which stages it descends from, how
they scored, and how to load it, so a pushed export's hub page says so (the hub reads its metadata block
for the base model, task and tags). Metadata through `huggingface_hub`'s ModelCardData, which writes the
block the hub validates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from alignment.compare import KEY_METRICS, metric_cell
from alignment.data.loading import is_local
from alignment.io import read_json
from alignment.models.heads import read_reward_stats
from alignment.names import METRICS, RESOLVED_RECIPE, REWARD_STATS_FILE
from alignment.plugins import data_source, model_folder
from alignment.stages.base import read_manifest

PROJECT_TAG = "alignment"  # the hub tag every export carries, so a user finds all of theirs

_LOAD_POLICY = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForCausalLM.from_pretrained("{where}")
messages = [{{"role": "user", "content": "Hello!"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
answer = model.generate(**inputs, max_new_tokens=128)[0, inputs["input_ids"].shape[1] :]
print(tokenizer.decode(answer, skip_special_tokens=True))
```"""

_LOAD_REWARD = """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{where}")
model = AutoModelForSequenceClassification.from_pretrained("{where}")
conversation = [{{"role": "user", "content": "Hello!"}}, {{"role": "assistant", "content": "Hi, how can I help?"}}]
inputs = tokenizer.apply_chat_template(conversation, return_tensors="pt", return_dict=True)
reward = model(**inputs).logits[0, 0].item()
```"""


def lineage(stage_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    """(name, folder, manifest) of the stages this one was built from, earliest first, then this stage."""
    chain: list[tuple[str, Path, dict[str, Any]]] = []

    def visit(folder: Path) -> None:
        manifest = read_manifest(folder)
        if manifest is None or any(seen == folder for _, seen, _ in chain):
            return
        for source in manifest.get("inputs", {}).get("stages", {}).values():
            visit(Path(source))
        chain.append((manifest.get("stage", folder.name), folder, manifest))

    visit(stage_dir.resolve())
    return chain


def is_hub_id(name: str, known: bool) -> bool:
    """A hub repo id, not a plugin's name or a local path."""
    return not known and name.count("/") == 1 and not is_local(name)


def model_card(stage_dir: Path, kind: str, dtype: str, where: str) -> str:
    """The card's Markdown: the metadata block, then lineage, evaluation, use, and the stage's recipe.
    `kind` is "policy" or "reward"; `where` is the repo id (or folder) the loading snippet names."""
    chain = lineage(stage_dir)
    name, _, manifest = chain[-1]
    base = manifest.get("inputs", {}).get("base_model", {}).get("name_or_path", "")
    datasets = sorted(
        {path for _, _, m in chain for path in m.get("inputs", {}).get("datasets", []) if isinstance(path, str)}
    )
    metadata = ModelCardData(
        base_model=base if is_hub_id(base, model_folder(base) is not None) else None,
        datasets=[path for path in datasets if is_hub_id(path, data_source(path) is not None)] or None,
        library_name="transformers",
        pipeline_tag="text-generation" if kind == "policy" else "text-classification",
        tags=list(dict.fromkeys([PROJECT_TAG, *(m.get("type", "") for _, _, m in chain)])),
    )
    steps = " → ".join(stage if stage == m.get("type") else f"{stage} ({m.get('type')})" for stage, _, m in chain)
    what = "A chat policy" if kind == "policy" else "A reward model (one-label sequence classifier; higher is better)"
    lines = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {_run_name(stage_dir)} · {name}",
        "",
        f"{what} trained from `{base}` by the `alignment` suite through {steps}. Each stage trains a "
        f"LoRA adapter on the same base; this stage's is merged here into the unquantized base weights ({dtype}), so "
        "plain `transformers` and serving engines load it. The tokenizer carries the chat template used in "
        "training" + (", and the generation config stops at every end-of-turn token." if kind == "policy" else "."),
        "",
        "## Lineage and evaluation",
        "",
        "| stage | type | finished | wall time | " + " | ".join(_metric_names(chain)) + " |",
        "|" + " --- |" * (4 + len(_metric_names(chain))),
    ]
    for stage, folder, stage_manifest in chain:
        metrics = read_json(folder / METRICS) if (folder / METRICS).exists() else {}
        cells = [metric_cell(metrics.get(metric)) for metric in _metric_names(chain)]
        duration = stage_manifest.get("duration_s")
        wall = f"{duration:.0f} s" if isinstance(duration, int | float) else ""
        lines.append(
            f"| {stage} | {stage_manifest.get('type')} | {stage_manifest.get('finished_at', '')} | {wall} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", f"Data: {', '.join(f'`{path}`' for path in datasets) or 'none recorded'}.", "", "## Use", ""]
    lines.append((_LOAD_POLICY if kind == "policy" else _LOAD_REWARD).format(where=where))
    if kind == "reward" and (stage_dir / REWARD_STATS_FILE).exists():
        stats = read_reward_stats(stage_dir)
        lines += [
            "",
            f"Its rewards over the training prompts had mean {stats['mean']:.4g} and standard deviation "
            f"{stats['std']:.4g} (`reward_stats.json`); subtract and divide by them to standardise, as PPO does.",
        ]
    recipe_text = (stage_dir / RESOLVED_RECIPE).read_text() if (stage_dir / RESOLVED_RECIPE).exists() else ""
    lines += ["", "## Recipe", "", "The run's recipe as resolved (every default filled in):", "", "```yaml"]
    lines += [recipe_text.rstrip(), "```", "", "## Versions", "", "| package | version |", "| --- | --- |"]
    lines += [f"| {package} | {version} |" for package, version in manifest.get("versions", {}).items()]
    return "\n".join(lines) + "\n"


def _run_name(stage_dir: Path) -> str:
    """The recipe's name (the W&B group), else the run folder's."""
    recipe = yaml.safe_load((stage_dir / RESOLVED_RECIPE).read_text()) if (stage_dir / RESOLVED_RECIPE).exists() else {}
    return (recipe or {}).get("name") or stage_dir.resolve().parent.name


def _metric_names(chain: list[tuple[str, Path, dict[str, Any]]]) -> list[str]:
    """The key metrics (as `alignment compare` orders them) that any stage of the chain has."""
    present = set()
    for _, folder, _ in chain:
        if (folder / METRICS).exists():
            present |= set(read_json(folder / METRICS))
    return [metric for metric in KEY_METRICS if metric in present]
