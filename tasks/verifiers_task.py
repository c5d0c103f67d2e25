"""A ``verifiers`` environment's datasets as a task: ``options: {load: "module:function", args: {...}}``.

The rows are the environment's own, formatted by it (``prompt`` with its system prompt and few-shot examples):
train comes from its ``dataset`` and eval from its ``eval_dataset``, train less every problem that also occurs in
eval; an environment without an ``eval_dataset`` has its ``dataset`` divided by ``split_of``. A problem is its
prompt, answer and info together, so an environment whose prompts are all alike (a game seeded through ``info``)
still has one problem per row.

Each row carries ``prompt``, ``task``, ``answer``, ``info`` (a JSON string, which verifiers reads as well),
``example_id``, and where it came from (``vf_env``, ``vf_split``, ``vf_index``): the environment adapter and
the ``verifiers_rubric`` reward run and score each row on the very dataset row behind it.
"""

from __future__ import annotations

import json
from typing import Any

from datasets import Dataset

from rewards.vf_envs import environment_for, spec_problem
from tasks.environments.verifiers_env import message_text
from tasks.registry import task
from tasks.sources import EVAL_SOURCE_SPLIT, problem_key, sample_rows, split_rows

NAME = "verifiers"


def _problem(prompt: list[dict[str, Any]], answer: Any, info: Any) -> str:
    text = " ".join(message_text(m) for m in prompt)
    return json.dumps([problem_key(text), answer, info], sort_keys=True, default=str)


def _candidates(env: Any) -> dict[str, list[dict[str, Any]]]:
    """Each source's rows as (problem key, where it is), named as ``tasks.sources.split_rows`` expects."""
    sources = {}
    for name, dataset in (("train", env.build_dataset()), (EVAL_SOURCE_SPLIT, env.build_eval_dataset())):
        if dataset is None:
            continue
        columns = dataset.column_names
        answers = dataset["answer"] if "answer" in columns else [None] * len(dataset)
        infos = dataset["info"] if "info" in columns else [None] * len(dataset)
        where = "dataset" if name == "train" else "eval_dataset"
        sources[name] = [
            {"key": _problem(prompt, answer, info), "vf_split": where, "vf_index": i}
            for i, (prompt, answer, info) in enumerate(zip(dataset["prompt"], answers, infos, strict=True))
        ]
    return sources


@task(NAME, rewards=("verifiers_rubric",))
def build(split: str, size: int, seed: int = 0, **options: Any) -> Dataset:
    key, env = environment_for(options, "task.options")
    sources = _candidates(env)
    if split == "train" and "train" not in sources:
        raise ValueError(f"task.options.load: {options['load']} has no dataset to train on (only an eval_dataset)")
    picked = sample_rows(split_rows(sources, split, key=lambda r: r["key"]), size, seed, f"{options['load']} {split}")
    rows = []
    for pick in picked:
        dataset = env.build_dataset() if pick["vf_split"] == "dataset" else env.build_eval_dataset()
        source = dataset[pick["vf_index"]]
        info = source.get("info")
        rows.append(
            {
                "prompt": [{"role": m["role"], "content": message_text(m)} for m in source["prompt"]],
                "task": NAME,
                "answer": source.get("answer", ""),
                "info": info if isinstance(info, str) else json.dumps(info or {}),
                "example_id": source["example_id"],
                "vf_env": key,
                "vf_split": pick["vf_split"],
                "vf_index": pick["vf_index"],
            }
        )
    return Dataset.from_list(rows)


def config_problems(task_config: Any, rollout: Any) -> list[str]:
    """The problems of a config's verifiers options, checked without building the environment (for the config's
    validation: the loader is imported and its arguments bound, so a typo is one line before any model loads)."""
    parts = task_config.mix or [{"name": task_config.name, "options": task_config.options}]
    where = [f"task.mix[{i}].options" for i in range(len(parts))] if task_config.mix else ["task.options"]
    problems = [
        spec_problem(part.get("options") or {}, at) for part, at in zip(parts, where, strict=True) if part.get("name") == NAME
    ]
    if rollout.env == NAME:
        if rollout.env_options:
            problems.append(spec_problem(rollout.env_options, "rollout.env_options"))
        others = sorted({part.get("name") for part in parts} - {NAME})
        if others:
            problems.append(f"rollout.env: 'verifiers' runs the rows of the task 'verifiers' only, not of {others}")
    return [p for p in problems if p is not None]
