"""End to end on a tiny random-init model: the run directory, its logs, checkpoints and resume."""

import json
import resource
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_tiny_model, write_config
from transformers import AutoModelForCausalLM

from rlreason.cli import main
from rlreason.config import load_config
from rlreason.objective.objective import TokenMean
from rlreason.observe.runlog import latest_checkpoint, read_jsonl
from rlreason.training.logprobs import compiled_head_math
from rlreason.training.step_log import merge_process_stats
from rlreason.training.trainer import Trainer


def test_two_steps_write_a_complete_run_directory(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    rewards = [
        {"name": "math_accuracy"},
        {"name": "think_format", "weight": 0.2},
        {"name": "conftest:sevens"},
    ]
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, run_dir, run={"save_every": 1, "keep_last": 1}, rewards=rewards
    )
    assert main(["train", str(config)]) == 0

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["rollout"]["group_size"] == 4
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for key in (
        "reward",
        "rewards/math_accuracy",
        "rewards/think_format",
        "rewards/conftest:sevens",
        "accuracy",
        "completion_length",
        "clip_fraction",
        "grad_norm",
        "lr",
        "time_generate",
        "time_optimize",
        "tokens_per_s",
        "entropy",
    ):
        assert key in metrics[0], key
    completions = read_jsonl(run_dir / "completions.jsonl")
    assert len(completions) == 2 * 2 * 4
    assert set(completions[0]) >= {"step", "prompt", "completion", "rewards", "total", "advantage", "length"}
    # advantages of each group sum to zero
    for start in range(0, len(completions), 4):
        assert abs(sum(c["advantage"] for c in completions[start : start + 4])) < 1e-4
    evals = read_jsonl(run_dir / "evals.jsonl")
    assert [e["stage"] for e in evals] == ["base", "final"] and len(evals[0]["samples"]) == 8
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"]  # keep_last=1 pruned step 1
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-000002" / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    changed = any(
        not torch.equal(a, b) for a, b in zip(reloaded.parameters(), original.parameters(), strict=True)
    )
    assert changed, "two steps at lr 1e-3 must have moved the weights"


def test_resume_continues_exactly(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = {
        "rewards": [{"name": "conftest:char_codes"}],  # no flat group: step 3's update runs, so it has a ratio
        "run": {"save_every": 1, "eval_before": False},
        "train": {"steps": 3, "learning_rate": 1e-3, "micro_batch_size": 4, "num_iterations": 2},
    }
    write_config(tmp_path / "a.yaml", model_dir, straight, **common)
    assert main(["train", str(tmp_path / "a.yaml")]) == 0

    write_config(tmp_path / "b.yaml", model_dir, resumed, **common)
    config = load_config(tmp_path / "b.yaml", ["train.steps=2"])
    Trainer(config).train()
    # pretend the run died after step 2's checkpoint but with a step 3 half-logged
    with open(resumed / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "reward": 123.0}) + "\n")
    (resumed / "checkpoints" / "step-000003.tmp").mkdir()
    assert latest_checkpoint(resumed).name == "step-000002"
    assert main(["train", str(tmp_path / "b.yaml"), "--resume"]) == 0

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "completion_length", "ratio"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    texts = lambda rows: [r["completion"] for r in rows if r["step"] == 3]  # noqa: E731
    assert texts(read_jsonl(straight / "completions.jsonl")) == texts(
        read_jsonl(resumed / "completions.jsonl")
    )


def test_existing_run_is_not_overwritten(tiny_llama, tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run", train={"steps": 1}, run={"eval_before": False}
    )
    assert main(["train", str(config)]) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["train", str(config)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_bad_config_exits_2_before_loading_a_model(tmp_path, capsys):
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "no-model-here", tmp_path / "run", rollout={"group_size": 1}
    )
    assert main(["train", str(config)]) == 2
    assert "rollout.group_size: must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_reference_model_only_when_beta_positive(tiny_llama, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_llama,
        tmp_path / "run",
        train={"steps": 1, "beta": 0.1},
        run={"eval_before": False},
    )
    trainer = Trainer(load_config(config))
    assert trainer.reference is not None
    metrics = trainer.train_step()
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: policy == reference
    no_ref = Trainer(load_config(config, ["train.beta=0.0", f"run.output_dir={tmp_path / 'run2'}"]))
    assert no_ref.reference is None


