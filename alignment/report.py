"""`alignment report RUN_DIR`: did the run get better, by how much, and where did it get worse.

Reads a run folder alone (manifests, metrics, training logs, the evaluation samples each stage wrote)
and writes `report.md` (its plots as PNG files in `report_files/`) and `report.html` (the same, plots
embedded, opens offline). Per stage: training curves and evaluation tables, with the groups that got
worse than the policy the stage started from flagged; win rates of every later policy against that
start on the same held-out prompts, judged by the gold checker and by the run's reward model, with 95%
intervals and ties; answers side by side; the resolved recipe, versions, wall times and folders.

A reward-model judgement uses the scores the PPO stage already wrote for both policies' answers; where
answers have no score and a reward stage is at hand (the run's own, or `--reward-stage`), it loads that
reward model and scores them.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignment.compare import completed_stages
from alignment.data.build import EVAL
from alignment.io import read_json, write_bytes, write_text
from alignment.names import EVAL_INITIAL, LOG_HISTORY, RESOLVED_RECIPE, SAMPLES_DIR, reward_source_names
from alignment.recipes.schema import Recipe, StageSpec
from alignment.stages.base import to_plain
from alignment.tracking import Tracker

REPORT = "report"  # the W&B run's job type and name, and its keys' prefix
REPORT_MD, REPORT_HTML, REPORT_FILES = "report.md", "report.html", "report_files"
POLICY_STAGE_TYPES = ("sft", "dpo", "ppo")  # stages whose output is a policy that writes answers
SAMPLE_ROWS = 8  # answers shown side by side per split
REWARD_MODEL_JUDGE = "reward model"  # the win-rate judge when the rewards are a reward model's scores

# Training curves per stage type: (panel title, keys of the training log, `prefix/*` for every key under
# the prefix); the x axis is the log's step.
CURVES: dict[str, list[tuple[str, list[str]]]] = {
    "sft": [("loss", ["loss", "eval_loss"]), ("token accuracy", ["mean_token_accuracy", "eval_mean_token_accuracy"])],
    "reward": [("loss", ["loss", "eval_loss"]), ("pair accuracy", ["accuracy"]), ("margin", ["margin"])],
    "dpo": [
        ("loss", ["loss", "eval_loss"]),
        ("reward accuracy", ["rewards/accuracies", "eval_rewards/accuracies"]),
        ("reward margin", ["rewards/margins", "eval_rewards/margins"]),
    ],
    "ppo": [
        ("score (the reward)", ["objective/scores"]),
        ("reward sources (a weighted sum's parts)", ["objective/reward/*"]),
        ("KL to the SFT policy", ["objective/kl"]),
        ("entropy", ["policy/entropy_avg"]),
        ("clip fraction", ["policy/clipfrac_avg"]),
        ("value loss", ["loss/value_avg"]),
        ("response length", ["val/mean_response_length"]),
        ("gold accuracy (rollouts)", ["objective/gold_accuracy"]),
        ("reward std within groups (GRPO, RLOO)", ["group/reward_std"]),
        ("groups of equal rewards (no signal)", ["group/equal_reward_share"]),
    ],
}
# Evaluation metrics with one value per group (`<split>/<metric>/<group>`): a table each.
GROUP_METRICS = {"exact_match": "exact match (gold checker)", "pairwise_accuracy": "reward-model pair accuracy"}
ALL = "(all)"


# ---- the document: blocks rendered as Markdown and as HTML ---------------------------------------


@dataclass
class Document:
    """A report as a list of blocks, so Markdown and HTML come from one description."""

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        self.blocks.append(("text", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def image(self, name: str, png: bytes, caption: str) -> None:
        self.blocks.append(("image", (name, png, caption)))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "heading":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "text":
                out.append(value)
            elif kind == "table":
                header, rows = value
                lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                lines += ["| " + " | ".join(_cell(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
                out.append("\n".join(lines))
            elif kind == "image":
                out.append(f"![{value[2]}]({REPORT_FILES}/{value[0]})")
            elif kind == "code":
                out.append("```yaml\n" + value.rstrip() + "\n```")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        out = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        ]
        for kind, value in self.blocks:
            if kind == "heading":
                out.append(f"<h{value[0]}>{html.escape(value[1])}</h{value[0]}>")
            elif kind == "text":
                out.append(f"<p>{html.escape(value)}</p>")
            elif kind == "table":
                header, rows = value
                out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
                for row in rows:
                    out.append("<tr>" + "".join(f"<td>{html.escape(_cell(cell))}</td>" for cell in row) + "</tr>")
                out.append("</table>")
            elif kind == "image":
                data = base64.b64encode(value[1]).decode()
                out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(value[2])}'>")
                out.append(f"<figcaption>{html.escape(value[2])}</figcaption></figure>")
            elif kind == "code":
                out.append(f"<details><summary>resolved recipe</summary><pre>{html.escape(value)}</pre></details>")
        return "\n".join(out + ["</body></html>"]) + "\n"


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
    "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}"
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value).replace("\n", " ")


# ---- win rates ---------------------------------------------------------------------------------


@dataclass
class WinRate:
    """One policy against another on the same prompts: a win scores 1, a tie 1/2, a loss 0."""

    wins: int
    ties: int
    losses: int

    @property
    def count(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float:
        return (self.wins + 0.5 * self.ties) / self.count

    @property
    def ci95(self) -> float:
        """Half-width of the normal-approximation 95% interval of the mean per-prompt score."""
        n, rate = self.count, self.rate
        if n < 2:
            return float("nan")
        second_moment = (self.wins + 0.25 * self.ties) / n
        variance = max(second_moment - rate**2, 0.0) * n / (n - 1)
        return 1.96 * math.sqrt(variance / n)

    def row(self, judge: str) -> list[Any]:
        return [
            judge, self.count, self.wins, self.ties, self.losses, f"{self.rate:.3f} ± {self.ci95:.3f}",
        ]  # fmt: skip


def win_rate(outcomes: list[int]) -> WinRate:
    """From per-prompt outcomes +1 (win), 0 (tie), −1 (loss)."""
    return WinRate(outcomes.count(1), outcomes.count(0), outcomes.count(-1))


def outcome(first: float | bool, second: float | bool) -> int:
    """+1 when the first is better, 0 on a tie, −1 when worse."""
    return (first > second) - (first < second)


# ---- reading a run -----------------------------------------------------------------------------


def read_samples(stage_dir: Path) -> dict[str, list[dict]]:
    """Split name → the answers a stage wrote for it (`samples/<split>.jsonl`)."""
    folder = stage_dir / SAMPLES_DIR
    if not folder.is_dir():
        return {}
    return {
        path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for path in sorted(folder.glob("*.jsonl"))
    }


def stage_spec(recipe: dict, name: str) -> dict:
    return next((stage for stage in recipe.get("stages", []) if stage.get("name") == name), {})


def starting_policy(stages: dict[str, dict], name: str) -> str | None:
    """The run's stage a policy stage started from (its `init_from`), when that stage wrote answers too."""
    start = stage_spec(stages[name]["recipe"], name).get("init_from")
    return start if start in stages and start != name else None


