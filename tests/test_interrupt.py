"""Ending a command the way users do: Ctrl-C during training, and a reader that stops early (``| head``)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import write_config

from rlreason.observe.runlog import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_and_the_resume_command(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    path = write_config(
        tmp_path / "c.yaml", tiny_llama, run_dir, rewards=[{"name": "conftest:char_codes"}],
        train={"steps": 1000}, run={"eval_before": False, "save_every": 1},
    )
    command = [sys.executable, "-m", "rlreason", "train", str(path), "train.seed=3"]
    # a session of its own, so that the signal reaches every process of it, as Ctrl-C in a terminal does
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    # any complete checkpoint: run.keep_last deletes step 1's two saves later, which a starved poll can miss
    while not list((run_dir / "checkpoints").glob("step-??????")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted; the last checkpoint is"), err[-2000:]
    steps = [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert steps and len(lines) == len(steps) and steps == list(range(1, len(steps) + 1))  # every line whole
    last = max((run_dir / "checkpoints").glob("step-??????"))
    assert str(last) in err
    assert f"resume with: rlreason train {path} train.seed=3 --resume" in err


def handmade_run(path: Path, rows: int = 2000) -> Path:
    path.mkdir()
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    row = {"step": 1, "prompt": "p", "completion": "x" * 50, "rewards": {"r": 0.5}, "total": 0.5, "advantage": 0.0, "length": 50}
    (path / "completions.jsonl").write_text("".join(json.dumps({**row, "completion": f"{i} " + "x" * 50}) + "\n" for i in range(rows)))
    return path


def test_inspect_into_a_reader_that_closes_early_exits_quietly(tmp_path):
    run_dir = handmade_run(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-m", "rlreason", "inspect", str(run_dir), "--step", "1"], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().startswith("step 1:")
    process.stdout.close()  # as `| head -1` does
    err = process.stderr.read()
    assert process.wait(timeout=60) == 141 and err == "", err


def test_a_ctrl_c_whose_keyboard_interrupt_is_dropped_still_ends_the_run(tmp_path):
    """A KeyboardInterrupt raised inside a finalizer is printed as ignored and lost; the run must stop all the same,
    at the next step. In a process of its own: the handler is process-wide."""
    code = (
        "import gc, os, signal, sys\n"
        "from rlreason.training import interrupt\n"
        "interrupt.install()\n"
        "class Finalized:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        sum(range(10**5))\n"  # the handler runs here, inside the finalizer, and its exception is dropped
        "Finalized()\n"
        "gc.collect()\n"
        "print('trained on', flush=True)\n"
        "try:\n"
        "    interrupt.raise_if_requested()\n"
        "except KeyboardInterrupt:\n"
        "    sys.exit(130)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert "Exception ignored" in done.stderr and "KeyboardInterrupt" in done.stderr, done.stderr
    assert done.stdout == "trained on\n" and done.returncode == 130, (done.stdout, done.stderr)
