"""What a training run loads before its first step: data and rewards (checked against each other first, so a
dataset that cannot be scored is refused before any model loads), then tokenizer, policy, optimizer, scheduler
and the frozen reference."""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator

from rlreason.config import Config, ConfigError
from rlreason.data import task_dataset
from rlreason.models import apply_lora, causal_lm, compile_decoder, load_model, load_tokenizer
from rlreason.observe.evaluate import eval_split, precision
from rlreason.scoring import missing_fields, resolve_rewards
from rlreason.training.logprobs import EAGER_HEAD, compiled_head_math

DEEPSPEED_REFUSED = (
    "accelerate: DeepSpeed is not a supported launcher; to shard parameters, gradients and optimizer state, "
    "launch with --config_file configs/accelerate/fsdp2.yaml (FSDP2)"
)


def make_accelerator(config: Config) -> Accelerator:
    """The run's accelerator; a ``ConfigError`` if the prompts of a step cannot be split into whole groups over
    its processes, or if the launcher asks for DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # what `accelerate launch` sets
        raise ConfigError([DEEPSPEED_REFUSED])
    use_bf16 = precision(config) == "bf16"
    # cpu=True on GPU-less machines: without it accelerate ignores the launcher's WORLD_SIZE and each
    # process would train alone
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not torch.cuda.is_available())
    if accelerator.device.type == "cpu":
        keep_freed_memory()
    world, prompts = accelerator.num_processes, config.rollout.prompts_per_step
    if prompts % world:
        raise ConfigError([
            f"rollout.prompts_per_step: {prompts} prompts cannot be split into whole groups "
            f"over {world} processes; use a multiple of {world}"
        ])
    return accelerator


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a training step frees for the next one, instead of handing each large
    block back to the kernel (mmap) and faulting its pages in again, zeroed, at the next allocation: on the CPU a
    step allocates and frees gigabytes of logits, activations and gradients in blocks of tens of megabytes. Only
    the allocator's thresholds change (process-wide); the memory held stays near a step's peak. Returns whether
    they did: other C libraries are left as they are."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def adamw(params: list[torch.nn.Parameter], device: torch.device, **options: Any) -> torch.optim.AdamW:
    """AdamW, fused on CUDA and CPU devices: the update in one pass over each tensor instead of a dozen foreach
    kernels, which on a small model's CPU step is a visible share of the step."""
    return torch.optim.AdamW(params, fused=True if device.type in ("cuda", "cpu") else None, **options)


@dataclass(frozen=True)
class TrainingData:
    rewards: Any
    train: Any
    eval: Any


def load_training_data(config: Config) -> TrainingData:
    """The reward functions and the train and eval splits; a ``ConfigError`` if a reward lacks its fields."""
    tc = config.task
    rewards = resolve_rewards(config.rewards)
    train = task_dataset(tc, "train", config.train.seed)
    evaluation = eval_split(config)
    columns = train.column_names + (["turns"] if config.rollout.env else [])  # episodes add their turns
    problems = missing_fields(rewards, columns, "+".join(m["name"] for m in tc.mix) or tc.name)
    if problems:
        raise ConfigError(problems)
    return TrainingData(rewards, train, evaluation)


@dataclass(frozen=True)
class TrainingModels:
    """The policy and its optimizer as prepared by accelerate, the scheduler, the head's math for the log-prob
    passes, and the reference (None when the objective needs none, or under ``model.lora``, where the reference is
    the policy with its adapters switched off)."""

    tokenizer: Any
    model: Any
    optimizer: Any
    scheduler: Any
    head_math: Any
    reference: Any


def load_training_models(config: Config, accelerator: Accelerator, with_reference: bool) -> TrainingModels:
    mc, tr = config.model, config.train
    tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
    model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision)
    if mc.lora is not None:
        model = apply_lora(model, mc.lora)
    if tr.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if mc.lora is not None:  # the embeddings are frozen: checkpointed layers need inputs that carry gradients
            model.enable_input_require_grads()
    head_math = EAGER_HEAD
    if tr.compile:
        compile_decoder(causal_lm(model), mode="reduce-overhead" if tr.cuda_graphs else None)
        head_math = compiled_head_math()
    # The model is still on the CPU here; accelerate moves it below, before the first step, which is when AdamW
    # checks the devices.
    optimizer = adamw(
        [p for p in model.parameters() if p.requires_grad], accelerator.device,
        lr=tr.learning_rate, betas=tuple(tr.adam_betas), weight_decay=tr.weight_decay,
    )
    # Not prepared by accelerate: its wrapper steps once per process, which would shorten warm-up.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (tr.warmup_steps + 1)))
    model, optimizer = accelerator.prepare(model, optimizer)
    reference = None
    if with_reference and mc.lora is None:
        reference = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to(accelerator.device)
        reference.eval().requires_grad_(False)
    return TrainingModels(tokenizer, model, optimizer, scheduler, head_math, reference)