def paired_answers(stages: dict[str, dict], samples: dict[str, dict], name: str) -> dict[str, list[tuple[dict, dict]]]:
    """Split → (this policy stage's answer, its starting policy's) on the same prompts; empty for a stage that
    did not start from a policy of the run. A PPO stage's own `eval_initial` answers stand for its start's."""
    start = starting_policy(stages, name)
    if start is None or stages[name]["manifest"].get("type") not in POLICY_STAGE_TYPES:
        return {}
    before = samples[start] | ({EVAL: samples[name][EVAL_INITIAL]} if EVAL_INITIAL in samples[name] else {})
    return {split: joined(answers, before[split]) for split, answers in samples[name].items() if split in before}


def joined(first: list[dict], second: list[dict]) -> list[tuple[dict, dict]]:
    """Rows of two sample files on the same prompts, in the first file's order."""
    if [row["prompt"] for row in first] == [row["prompt"] for row in second]:
        return list(zip(first, second, strict=True))
    by_prompt = {row["prompt"]: row for row in second}
    return [(row, by_prompt[row["prompt"]]) for row in first if row["prompt"] in by_prompt]


Scorer = Callable[[list[tuple[str, str]]], list[float]]


def reward_scorer(reward_dir: Path) -> Scorer:
    """Scores (prompt, answer) pairs with a reward stage's model, loaded once on first use."""
    loaded: list[Any] = []

    def score(pairs: list[tuple[str, str]]) -> list[float]:
        from alignment.models.scoring import load_trained_reward_model, score_conversations

        if not loaded:
            loaded.extend(load_trained_reward_model(reward_dir))
        model, head, tokenizer = loaded
        conversations = [
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}] for prompt, answer in pairs
        ]
        return score_conversations(model, head, tokenizer, conversations, adapter="reward")

    return score


def known_rewards(samples: dict[str, dict[str, list[dict]]]) -> dict[tuple[str, str], float]:
    """(prompt, answer) → reward-model score, from every sample file of the run that carries one."""
    return {
        (row["prompt"], row["response"]): row["reward"]
        for splits in samples.values()
        for rows in splits.values()
        for row in rows
        if row.get("reward") is not None
    }


