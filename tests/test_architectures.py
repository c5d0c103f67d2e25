"""Any transformers causal LM trains: one GRPO step on tiny random-init Llama, Qwen2 and DeepseekV3 (MoE + MLA)."""

import pytest
import torch
from conftest import make_tiny_model, write_config
from transformers import AutoModelForCausalLM

from rewards.registry import reward
from rlreason.config import load_config
from rlreason.training.trainer import Trainer


@reward("architectures_alternating")
def alternating(completions, samples):
    """Every group has signal whatever a random model samples (at step 1 the KL to the reference is exactly 0)."""
    return [float(i % 2) for i in range(len(completions))]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
def test_one_grpo_step(arch, tmp_path):
    model_dir = make_tiny_model(tmp_path / arch, arch)
    config = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tmp_path / "run",
        rewards=[{"name": "architectures_alternating"}],
        train={"steps": 1, "learning_rate": 1e-2, "micro_batch_size": 4, "beta": 0.05},
        run={"eval_before": False},
    )
    trainer = Trainer(load_config(config))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["step"] == 1 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["grad_norm"] > 0
    moved = sum(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert moved > 0
    assert (
        type(AutoModelForCausalLM.from_pretrained(model_dir))
        .__name__.lower()
        .startswith(arch.replace("_", ""))
    )
