"""Rejection sampling and distillation: a tiny teacher's verified answers teach a fresh student with another tokenizer.

The toy task ``which_digit`` ("Which digit? 7777" -> 7) is learnable by a two-layer model in a few SFT steps, so a
teacher can be made here by SFT on its worked answers, and the student's held-out gain is clearly above chance.
"""

from __future__ import annotations

import dataclasses
import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import SPECIAL, make_tiny_model, tiny_config
from tokenizers import Tokenizer, decoders, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from rewards.math import extract_answer, parse_number
from rlreason.cli import main
from rlreason.config import ConfigError, load_config
from rlreason.scoring import Scores
from rlreason.training.distill import build_records, keep_indices
from tasks.prompts import chat
from tasks.registry import task
from tasks.sources import split_of


def _problems(split: str) -> list[tuple[int, int]]:
    return [(d, k) for d in range(10) for k in range(1, 41) if split_of(f"which-digit-{d}-{k}") == split]


@task("which_digit", rewards=("math_accuracy",))
def which_digit(split: str, size: int, seed: int = 0):
    from datasets import Dataset

    problems = _problems(split)
    random.Random(seed).shuffle(problems)
    return Dataset.from_list(
        [
            {"prompt": chat(f"Which digit? {str(d) * k}", system=""), "answer": str(d), "solution": str(d), "task": "which_digit"}
            for d, k in problems[:size]
        ]
    )


