"""``rlreason train|eval|sft|sample|distill|traces|inspect|export``: the command line.

A bad config exits with code 2 and one line per problem, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rlreason.config import Config, ConfigError, SampleConfig, choices, load_config


def _config_from(target: str, overrides: list[str]) -> tuple[Config, Path | None]:
    """A config from a YAML file, or from a run directory's saved config plus its latest weights (its newest
    checkpoint, else the model ``rlreason sft`` saved)."""
    path = Path(target)
    if path.is_dir():
        from rlreason.training.distill import run_model

        if not (path / "config.yaml").is_file():
            raise ConfigError([f"{path} is a directory without config.yaml, so it is not a run directory"])
        model, _ = run_model(path)
        extra = [f"model.name={model}"] if model else []
        return load_config(path / "config.yaml", extra + overrides), path
    return load_config(path, overrides), None


def cmd_train(args: argparse.Namespace) -> int:
    """Ctrl-C ends it with exit code 130 and one line on how to go on; every log line and checkpoint written before
    is kept whole (checkpoints are renamed into place only once complete)."""
    from rlreason.training import interrupt

    config = None
    interrupt.install()
    try:
        config = load_config(args.config, args.overrides)
        return _train(config, args.resume)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
            print(_interrupted(config, args), file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


def _train(config: Config, resume: bool) -> int:
    from rlreason.training.trainer import Trainer, TrainingDiverged

    try:
        trainer = Trainer(config, resume=resume)
        summary = trainer.train()
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if trainer.is_main:
        print(json.dumps(summary, indent=2))
        sys.stdout.flush()
    return 0


def _interrupted(config: Config | None, args: argparse.Namespace) -> str:
    """Where the run can be picked up again, and the command that does it."""
    from rlreason.observe.runlog import checkpoint_step, latest_checkpoint

    launcher = "accelerate launch -m rlreason.train" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "rlreason train"
    command = f"{launcher} {shlex.join([args.config, *args.overrides])} --resume"
    if config is None:
        return f"interrupted before training started; run it again with: {command.removesuffix(' --resume')}"
    last = latest_checkpoint(Path(config.run.output_dir))
    if last is None:
        return f"interrupted before the first checkpoint (run.save_every sets how often one is saved), so resuming starts over; resume with: {command}"
    return f"interrupted; the last checkpoint is {last} (step {checkpoint_step(last)} of {config.train.steps}); resume with: {command}"


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): point stdout at devnull, so that flushing it at exit cannot raise
    again, and exit as a process killed by SIGPIPE does (128 + 13)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate as the trainer does (``rlreason.observe.evaluate``), print the table, and keep the report as a new file:
    ``--out``, or ``eval-<step or model>-<UTC time>.json`` under the run directory's eval reports."""
    import torch

    from rlreason.models import load_model, load_tokenizer
    from rlreason.observe.evaluate import (
        eval_split,
        evaluate_config,
        fmt,
        policy_engine,
        report_path,
        write_report,
    )
    from rlreason.observe.runlog import EVAL_REPORT
    from rlreason.rollout.episodes import Episodes
    from rlreason.scoring import resolve_rewards
    from rlreason.training.distill import run_model

    config, run_dir = _config_from(args.target, args.overrides)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise FileExistsError(f"--out {out} already exists; an earlier report is never replaced, choose another path")
    mc, tc = config.model, config.task
    rewards, data = resolve_rewards(config.rewards), eval_split(config)
    tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
    model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to("cuda" if torch.cuda.is_available() else "cpu")
    engine = policy_engine(config, model, tokenizer)
    result = evaluate_config(config, engine, tokenizer, data, rewards, True, Episodes.from_config(config.rollout))
    step = run_model(run_dir)[1] if run_dir else None
    print(f"model  {mc.name}\ntask   {tc.name}: {result['num_prompts']} held-out prompts\nprecision {result['precision']}")
    table = {"accuracy (greedy)": result["accuracy"], **{k: v for k, v in result.items() if "@" in k}}
    table.update({f"reward {name}": value for name, value in result["rewards"].items()})
    for name, value in table.items():
        print(f"  {name:<28} {fmt(value)}")
    for name, error in result["verifier_errors"].items():
        print(f"verifier {name} failed: {error}")
    what = f"step-{step:06d}" if step is not None else Path(mc.name).name
    report = {"model": mc.name, "step": step, "task": tc.name, "config": config.to_dict(), **result}
    print(f"report {write_report(out or report_path((run_dir or Path(config.run.output_dir)) / EVAL_REPORT, what), report)}")
    return 0


