"""The `alignment` command: run, validate, generate, score, compare, report, export, env."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from alignment.data.loading import DataError
from alignment.distributed import process_state
from alignment.export import ExportError
from alignment.names import REWARD
from alignment.recipes.schema import SamplingConfig
from alignment.recipes.validate import RecipeError
from alignment.stages.base import StageInputError, to_plain


def _stage_list(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


def cmd_run(args: argparse.Namespace) -> int:
    from alignment.recipes.load import load_recipe
    from alignment.runner import run_recipe

    recipe = load_recipe(args.recipe, args.set)
    run_recipe(recipe, only=_stage_list(args.stages), force=args.force)
    if not args.no_report and process_state().is_main_process:
        from alignment.report import write_report

        markdown, page, _ = write_report(Path(recipe.output_dir), recipe=recipe)
        print(f"report: {markdown} and {page}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from alignment.recipes.load import load_recipe
    from alignment.runner import make_stage, plan

    recipe = load_recipe(args.recipe, args.set)
    print(yaml.safe_dump(to_plain(recipe), sort_keys=False), end="")
    print("# plan")
    for index, spec in enumerate(plan(recipe, _stage_list(args.stages)), start=1):
        stage = make_stage(recipe, spec)
        after = f" (after {', '.join(spec.depends_on())})" if spec.depends_on() else ""
        state = "complete, would be skipped" if stage.is_complete() else "to run"
        print(f"#  {index}. {spec.name}: {spec.type}{after} → {stage.stage_dir} [{state}]")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from alignment.evaluation.generation import generate_answers
    from alignment.models.loading import load_trained_policy

    model, tokenizer = load_trained_policy(args.stage_dir)
    config = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    prompts = [[{"role": "user", "content": prompt}] for prompt in args.prompt]
    for prompt, answer in zip(args.prompt, generate_answers(model, tokenizer, prompts, config), strict=True):
        print(answer if len(args.prompt) == 1 else f"{prompt}\t{answer}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from alignment.models.heads import read_reward_stats
    from alignment.models.scoring import load_trained_reward_model, score_conversations

    model, head, tokenizer = load_trained_reward_model(args.stage_dir, REWARD)
    conversations = [
        [{"role": "user", "content": args.prompt}, {"role": "assistant", "content": response}]
        for response in args.response
    ]
    rewards = score_conversations(model, head, tokenizer, conversations, adapter=REWARD)
    if args.normalize:
        stats = read_reward_stats(args.stage_dir)
        rewards = [(reward - stats["mean"]) / max(stats["std"], 1e-8) for reward in rewards]
    for response, reward in zip(args.response, rewards, strict=True):
        print(f"{reward:.6g}" if len(args.response) == 1 else f"{reward:.6g}\t{response}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from alignment.compare import compare_runs
    from alignment.io import write_text

    table = compare_runs(args.run_dirs)
    print(table, end="")
    if args.markdown:
        write_text(args.markdown, table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from alignment.report import write_report

    markdown, page, _ = write_report(Path(args.run_dir), Path(args.reward_stage) if args.reward_stage else None)
    print(f"report: {markdown} and {page}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alignment.export import export_stage

    folder = export_stage(args.stage_dir, args.out_dir, dtype=args.dtype, push_to_hub=args.push_to_hub)
    print(
        f"exported {args.stage_dir} to {folder}" + (f" and pushed it to {args.push_to_hub}" if args.push_to_hub else "")
    )
    return 0


def cmd_env(args: argparse.Namespace) -> int:
    """What a bug report needs: versions, the device and its precision, the memory allocator."""
    import platform

    import torch

    from alignment.allocator import allocator_description
    from alignment.models.precision import cpu_4bit_kernel, native_bfloat16
    from alignment.stages.base import library_versions

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu: {torch.get_num_threads()} threads"
    facts = {
        **library_versions(),
        "platform": platform.platform(),
        "device": device,
        "native bfloat16": "yes" if native_bfloat16() else "no (compute_dtype auto → float32)",
        "allocator": allocator_description(),
        "4-bit cpu kernel": cpu_4bit_kernel(),
    }
    for name, value in facts.items():
        print(f"{name}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignment", description="SFT → reward model → PPO/DPO on one 4-bit base.")
    commands = parser.add_subparsers(dest="command", required=True)

    def recipe_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("recipe", help="recipe YAML file")
        sub.add_argument("--stages", help="comma-separated stage names to run (default: all)")
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a recipe key, e.g. stages.sft.args.learning_rate=1e-4 (repeatable)",
        )
        return sub

    run = recipe_command("run", "run a recipe's stages in order")
    run.add_argument("--force", action="store_true", help="re-run stages that are already complete")
    run.add_argument("--no-report", action="store_true", help="do not write report.md/report.html at the end")
    run.set_defaults(func=cmd_run)
    recipe_command("validate", "check a recipe and print it resolved, with the plan").set_defaults(func=cmd_validate)

    generate = commands.add_parser("generate", help="answer prompts with a trained stage")
    generate.add_argument("stage_dir", help="a stage output folder, RUN_DIR/STAGE, e.g. runs/demo/sft")
    generate.add_argument("--prompt", action="append", required=True, help="a user prompt (repeatable)")
    defaults = SamplingConfig()  # the one place sampling settings and their defaults are declared
    generate.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    generate.add_argument("--temperature", type=float, default=defaults.temperature, help="0 for greedy decoding")
    generate.add_argument("--top-p", type=float, default=defaults.top_p)
    generate.set_defaults(func=cmd_generate)

    score = commands.add_parser("score", help="print the reward a trained reward stage gives a response")
    score.add_argument("stage_dir", help="a reward stage output folder, RUN_DIR/STAGE, e.g. runs/demo/reward")
    score.add_argument("--prompt", required=True, help="the user prompt")
    score.add_argument("--response", action="append", required=True, help="a response to score (repeatable)")
    score.add_argument(
        "--normalize", action="store_true", help="subtract the training-prompt mean and divide by the std"
    )
    score.set_defaults(func=cmd_score)

    compare = commands.add_parser(
        "compare", help="key metrics of several runs stage by stage, and the recipe keys that differ"
    )
    compare.add_argument("run_dirs", nargs="+", help="run folders (a recipe's output_dir)")
    compare.add_argument("--markdown", metavar="FILE", help="also write the comparison to FILE")
    compare.set_defaults(func=cmd_compare)

    report = commands.add_parser(
        "report", help="report.md and report.html: curves, evaluation per group, win rates against the SFT policy"
    )
    report.add_argument("run_dir", help="a run folder (a recipe's output_dir)")
    report.add_argument(
        "--reward-stage", metavar="DIR", help="judge win rates with this reward stage (default: the run's own, if any)"
    )
    report.set_defaults(func=cmd_report)

    export = commands.add_parser("export", help="a policy or reward stage as a plain Hugging Face model (LoRA merged)")
    export.add_argument("stage_dir", help="a stage output folder, RUN_DIR/STAGE")
    export.add_argument("out_dir", help="the model folder to write")
    export.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload it (needs `hf auth login` or HF_TOKEN)")
    export.set_defaults(func=cmd_export)

    commands.add_parser("env", help="versions, device, precision and memory allocator").set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, DataError, StageInputError, FileNotFoundError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