def reward_judge(stage: dict, name: str) -> str:
    """What a stage's `reward` column is: a reward model's score, or (PPO against a checker, or a weighted
    sum with one) its reward sources by name, so a checker's reward is not reported as a reward model's."""
    spec = next((item for item in stage["recipe"].get("stages", []) if item.get("name") == name), {})
    if not spec.get("reward_function"):
        return REWARD_MODEL_JUDGE
    sources = reward_source_names(spec.get("reward_from"), spec.get("reward_model"), spec.get("reward_function"))
    return f"reward ({' + '.join(sources)})"


def win_rates(
    pairs: list[tuple[dict, dict]],
    rewards: dict[tuple[str, str], float],
    scorer: Scorer | None,
    reward_judge: str = REWARD_MODEL_JUDGE,
) -> dict[str, WinRate]:
    """Judge → win rate of the first row of each pair against the second: the gold checker, and the
    rewards the samples carry (named `reward_judge`) or, where they carry none, the reward model's."""
    results = {}
    gold = [
        (a["correct"], b["correct"]) for a, b in pairs if a.get("correct") is not None and b.get("correct") is not None
    ]
    if gold:
        results["gold checker"] = win_rate([outcome(a, b) for a, b in gold])
    keys = [((a["prompt"], a["response"]), (b["prompt"], b["response"])) for a, b in pairs]
    missing = sorted({key for pair in keys for key in pair if key not in rewards})
    if missing and scorer is not None:
        rewards = rewards | dict(zip(missing, scorer(missing), strict=True))
        missing, reward_judge = [], REWARD_MODEL_JUDGE
    if keys and not missing:
        results[reward_judge] = win_rate([outcome(rewards[a], rewards[b]) for a, b in keys])
    return results


# ---- plots -------------------------------------------------------------------------------------


