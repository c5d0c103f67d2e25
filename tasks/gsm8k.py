"""GSM8K-format word problems: ``question`` plus an ``answer`` whose last line is ``#### N``."""

from __future__ import annotations

import re

from datasets import Dataset

from tasks.prompts import chat, worked_solution
from tasks.registry import task
from tasks.sources import load_source, problem_key, sample_rows, split_rows

_CALCULATOR = re.compile(r"<<[^>]*>>")


def parse_gsm8k_answer(text: str) -> tuple[str, str]:
    """The reasoning (calculator annotations ``<<6*4=24>>`` removed) and the final number (commas removed)."""
    reasoning, marker, final = text.rpartition("####")
    number = final.strip().replace(",", "")
    if not marker or not number:
        raise ValueError(f"a GSM8K answer must end with '#### <number>', got {text[-80:]!r}")
    return _CALCULATOR.sub("", reasoning).strip(), number


@task("gsm8k", rewards=("math_accuracy",))
def gsm8k(
    split: str, size: int, seed: int = 0, source: str = "openai/gsm8k", config: str = "main"
) -> Dataset:
    """``size`` GSM8K problems; ``source`` is a hub id (``config`` names its subset) or a local file/folder.

    Eval is the source's ``test`` split when it has one (see ``tasks.sources``).
    """
    rows = split_rows(load_source(source, config), split, key=lambda row: problem_key(row["question"]))
    picked = sample_rows(rows, size, seed, f"the {split} split of {source}")
    out = []
    for row in picked:
        reasoning, answer = parse_gsm8k_answer(row["answer"])
        out.append(
            {
                "prompt": chat(row["question"]),
                "answer": answer,
                "solution": worked_solution(reasoning, answer),
                "task": "gsm8k",
            }
        )
    return Dataset.from_list(out)