def test_cuda_graph_layout_trains_like_the_plain_one(tmp_path, monkeypatch):
    """train.cuda_graphs changes the row layout (rows padded on the right to 64-token widths) and where the
    gradients accumulate (tensors kept from step to step, zeroed after each update); with the compiler left out on
    the CPU, each step's gradient must be the plain layout's (the head's math compiled without code generation). The
    graphs themselves need a GPU (benchmarks/throughput.py --cuda-graphs). Updates are left out so that both runs see the same batches."""
    import rlreason.training.setup as setup_module

    monkeypatch.setattr(setup_module, "compile_decoder", lambda model, **kw: None)
    monkeypatch.setattr(setup_module, "compiled_head_math", lambda: compiled_head_math(backend="aot_eager"))
    model_dir = make_tiny_model(tmp_path / "model")
    results = {}
    for graphs in (False, True):
        path = write_config(
            tmp_path / f"{graphs}.yaml", model_dir, tmp_path / f"run-{graphs}", rewards=[{"name": "conftest:char_codes"}],
            rollout={"engine": "fast"}, train={"compile": True, "cuda_graphs": graphs, "micro_batch_size": 2},
            run={"eval_before": False},
        )
        trainer = Trainer(load_config(path))
        gradients = []
        trainer.optimizer.step = lambda t=trainer, out=gradients: out.append([p.grad.clone() for p in t.model.parameters()])
        for _ in range(2):
            trainer.train_step()
        rollout = trainer._sample_groups(2, 4).rollout
        results[graphs] = (gradients, trainer._model_inputs(rollout), [p.grad for p in trainer.model.parameters()])
    (plain, plain_inputs, plain_kept), (graphed, inputs, kept) = results[False], results[True]
    assert all(x.input_ids.shape[1] % 64 == 0 for x in inputs) and not any(x.input_ids.shape[1] % 64 == 0 for x in plain_inputs)
    for x, y in zip(plain_inputs, inputs, strict=True):  # the same rows, padding columns added after the completions only
        assert torch.equal(y.input_ids[:, : x.input_ids.shape[1]], x.input_ids) and not y.attention_mask[:, x.input_ids.shape[1] :].any()
        assert torch.equal(y.completion_mask, x.completion_mask) and torch.equal(y.hidden_cols, x.hidden_cols)
    assert all(g is not None and not g.any() for g in kept) and all(g is None for g in plain_kept)
    for step_plain, step_graphed in zip(plain, graphed, strict=True):  # each step's gradient, bf16 autocast's rounding apart
        a, b = torch.cat([g.flatten() for g in step_plain]), torch.cat([g.flatten() for g in step_graphed])
        assert float((a - b).norm()) < 0.01 * float(a.norm())


def test_token_mean_metrics_do_not_depend_on_the_micro_batch_split(tiny_llama, tmp_path):
    """entropy, ratio, kl and the clip fractions are means over the step's tokens, whatever the micro-batches (in
    float32: bf16 autocast rounds differently for each micro-batch shape)."""
    results = {}
    for size in (8, 4, 2):
        path = write_config(
            tmp_path / f"{size}.yaml", tiny_llama, tmp_path / f"run-{size}", rewards=[{"name": "conftest:char_codes"}],
            rollout={"max_new_tokens": 48},
            train={"micro_batch_size": size, "num_iterations": 2, "learning_rate": 0.05, "beta": 0.1, "bf16": "false"},
            run={"eval_before": False},
        )
        results[size] = Trainer(load_config(path)).train_step()
    whole = results[8]
    assert len({round(c["length"]) for c in read_jsonl(tmp_path / "run-8" / "completions.jsonl")}) > 2  # lengths differ
    assert whole["clip_fraction"] > 0 and whole["ratio"] != 1.0
    for size in (4, 2):
        for key in ("entropy", "ratio", "kl", "clip_fraction", "clip_fraction_low", "clip_fraction_high"):
            assert results[size][key] == pytest.approx(whole[key], rel=1e-5, abs=1e-7), (size, key)


def test_stats_of_processes_merge_into_the_step_s_token_means_and_counts():
    """Each process's token means carry their token counts, so the step's mean weighs each token once."""
    first = {"entropy": TokenMean(10.0, 10.0), "overlong/masked": 1, "grad_norm": 2.0, "loss": 0.5}
    second = {"entropy": TokenMean(90.0, 30.0), "overlong/masked": 2, "grad_norm": 2.0, "loss": 1.5}
    merged = merge_process_stats([first, second])
    assert merged["entropy"].value == 2.5  # 100 / 40 tokens; the mean of the two process means would be 2.0
    assert merged["overlong/masked"] == 3 and merged["grad_norm"] == 2.0 and merged["loss"] == 1.0


def test_a_cpu_run_keeps_freed_memory_for_the_next_step():
    """After ``keep_freed_memory`` (which a CPU run's accelerator applies) a freed 64 MiB block is handed out again
    without faulting its pages in from the kernel; before it, every such allocation faults all of them. In a process
    of its own: the setting is process-wide."""
    code = (
        "import resource, torch\n"
        "from rlreason.training.setup import keep_freed_memory\n"
        "def faults():\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(5):\n"
        "        torch.ones(16 << 20)\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before\n"
        "plain = faults()\n"
        "assert keep_freed_memory()\n"
        "faults()\n"
        "print(plain, faults())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    plain, kept = map(int, out.stdout.split())
    pages = 5 * (64 << 20) // resource.getpagesize()
    assert plain > 0.9 * pages and kept < 0.05 * pages