def _print_sft(result: dict) -> None:
    accuracy = " -> ".join(f"{stage} {'n/a' if value is None else format(value, '.3f')}" for stage, value in result["accuracy"].items())
    print(f"sft: loss {result['loss'][0]:.3f} -> {result['loss'][1]:.3f}; held-out accuracy {accuracy}")
    print(f"model saved to {result['model']}")


def cmd_sft(args: argparse.Namespace) -> int:
    from rlreason.training.distill import fine_tune

    _print_sft(fine_tune(load_config(args.config, args.overrides)))
    return 0


def _print_sample(stats: dict) -> None:
    print(f"teacher  {stats['model']}" + (f" (step {stats['step']})" if stats["step"] is not None else ""))
    print(f"sampled  {stats['completions']} completions of {stats['prompts']} train prompts")
    print(f"verified {stats['verified']} ({stats['verified'] / max(stats['completions'], 1):.3f}); truncated {stats['truncated']}")
    print(f"kept     {stats['kept']} completions of {stats['prompts_kept']} prompts -> {stats['out']}")


def cmd_sample(args: argparse.Namespace) -> int:
    from rlreason.training.distill import SAMPLES_FILE, rejection_sample, run_model

    extra = [f"sample.{key}={value}" for key, value in (("n", args.n), ("keep", args.keep)) if value is not None]
    config, run_dir = _config_from(args.target, extra + args.overrides)
    if args.task and args.task != config.task.name:  # the saved task's options would not fit another task
        config, run_dir = _config_from(args.target, [f"task.name={args.task}", "task.options={}", *extra, *args.overrides])
    step = run_model(run_dir)[1] if run_dir else None
    out = Path(args.out or config.sample.out or (run_dir or Path(config.run.output_dir)) / SAMPLES_FILE)
    _print_sample(rejection_sample(config, out, step))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from rlreason.training.distill import distill

    result = distill(load_config(args.config, args.overrides))
    _print_sample(result["sample"])
    _print_sft(result)
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from tasks.registry import load_task

    config = load_config(None, [f"task.options.{o}" for o in args.option] + [f"rollout.env_options.{o}" for o in args.env_option])
    data = load_task(args.task, "train", args.n, args.seed, **dict(config.task.options))
    field = "tool_solution" if args.env else "solution"
    if field not in data.column_names:
        raise SystemExit(f"task {args.task!r} has no {field} to make traces from")
    if args.env:
        from rlreason.training.sft import tool_traces
        from tasks.environments import get_environment

        try:
            conversations = tool_traces(get_environment(args.env, **config.rollout.env_options), data.to_list(), field)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from exc
    else:
        conversations = [[*row["prompt"], {"role": "assistant", "content": row["solution"]}] for row in data]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": messages}) + "\n")
    print(f"wrote {len(data)} traces from the train split of {args.task!r}{f' in {args.env}' if args.env else ''} to {out}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import re

    from rlreason.observe import inspect_run
    from rlreason.observe.report import write_report

    try:
        run = inspect_run.load_run(args.run_dir)
        order = "best" if args.best else "worst" if args.worst else None
        count = args.best or args.worst
        out = []
        if args.html:
            out.append(f"wrote {write_report(run, args.html, args.samples_per_step)}")
        if args.diff:
            out.append(inspect_run.diff(run, *args.diff, limit=args.limit))
        if args.grep:
            out.append(inspect_run.grep(run, args.grep, args.step, order, count or args.limit))
        elif args.step is not None:
            out.append(inspect_run.show_step(run, args.step, order, count))
        elif order:
            out.append(inspect_run.format_completions(inspect_run.select(run, order=order, limit=count)))
        print("\n\n".join(out) if out else inspect_run.summary(run))
        sys.stdout.flush()  # a reader that stopped early is found here, not while the interpreter exits
    except BrokenPipeError:
        return _stdout_closed()
    except (FileNotFoundError, KeyError, re.error) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) else exc}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rlreason.training.checkpoint import export_model

    try:
        out = export_model(Path(args.run_dir), Path(args.out_dir))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model exported to {out}")
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
    ev.add_argument("--out", help="write the report here (never over an existing file); default: a new eval-*.json in eval-reports/")
    ev.set_defaults(func=cmd_eval)
    sft = sub.add_parser("sft", help="supervised fine-tuning on sft.data (a JSONL of chat traces), held-out eval before and after")
    sft.add_argument("config")
    sft.add_argument("overrides", nargs="*")
    sft.set_defaults(func=cmd_sft)
    sample = sub.add_parser("sample", help="rejection sampling: n completions per train prompt, verified ones kept as SFT data")
    sample.add_argument("target", help="config YAML or run directory (its latest checkpoint)")
    sample.add_argument("overrides", nargs="*", help="key=value, e.g. sample.keep=shortest")
    sample.add_argument("--task", help="task to take train prompts from (default: the config's)")
    sample.add_argument("--n", type=int, help="completions per prompt (default: sample.n)")
    sample.add_argument("--keep", choices=choices(SampleConfig, "keep"), help="verified completions kept per prompt (default: sample.keep)")
    sample.add_argument("--out", help="the chat JSONL written (default: sample.out, else samples.jsonl in the run directory)")
    sample.set_defaults(func=cmd_sample)
    distill = sub.add_parser("distill", help="sample.teacher -> rejection sampling -> SFT of model.name -> held-out eval")
    distill.add_argument("config")
    distill.add_argument("overrides", nargs="*")
    distill.set_defaults(func=cmd_distill)
    traces = sub.add_parser("traces", help="write a task's worked solutions as chat JSONL for the cold start")
    traces.add_argument("--task", required=True)
    traces.add_argument("--n", type=int, default=1000)
    traces.add_argument("--out", required=True)
    traces.add_argument("--seed", type=int, default=0)
    traces.add_argument("--option", action="append", default=[], help="task option key=value, e.g. digits=3")
    traces.add_argument("--env", help="write the task's tool_solution as episodes of this environment (its prompt, outputs checked)")
    traces.add_argument("--env-option", action="append", default=[], help="environment option key=value, as rollout.env_options")
    traces.set_defaults(func=cmd_traces)
    ins = sub.add_parser("inspect", help="read a run directory back: curves, completions, eval diffs, an HTML report")
    ins.add_argument("run_dir")
    ins.add_argument("--step", type=int, help="print that step's completions with their rewards and advantages")
    rank = ins.add_mutually_exclusive_group()
    rank.add_argument("--best", type=int, nargs="?", const=5, metavar="K", help="the K highest-reward completions (of --step, or of the run)")
    rank.add_argument("--worst", type=int, nargs="?", const=5, metavar="K", help="the K lowest-reward completions")
    ins.add_argument("--grep", metavar="PATTERN", help="completions matching a regex (case-insensitive), and the share per step")
    ins.add_argument("--diff", nargs=2, metavar=("A", "B"), help="how greedy eval answers changed, e.g. base final, 0 20, grpo@10 final")
    ins.add_argument("--html", metavar="PATH", help="write a self-contained HTML report with plots and a sample browser")
    ins.add_argument("--limit", type=int, default=10, help="matches (--grep) or examples per kind (--diff) printed")
    ins.add_argument("--samples-per-step", type=int, default=32, help="completions per step kept in the HTML report")
    ins.set_defaults(func=cmd_inspect)
    export = sub.add_parser("export", help="a run's latest checkpoint as a standard model directory (LoRA adapters merged)")
    export.add_argument("run_dir")
    export.add_argument("out_dir", help="a new or empty directory")
    export.set_defaults(func=cmd_export)
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
