"""The run directory of a training run: created without overwriting another run, checkpointed so that a partial
checkpoint is never resumed, resumed from its latest complete checkpoint with the logs cut back to its step, and
summed up in summary.json."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlreason.config import Config, ConfigError, load_config
from rlreason.models import is_peft, load_adapter, load_model, merged
from rlreason.observe.runlog import (
    CHECKPOINT_DIR,
    CHECKPOINT_NAME,
    COMPLETIONS,
    CONFIG,
    EVALS,
    METRICS,
    RUN_OUTPUTS,
    SUMMARY,
    checkpoint_step,
    latest_checkpoint,
    read_jsonl,
    truncate_after,
)
from rlreason.rollout.fast_weights import is_sharded


def run_inputs(config: Config) -> dict[str, Path]:
    """The files and directories the run reads, by config field: no overwrite may delete them."""
    named: dict[str, Any] = {"model.name": config.model.name, "sft.data": config.sft.data, "sample.teacher": config.sample.teacher}
    named |= {f"task.options.{key}": value for key, value in config.task.options.items()}
    for i, part in enumerate(config.task.mix):
        named |= {f"task.mix[{i}].options.{key}": value for key, value in (part.get("options") or {}).items()}
    return {
        field: Path(value).expanduser().resolve()
        for field, value in named.items()
        if isinstance(value, str) and value and Path(value).expanduser().exists()
    }


def remove_outputs(run_dir: Path, inputs: dict[str, Path]) -> None:
    """Delete the run outputs in ``run_dir`` (``RUN_OUTPUTS``, nothing else), after checking that none of them holds,
    or lies inside, an input of the new run; on such a conflict nothing is deleted."""
    outputs = [path for path in (run_dir / name for name in RUN_OUTPUTS) if path.exists()]
    for output in outputs:
        for field, source in inputs.items():
            if source.is_relative_to(output.resolve()) or output.resolve().is_relative_to(source):
                raise FileExistsError(
                    f"run.overwrite=true would delete {output}, and {field} ({source}) is read from there: "
                    "choose another run.output_dir"
                )
    for output in outputs:
        shutil.rmtree(output) if output.is_dir() else output.unlink()


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """Create the run directory; refuse to write over a run (any of its outputs, even of a run killed before its
    first step) unless asked to resume it or to replace it."""
    run_dir = Path(config.run.output_dir)
    holds_run = any((run_dir / name).exists() for name in RUN_OUTPUTS)
    if holds_run and not resume:
        if not config.run.overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run: pass --resume to continue it or set run.overwrite=true to replace it"
            )
        remove_outputs(run_dir, run_inputs(config))
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def is_finished(run_dir: Path, steps: int) -> bool:
    """The run ran to its end: its latest checkpoint is at ``steps`` or later and its final evaluation is logged
    (a finished run resumed with more ``train.steps`` is not finished: it trains on)."""
    step = checkpoint_step(latest_checkpoint(run_dir))
    finals = {e["step"] for e in read_jsonl(run_dir / EVALS) if e.get("stage") == "final"}
    return step is not None and step >= steps and step in finals


def write_summary(run_dir: Path, step: int, is_main: bool) -> dict[str, Any]:
    """Held-out accuracy at each evaluated stage, written to summary.json (by the main process)."""
    evals = read_jsonl(run_dir / EVALS)
    summary = {"steps": step, "accuracy": {f"{e['stage']}@{e['step']}": e["accuracy"] for e in evals}}
    if is_main:
        (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    return summary


@dataclass(frozen=True)
class Checkpointed:
    """What a checkpoint holds of a run: weights (under ``model.lora`` only the adapters, as peft saves them; the
    reference's too when it moves: ``reference_moves``), tokenizer, optimizer and scheduler state; the step, data
    position and RNG are saved alongside."""

    accelerator: Accelerator
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    reference: Any = None
    reference_moves: bool = False


def full_weights(accelerator: Accelerator, model: Any, main_only: bool = True) -> dict[str, torch.Tensor]:
    """The model's full weights (a collective under FSDP2: every process calls it). Unsharded: accelerate's
    ``get_state_dict`` (``main_only``) or the model's own ``state_dict``, as before. Sharded: every DTensor gathered
    once (tied ones once), in the same order on every process; with ``main_only`` onto the main process's CPU
    memory (the others get an empty dict), else kept on the device in every process."""
    if not is_sharded(model):
        return accelerator.get_state_dict(model) if main_only else accelerator.unwrap_model(model).state_dict()
    keep = accelerator.is_main_process or not main_only
    weights, seen = {}, {}
    for name, tensor in accelerator.unwrap_model(model).state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            full = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
            seen[id(tensor)] = (full.cpu() if main_only else full) if keep else None
        if keep:
            weights[name] = seen[id(tensor)]
    return weights


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (what torch.distributed.checkpoint reads and steps)."""
    return getattr(optimizer, "optimizer", optimizer)


def _plain_twin(model: Any, weights: dict[str, torch.Tensor]) -> Any:
    """An unsharded model holding ``weights`` (assigned, no copy): what ``save_pretrained`` is called on under
    FSDP2, whose DTensor parameters transformers' tied-weight checks cannot read."""
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(model.config, dtype=next(iter(weights.values())).dtype)
    twin.load_state_dict(weights, assign=True, strict=False)
    twin.tie_weights()
    twin.generation_config = model.generation_config
    return twin


def _refuse_mismatch(checkpoint: Path, saved_sharded: bool, sharded: bool) -> None:
    if saved_sharded and not sharded:
        raise ConfigError([f"{checkpoint} was saved by a sharded (FSDP2) run: resume it with --config_file configs/accelerate/fsdp2.yaml"])
    if sharded and not saved_sharded:
        raise ConfigError([f"{checkpoint} was saved by an unsharded run: resume it without FSDP2 (the launcher config it was trained with)"])


def save_checkpoint(run_dir: Path, step: int, position: int, parts: Checkpointed, keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` under a temporary name and rename it, so a partial one is never resumed; keep
    the ``keep_last`` newest."""
    accelerator = parts.accelerator
    final = run_dir / CHECKPOINT_DIR / f"step-{step:06d}"
    partial = final.with_name(final.name + ".tmp")
    accelerator.wait_for_everyone()
    sharded = is_sharded(parts.model)
    weights = full_weights(accelerator, parts.model)  # collective: full weights even when sharded
    if sharded:  # collective too: each process holds a shard of the moments; the main process gets them whole
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optimizer = get_optimizer_state_dict(parts.model, _inner(parts.optimizer), options=options)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        model = accelerator.unwrap_model(parts.model)
        if sharded and not is_peft(model):  # a peft model saves only its adapters, read from ``weights``
            model = _plain_twin(model, weights)
        model.save_pretrained(partial / "model", state_dict=weights)
        if parts.reference is not None and parts.reference_moves:
            parts.reference.save_pretrained(partial / "reference")
        parts.tokenizer.save_pretrained(partial / "model")
        if not sharded:
            optimizer = parts.optimizer.state_dict()
        state = {"step": step, "position": position, "optimizer": optimizer, "scheduler": parts.scheduler.state_dict()}
        if sharded:  # only then, so an unsharded run's trainer_state.pt is what it always was
            state["sharded"] = True
        torch.save(state, partial / "trainer_state.pt")
    accelerator.wait_for_everyone()
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, partial / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        kept = sorted((p for p in final.parent.glob("step-*") if CHECKPOINT_NAME.fullmatch(p.name)), key=lambda p: p.name)
        for old in kept[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(checkpoint: Path, run_dir: Path, parts: Checkpointed) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler and RNG from ``checkpoint`` and cut the logs back to its step; returns
    the step and the data position. ``parts.reference`` is restored when the checkpoint saved one."""
    accelerator = parts.accelerator
    model = accelerator.unwrap_model(parts.model)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    sharded = is_sharded(parts.model)
    _refuse_mismatch(checkpoint, bool(state.get("sharded")), sharded)
    if sharded:  # every process reads the full state and keeps its own shards of it
        full = StateDictOptions(full_state_dict=True, strict=not is_peft(model))
        if is_peft(model):
            weights = adapter_weights(model, checkpoint / "model")
        else:
            weights = AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict()
        set_model_state_dict(parts.model, weights, options=full)
        set_optimizer_state_dict(parts.model, _inner(parts.optimizer), state["optimizer"], options=full)
    elif is_peft(model):
        load_adapter(model, checkpoint / "model")
    else:
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict())
    if parts.reference is not None and (checkpoint / "reference").is_dir():
        parts.reference.load_state_dict(AutoModelForCausalLM.from_pretrained(checkpoint / "reference").state_dict())
    if not sharded:
        parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    rng = torch.load(checkpoint / f"rng-{accelerator.process_index}.pt", weights_only=False)
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    if accelerator.is_main_process:
        for name in (METRICS, COMPLETIONS, EVALS):
            truncate_after(run_dir / name, state["step"])
    return state["step"], state["position"]


def adapter_weights(model: Any, directory: Path) -> dict[str, torch.Tensor]:
    """The adapters peft saved in ``directory``, under ``model``'s own state-dict names (peft drops the adapter
    name when saving): what ``set_model_state_dict`` loads into a sharded peft model."""
    import peft  # a peft model exists, so peft is imported already

    saved = peft.utils.load_peft_weights(str(directory))
    name = model.active_adapter
    weights = {key: saved[plain] for key in model.state_dict() if (plain := key.replace(f".{name}.", ".")) != key and plain in saved}
    if len(weights) != len(saved):
        raise ValueError(f"{directory}: {len(saved) - len(weights)} saved adapter tensors match no parameter of the model")
    return weights


def export_model(run_dir: Path, out_dir: Path) -> Path:
    """The latest checkpoint of ``run_dir`` as a standard model directory (weights, config, tokenizer) in
    ``out_dir``, which ``AutoModelForCausalLM.from_pretrained`` loads without peft or rlreason: a LoRA run's
    adapters are merged into the base model named by the run's config, a full fine-tuning run's model is saved
    as it is. Refuses an ``out_dir`` that holds anything, so no model is ever written over."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose another OUT_DIR")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} holds no checkpoint to export")
    mc, source = load_config(run_dir / CONFIG).model, checkpoint / "model"
    if (source / "adapter_config.json").is_file():
        from peft import PeftModel  # only a LoRA run's export needs it

        model = PeftModel.from_pretrained(load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision), source)
    else:
        model = load_model(str(source), dtype=mc.dtype)
    merged(model).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(out_dir)
    return out_dir
