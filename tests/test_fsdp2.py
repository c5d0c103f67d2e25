"""FSDP2 on the CPU: torch's ``fully_shard`` over one gloo process (accelerate launches FSDP only on GPUs; the
GPU path, with real launches and a killed run resumed, is benchmarks/gpu_fsdp2_checks.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_sharded_weights_generate_and_checkpoint_as_unsharded_ones():
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp2_job.py"), free_port()], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("engine")] == [
        f"engine lora={lora} greedy={greedy} same=True freed=True" for lora in (False, True) for greedy in (True, False)
    ]
    assert "checkpoint loads plainly: True" in lines
    assert "resumed step equal: True" in lines
    assert "unsharded resume refused: True" in lines
