"""Run by tests/test_fsdp2.py in a process of its own: torch's FSDP2 (``fully_shard``) over one gloo process on
the CPU, which accelerate does not launch on a CPU; prints one line per check."""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import peft
import torch
import torch.distributed as dist
from conftest import make_tiny_model
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlreason.config import ConfigError
from rlreason.rollout.engine import SamplingParams
from rlreason.rollout.fast import FastEngine
from rlreason.training.checkpoint import Checkpointed, full_weights, load_checkpoint, save_checkpoint


def shard(model: torch.nn.Module, layers: torch.nn.ModuleList, mesh) -> torch.nn.Module:
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def engine_checks(directory: Path, mesh) -> None:
    """The fast engine on sharded weights (plain and with LoRA adapters) draws what it draws on unsharded ones."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = [tokenizer("12+7=")["input_ids"], tokenizer("abc")["input_ids"]]
    for lora in (False, True):
        model = AutoModelForCausalLM.from_pretrained(directory)
        if lora:
            model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_()
        unsharded = copy.deepcopy(model)
        shard(model, (model.get_base_model() if lora else model).model.layers, mesh)
        sharded, plain = FastEngine(model, tokenizer, kernels="torch"), FastEngine(unsharded, tokenizer, kernels="torch")
        for sampling in (SamplingParams(max_new_tokens=12, greedy=True), SamplingParams(max_new_tokens=12)):
            a = sharded.generate(prompts, 3, sampling, list(range(6)))
            b = plain.generate(prompts, 3, sampling, list(range(6)))
            same = torch.equal(a.completion_ids, b.completion_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-6)
            print(f"engine lora={lora} greedy={sampling.greedy} same={same} freed={sharded.weights.layers is None}")


def checkpoint_checks(directory: Path, mesh) -> None:
    """Full weights and full optimizer state saved from a sharded model, and restored into a fresh one exactly."""
    tokenizer = AutoTokenizer.from_pretrained(directory)
    accelerator = SimpleNamespace(is_main_process=True, process_index=0, wait_for_everyone=lambda: None,
                                  unwrap_model=lambda m: m)

    def parts() -> Checkpointed:
        model = AutoModelForCausalLM.from_pretrained(directory)
        shard(model, model.model.layers, mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return Checkpointed(accelerator, model, tokenizer, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))

    def step(p: Checkpointed) -> None:
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        p.model(input_ids=ids, labels=ids).loss.backward()
        p.optimizer.step()
        p.optimizer.zero_grad()

    first, run = parts(), Path(tempfile.mkdtemp())
    step(first)
    saved = save_checkpoint(run, 1, 0, first, keep_last=1)
    live = full_weights(accelerator, first.model)
    loaded = AutoModelForCausalLM.from_pretrained(saved / "model").state_dict()
    print(f"checkpoint loads plainly: {all(torch.equal(live[k], loaded[k]) for k in live)}")
    second = parts()
    load_checkpoint(saved, run, second)
    step(first)
    step(second)
    a, b = full_weights(accelerator, first.model), full_weights(accelerator, second.model)
    print(f"resumed step equal: {all(torch.equal(a[k], b[k]) for k in a)}")
    plain = AutoModelForCausalLM.from_pretrained(directory)
    optimizer = torch.optim.AdamW(plain.parameters())
    try:
        load_checkpoint(saved, run, Checkpointed(accelerator, plain, tokenizer, optimizer,
                                                 torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)))
        print("unsharded resume refused: False")
    except ConfigError as refused:
        print(f"unsharded resume refused: {len(refused.problems) == 1}")


if __name__ == "__main__":
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1,))
    model_dir = make_tiny_model(Path(tempfile.mkdtemp()), seed=3)
    engine_checks(model_dir, mesh)
    checkpoint_checks(model_dir, mesh)
    dist.destroy_process_group()