def make_other_student(directory: Path) -> Path:
    """A student unlike the teacher: another architecture, a shuffled and extended vocabulary, another chat
    template and end token, so only the text of the teacher's answers can carry over."""
    import torch

    chars = list(dict.fromkeys(string.printable))
    random.Random(7).shuffle(chars)
    vocab = {t: i for i, t in enumerate(["<eos>", *SPECIAL, *chars, "ä", "é"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eos>{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer.save_pretrained(directory)
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(tiny_config("qwen2", len(tokenizer), tokenizer.eos_token_id)).save_pretrained(directory)
    return directory


def write(path: Path, model: Path, run_dir: Path, **sections: dict) -> str:
    config = {
        "model": {"name": str(model)},
        "task": {"name": "which_digit", "train_size": 64, "eval_size": 24},
        "rewards": [{"name": "math_accuracy"}, {"name": "think_format", "weight": 0.1}],
        "rollout": {"max_new_tokens": 8},
        "sft": {"batch_size": 16, "learning_rate": 3e-3},
        "run": {"output_dir": str(run_dir), "progress": False},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A teacher made by a short SFT on the task's answers: often right, not always (sampled at temperature 1)."""
    tmp = tmp_path_factory.mktemp("teacher")
    assert main(["traces", "--task", "which_digit", "--n", "64", "--out", str(tmp / "traces.jsonl")]) == 0
    model = make_tiny_model(tmp / "model", "llama", seed=1)
    config = write(tmp / "teacher.yaml", model, tmp / "run", sft={"data": str(tmp / "traces.jsonl"), "steps": 30})
    assert main(["sft", config]) == 0
    return tmp / "run"


def test_sample_keeps_only_verified_train_answers_with_provenance(teacher_run, tmp_path, capsys):
    out = tmp_path / "data.jsonl"
    assert main(["sample", str(teacher_run), "--n", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records, printed
    train_prompts = {f"Which digit? {str(d) * k}" for d, k in _problems("train")}
    for record in records:
        question, answer = record["messages"][-2]["content"], record["messages"][-1]["content"]
        assert question in train_prompts  # never a held-out prompt
        assert parse_number(extract_answer(answer)) == int(question.split()[-1][0]) == int(record["answer"])  # right
        assert record["rewards"]["math_accuracy"] == 1.0
        assert record["source"]["model"] == str(teacher_run / "sft-model") and record["source"]["step"] is None
        assert 0 <= record["source"]["sample"] < 4 and record["source"]["keep"] == "all"
    per_prompt = [(r["messages"][-2]["content"], r["messages"][-1]["content"].strip()) for r in records]
    assert len(per_prompt) == len(set(per_prompt)), "duplicates must be dropped"
    verified = int(printed.split("verified ")[1].split()[0])
    assert verified < 64 * 4, "the teacher should be imperfect, so that the filter is exercised"
    assert main(["sample", str(teacher_run), "--n", "4", "--out", str(out)]) == 2, "an existing dataset is not overwritten"
    assert main(["sft", str(teacher_run.parent / "teacher.yaml")]) == 2, "nor is a finished SFT run"


def test_distill_teaches_a_student_with_another_tokenizer(teacher_run, tmp_path, capsys):
    student = make_other_student(tmp_path / "student")
    teacher_tok = PreTrainedTokenizerFast.from_pretrained(teacher_run / "sft-model")
    student_tok = PreTrainedTokenizerFast.from_pretrained(student)
    assert teacher_tok("Which digit? 7")["input_ids"] != student_tok("Which digit? 7")["input_ids"]
    config = write(
        tmp_path / "distill.yaml",
        student,
        tmp_path / "run",
        sample={"teacher": str(teacher_run), "n": 4, "keep": "shortest"},
        sft={"steps": 40},
    )
    assert main(["distill", config]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["accuracy"]
    assert summary["sft@0"] >= summary["base@0"] + 0.5, summary
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len({json.dumps(r["messages"][:-1]) for r in records}) == len(records), "keep=shortest: one per prompt"
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0  # a run directory of `sft` evaluates its fine-tuned model
    assert "sft-model" in capsys.readouterr().out


def _scores(first: list[float], total: list[float]) -> Scores:
    return Scores(["math_accuracy"], np.array([[v] for v in first]), np.array(total))


def test_keep_modes():
    texts = ["long but right", "wrong", "right", "right ", "also right!"]
    verified = [True, False, True, True, True]
    totals = [1.0, 5.0, 1.1, 1.1, 1.2]
    assert keep_indices(texts, verified, totals, "all") == [0, 2, 4]  # "right " duplicates "right"
    assert keep_indices(texts, verified, totals, "best") == [4]
    assert keep_indices(texts, verified, totals, "shortest") == [2]
    assert keep_indices(texts, [False] * 5, totals, "best") == []


def test_truncated_and_unverified_completions_are_dropped():
    rows = [{"prompt": chat("q1"), "answer": "1", "task": "t"}, {"prompt": chat("q2"), "answer": "2", "task": "t"}]
    texts = ["1", "1 and more", "3", "2"]
    truncated = np.array([False, True, False, False])
    records = build_records(rows, texts, truncated, _scores([1.0, 1.0, 0.0, 1.0], [1, 1, 0, 1]), 2, "all", {"model": "m", "step": 3})
    assert [(r["messages"][-1]["content"], r["source"]["sample"], r["source"]["step"]) for r in records] == [("1", 0, 3), ("2", 1, 3)]
    assert records[1]["messages"][:-1] == chat("q2")


def test_sample_section_is_validated():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["sample.keep=longest", "sample.n=0", "sample.temperature=0"])
    assert any(p.startswith("sample.keep: must be one of") for p in err.value.problems)
    assert "sample.n: must be >= 1" in err.value.problems
    assert "sample.temperature: must be > 0" in err.value.problems


def test_distill_needs_a_teacher(tmp_path):
    config = load_config(None, ["sft.steps=5", f"run.output_dir={tmp_path}"])
    from rlreason.training.distill import distill

    with pytest.raises(ConfigError, match="sample.teacher"):
        distill(config)
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="sample.teacher: .*runs/nothing does not exist"):
        distill(dataclasses.replace(config, sample=dataclasses.replace(config.sample, teacher=str(tmp_path / "runs" / "nothing"))))