def logged_panels(history: list[dict], panels: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """The panels whose quantities the log has, each with the keys it plots (`prefix/*` matches a family)."""
    logged = list(dict.fromkeys(key for row in history for key in row))
    present = [
        (name, [key for pattern in keys for key in logged if key == pattern or _under(key, pattern)])
        for name, keys in panels
    ]
    return [(name, keys) for name, keys in present if keys]


def curves_png(history: list[dict], panels: list[tuple[str, list[str]]], title: str) -> bytes | None:
    """One figure of the stage's training curves, a panel per quantity; None when the log has none of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = logged_panels(history, panels)
    if not present:
        return None
    columns = min(3, len(present))
    rows = math.ceil(len(present) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (name, keys) in zip(axes.flat, present, strict=False):
        for key in keys:
            points = [(row.get("step", row.get("iteration")), row[key]) for row in history if key in row]
            points = [(x, y) for x, y in points if x is not None and y is not None]
            axis.plot(
                [x for x, _ in points], [y for _, y in points], label=key, marker="." if len(points) < 30 else None
            )
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("iteration" if "iteration" in history[0] else "step", fontsize=8)
        axis.tick_params(labelsize=8)
        if len(keys) > 1:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(present) :]:
        axis.set_visible(False)
    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


# ---- the report --------------------------------------------------------------------------------


def group_table(
    stages: dict[str, dict], split: str, metric: str, paired: dict[str, dict[str, list[tuple[dict, dict]]]]
) -> tuple[list[str], list[list[Any]], list[tuple[str, str]]] | None:
    """Per-group `metric` of every stage that has it on one split, a column per stage; flags where a policy
    fell below its starting policy, or a reward model ranks a group below chance: ⚠ when beyond the 95%
    interval (of the paired per-prompt change, `paired`: stage → split → (its answer, its start's) on the
    same prompts; or of the pair accuracy), ↓ when within it. (header, rows, [(flag, warning)])."""
    columns = [name for name, stage in stages.items() if _group_values(stage, split, metric)]
    if not columns:
        return None
    groups = sorted({group for name in columns for group in _group_values(stages[name], split, metric)} - {ALL})
    rows, warnings = [], []
    for group in [ALL] + groups:
        row: list[Any] = [group]
        for name in columns:
            value = _group_values(stages[name], split, metric).get(group)
            flag = ""
            start = starting_policy(stages, name)
            before = _group_values(stages[start], split, metric).get(group) if start else None
            kind = stages[name]["manifest"].get("type")
            if value is not None and before is not None and value < before - 1e-9:
                warning = f"{name}: {split} {group} fell from {before:.3f} ({start}) to {value:.3f}"
                change = paired_change(paired.get(name, {}).get(split, []), group) if metric == "exact_match" else None
                flag = "⚠"
                if change is not None:
                    mean, half_width, count = change
                    flag = "⚠" if mean + half_width < 0 else "↓"
                    warning += f"; paired over {count} prompts {mean:+.3f} ± {half_width:.3f} (95%)"
                    warning += ", beyond noise" if flag == "⚠" else ", within noise"
                warnings.append((flag, warning))
            elif value is not None and kind == "reward" and value < 0.5:
                warning, flag = f"{name}: ranks {split} {group} pairs {value:.3f}, below chance", "⚠"
                count = _group_values(stages[name], split, "num_pairs").get(group)
                if count:  # a binomial proportion's interval (normal approximation), as for the whole split
                    half_width = 1.96 * math.sqrt(value * (1 - value) / count)
                    flag = "⚠" if value + half_width < 0.5 else "↓"
                    warning += f"; {value:.3f} ± {half_width:.3f} (95%) over {count} pairs"
                    warning += ", beyond noise" if flag == "⚠" else ", within noise"
                warnings.append((flag, warning))
            row.append("" if value is None else f"{value:.3f}{' ' + flag if flag else ''}")
        rows.append(row)
    header = ["group"] + [f"{name} ({stages[name]['manifest'].get('type')})" for name in columns]
    return header, rows, warnings


def paired_change(pairs: list[tuple[dict, dict]], group: str) -> tuple[float, float, int] | None:
    """Mean change in gold correctness from the second answer to the first over a group's prompts, the
    half-width of its 95% interval (paired, normal approximation), and the prompt count."""
    differences = [
        float(ours["correct"]) - float(theirs["correct"])
        for ours, theirs in pairs
        if (group == ALL or ours.get("group") == group) and "correct" in ours and "correct" in theirs
    ]
    count = len(differences)
    if count < 2:
        return None
    mean = sum(differences) / count
    variance = sum((difference - mean) ** 2 for difference in differences) / (count - 1)
    return mean, 1.96 * math.sqrt(variance / count), count


def _group_values(stage: dict, split: str, metric: str) -> dict[str, float]:
    prefix = f"{split}/{metric}"
    values = {ALL: stage["metrics"][prefix]} if prefix in stage["metrics"] else {}
    values |= {key[len(prefix) + 1 :]: value for key, value in stage["metrics"].items() if key.startswith(prefix + "/")}
    return {group: value for group, value in values.items() if not group.endswith("_ci95")}


def build_report(run_dir: Path, reward_dir: Path | None = None) -> tuple[Document, dict[str, Any]]:
    """The report of a run folder, and its numbers (win rates per stage, split and judge) for tests and W&B."""
    run_dir = Path(run_dir)
    stages = completed_stages(run_dir)
    samples = {name: read_samples(run_dir / name) for name in stages}
    if reward_dir is None:
        reward_dir = next((run_dir / n for n, s in stages.items() if s["manifest"].get("type") == "reward"), None)
    scorer = reward_scorer(reward_dir) if reward_dir is not None else None
    rewards = known_rewards(samples)
    recipe = next(iter(stages.values()))["recipe"]
    numbers: dict[str, Any] = {"win_rates": {}, "warnings": []}

    doc = Document()
    doc.heading(1, f"Run report: {recipe.get('name', run_dir.name)}")
    doc.text(f"Run folder: {run_dir.resolve()}")
    doc.table(
        ["stage", "type", "status", "wall time", "finished", "output"],
        [
            [name, s["manifest"].get("type"), s["manifest"].get("status"),
             f"{s['manifest'].get('duration_s', 0):.0f} s", s["manifest"].get("finished_at"), str(run_dir / name)]
            for name, s in stages.items()
        ],
    )  # fmt: skip

    paired = {name: paired_answers(stages, samples, name) for name in stages}
    splits = sorted({split for name in stages for split in _splits(stages[name])} - {EVAL_INITIAL})
    for (metric, title), split in itertools.product(GROUP_METRICS.items(), splits):
        table = group_table(stages, split, metric, paired)
        if table is None:
            continue
        header, rows, warnings = table
        doc.heading(2, f"{title[0].upper()}{title[1:]} on `{split}`, per group")
        doc.table(header, rows)
        numbers["warnings"] += [warning for _, warning in warnings]
        for flag, warning in warnings:
            doc.text(f"{flag} {warning}")
        if any(flag == "↓" for flag, _ in warnings):
            doc.text(
                "↓: below the starting policy (by the paired per-prompt change) or below chance (a reward model) "
                "within the 95% interval, which chance alone can explain."
            )

    for name, stage in stages.items():
        start, common = starting_policy(stages, name), paired[name]
        if not common:
            continue
        doc.heading(2, f"Win rates: {name} against {start}")
        doc.text(
            "Each held-out prompt scores 1 when this policy's answer is judged better, 1/2 on a tie, 0 when worse; "
            "± is the 95% interval (normal approximation)."
        )
        rows = []
        for split, pairs in common.items():
            for judge, result in win_rates(pairs, rewards, scorer, reward_judge(stage, name)).items():
                numbers["win_rates"].setdefault(name, {}).setdefault(split, {})[judge] = result
                rows.append([split] + result.row(judge))
        doc.table(["split", "judge", "prompts", "wins", "ties", "losses", "win rate"], rows)
        for split, pairs in common.items():
            doc.heading(3, f"Answers on `{split}`: {start} and {name}")
            doc.table(
                ["prompt", "reference", start, name],
                [
                    [ours["prompt"], ours.get("reference"), _answer(theirs, rewards), _answer(ours, rewards)]
                    for ours, theirs in pairs[:SAMPLE_ROWS]
                ],
            )

    for name, stage in stages.items():
        kind = stage["manifest"].get("type", "")
        history_path = run_dir / name / LOG_HISTORY
        if kind in CURVES and history_path.exists() and (history := read_json(history_path)):
            png = curves_png(history, CURVES[kind], name if name == kind else f"{name} ({kind})")
            if png:
                doc.heading(2, f"Training curves: {name}")
                doc.image(f"{name}.png", png, f"{name} ({kind}) training curves")

    doc.heading(2, "Versions")
    versions = next(iter(stages.values()))["manifest"].get("versions", {})
    doc.table(["package", "version"], [[package, version] for package, version in versions.items()])
    doc.heading(2, "Resolved recipe")
    doc.code((run_dir / list(stages)[-1] / RESOLVED_RECIPE).read_text())
    return doc, numbers


def _under(key: str, pattern: str) -> bool:
    return pattern.endswith("/*") and key.startswith(pattern[:-1])


def _splits(stage: dict) -> set[str]:
    return {key.split("/")[0] for key in stage["metrics"] if key.count("/") >= 1 and key.startswith("eval")}


def _answer(row: dict, rewards: dict[tuple[str, str], float]) -> str:
    mark = {True: " ✓", False: " ✗"}.get(row.get("correct"), "")
    score = rewards.get((row["prompt"], row["response"]))
    reward = f" (reward {score:.2f})" if score is not None else ""
    return f"{row['response']}{mark}{reward}"


def write_report(
    run_dir: Path, reward_dir: Path | None = None, recipe: Recipe | None = None
) -> tuple[Path, Path, dict[str, Any]]:
    """Writes report.md (+ report_files/*.png) and report.html into the run folder, each replaced whole;
    with `recipe` (as `alignment run` passes it) the plots and tables also go to a W&B run of the
    recipe's group, job type `report`."""
    run_dir = Path(run_dir)
    doc, numbers = build_report(run_dir, reward_dir)
    files = run_dir / REPORT_FILES
    files.mkdir(exist_ok=True)
    for kind, value in doc.blocks:
        if kind == "image":
            write_bytes(files / value[0], value[1])
    title = doc.blocks[0][1][1]
    write_text(run_dir / REPORT_MD, doc.markdown())
    write_text(run_dir / REPORT_HTML, doc.html(title))
    if recipe is not None:
        log_report(doc, recipe, run_dir)
    return run_dir / REPORT_MD, run_dir / REPORT_HTML, numbers


def log_report(doc: Document, recipe: Recipe, run_dir: Path) -> None:
    """The report's plots as images and its tables as W&B tables, in one run beside the stages' runs."""
    tracker = Tracker(recipe, StageSpec(name=REPORT, type=REPORT), run_dir, to_plain(recipe))
    headings: list[str] = []
    for kind, value in doc.blocks:
        if kind == "heading":
            headings = headings[: value[0] - 1] + [value[1]]
        elif kind == "table" and len(headings) > 1:
            header, rows = value
            tracker.table(_key(headings[-1]), header, [[_cell(cell) for cell in row] for row in rows])
        elif kind == "image":
            tracker.image(_key(headings[-1]), run_dir / REPORT_FILES / value[0], value[2])
    tracker.finish()


def _key(heading: str) -> str:
    """A W&B key from a heading: `report/` and the heading's words joined by `_`."""
    words = "".join(char if char.isalnum() else " " for char in heading.lower()).split()
    return f"{REPORT}/" + "_".join(words)
