"""``rlreason train|eval|sft|traces``: the command line.

A bad config exits with code 2 and one line per problem, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rlreason.config import Config, ConfigError, load_config


def _config_from(target: str, overrides: list[str]) -> tuple[Config, Path | None]:
    """A config from a YAML file, or from a run directory's saved config plus its latest checkpoint's weights."""
    path = Path(target)
    if path.is_dir():
        from rlreason.trainer import latest_checkpoint

        if not (path / "config.yaml").is_file():
            raise ConfigError([f"{path} is a directory without config.yaml, so it is not a run directory"])
        checkpoint = latest_checkpoint(path)
        extra = [f"model.name={checkpoint / 'model'}"] if checkpoint else []
        return load_config(path / "config.yaml", extra + overrides), path
    return load_config(path, overrides), None


def cmd_train(args: argparse.Namespace) -> int:
    from rlreason.trainer import Trainer

    config = load_config(args.config, args.overrides)
    summary = Trainer(config, resume=args.resume).train()
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from rlreason.evaluate import evaluate
    from rlreason.models import load_model, load_tokenizer
    from rlreason.rollout import HFEngine
    from rlreason.scoring import resolve_rewards
    from tasks.registry import load_task

    config, run_dir = _config_from(args.target, args.overrides)
    mc, tc = config.model, config.task
    tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
    model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to("cuda" if torch.cuda.is_available() else "cpu")
    data = load_task(tc.name, "eval", tc.eval_size, config.train.seed, **tc.options)
    max_new = config.run.eval_max_new_tokens or config.rollout.max_new_tokens
    result = evaluate(HFEngine(model, tokenizer), tokenizer, data, resolve_rewards(config.rewards), max_new, config.run.eval_batch_size)
    report_dir = run_dir or Path(config.run.output_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "eval_report.json").write_text(json.dumps({"model": mc.name, "task": tc.name, **result}, indent=2))
    print(f"{'model':<10} {mc.name}\n{'task':<10} {tc.name} (eval split, {result['num_prompts']} prompts, greedy)")
    print(f"{'accuracy':<10} {result['accuracy']:.3f}")
    for name, value in result["rewards"].items():
        print(f"{name:<10} {value:.3f}")
    print(f"report     {report_dir / 'eval_report.json'}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from rlreason.trainer import Trainer

    config = load_config(args.config, args.overrides)
    if not config.sft.data or config.sft.steps < 1:
        raise ConfigError(["sft.data and sft.steps >= 1 are needed to run sft"])
    trainer = Trainer(config)
    losses = trainer.run_sft()
    out = trainer.run_dir / "sft-model"
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(out)
    trainer.tokenizer.save_pretrained(out)
    print(f"sft: loss {losses[0]:.3f} -> {losses[-1]:.3f}; model saved to {out}")
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from tasks.registry import load_task

    options = dict(load_config(None, [f"task.options.{o}" for o in args.option]).task.options)
    data = load_task(args.task, "train", args.n, args.seed, **options)
    if "solution" not in data.column_names:
        raise SystemExit(f"task {args.task!r} has no worked solutions to make traces from")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in data:
            f.write(json.dumps({"messages": [*row["prompt"], {"role": "assistant", "content": row["solution"]}]}) + "\n")
    print(f"wrote {len(data)} traces from the train split of {args.task!r} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlreason", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="GRPO (after an optional cold-start SFT) on a config")
    train.add_argument("config")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. train.steps=10")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="held-out accuracy of a config's model or a run directory's latest checkpoint")
    ev.add_argument("target", help="config YAML or run directory")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=cmd_eval)
    sft = sub.add_parser("sft", help="supervised fine-tuning on sft.data (a JSONL of chat traces)")
    sft.add_argument("config")
    sft.add_argument("overrides", nargs="*")
    sft.set_defaults(func=cmd_sft)
    traces = sub.add_parser("traces", help="write a task's worked solutions as chat JSONL for the cold start")
    traces.add_argument("--task", required=True)
    traces.add_argument("--n", type=int, default=1000)
    traces.add_argument("--out", required=True)
    traces.add_argument("--seed", type=int, default=0)
    traces.add_argument("--option", action="append", default=[], help="task option key=value, e.g. digits=3")
    traces.set_defaults(func=cmd_traces)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
