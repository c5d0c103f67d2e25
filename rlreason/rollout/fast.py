"""A fast rollout engine for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2, Qwen3): ``rollout.engine: fast``.

Same interface and, for the same seeds, the same completions as ``HFEngine`` (the reference; tests say so), but:

- each prompt is prefilled once; its keys and values are stored once and read by all n completions of its group
  (the group's queries attend the shared prompt cache, then each row its own completion cache); the prompts' common
  prefix (a system prompt) is computed once for all of them;
- a static KV cache; on CUDA each decode step (the whole forward, sampling and bookkeeping) is captured in a CUDA
  graph, so a step costs one graph launch. With Triton (``kernels="triton"``, the default on CUDA when it is
  installed) the step is seven launches a layer (rlreason.rollout.triton_decode: the norms folded into the weights, the
  residual added by the output projections) and two for the draw, and its attention reads the step number on the
  device, so one graph serves every step; the caches, graphs and weight copies are then freed after
  each call (``release_memory``) and generation adds nothing to the training step's peak memory. With
  ``kernels="torch"`` (any device) there is one graph per cache-width bucket of ``block`` slots;
- sampling on the device with ``rlreason.rollout.sampling``'s per-completion seeds (temperature, top-k, top-p);
- the log-probability of every sampled token (at the sampling temperature, before top-k/top-p, like
  ``completion_logprobs``) recorded as it is sampled: ``Rollout.logprobs``;
- finished rows stop costing: the loop ends when every row has ended, and when half of the rows have ended the
  live ones are compacted into a batch half as large (each row then holds its own copy of its prompt's cache).

It computes the model itself from the module's weights (no ``model.forward``); on CUDA (and wherever it computes in
another dtype than the model's, such as bf16 on a float32 model's CPU) it keeps its own copy of the weights in the
compute dtype, with q/k/v and gate/up fused, refreshed from the model at every ``generate`` (or held, from
``snapshot`` to ``unpin``, while another thread trains the model).
Left out: sliding-window attention beyond the window, dynamic RoPE scaling, other architectures (use "hf").
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlreason import onednn
from rlreason.models import causal_lm
from rlreason.rollout.engine import (
    Rollout,
    SamplingParams,
    completion_mask,
    draw_seeds,
    eos_token_ids,
    left_pad,
)
from rlreason.rollout.fast_graphs import StepRunner
from rlreason.rollout.fast_ops import TorchOps
from rlreason.rollout.fast_triton_step import TritonStep
from rlreason.rollout.fast_weights import EngineWeights, is_sharded
from rlreason.rollout.fast_workspace import ModelDims, StepShape, Workspace, round_up

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(model: PreTrainedModel) -> str | None:
    """Why the fast engine cannot run ``model`` (None when it can)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {cfg.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} (only silu)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
        return f"RoPE type {rope.get('rope_type')!r} changes with the sequence length"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        return "the model has no .model.layers / .model.rotary_emb"
    return None


def _sliding_window(cfg: Any) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if window is None or (cfg.model_type != "mistral" and not getattr(cfg, "use_sliding_window", False)):
        return None
    return int(window)


class FastEngine:
    """The rollout engine of ``rollout.engine: fast``; see the module docstring.

    Its parts: ``EngineWeights`` (what it computes with), ``Workspace`` (the buffers of one call's shape, and
    compaction), ``TorchOps`` (prefill, draw, the PyTorch step) or ``TritonStep``, and ``StepRunner`` (graphs).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        block: int = 64,
        check_every: int = 16,
        compact: bool = True,
        own_weights: bool | None = None,
        kernels: str | None = None,
        release_memory: bool | None = None,
    ):
        model = causal_lm(model)  # a peft model's adapters are folded into the weights (EngineWeights)
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"rollout.engine 'fast' cannot run this model: {reason}; use rollout.engine 'hf'")
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = eos_token_ids(model, tokenizer)
        device = next(model.parameters()).device
        self.device = device
        self.dtype = dtype or next(model.parameters()).dtype
        cuda = device.type == "cuda"
        self.cuda_graphs = cuda if cuda_graphs is None else cuda_graphs and cuda
        self.block, self.check_every, self.compact = block, check_every, compact
        self.dims = ModelDims.of(model.config, len(model.model.layers))
        self.window = _sliding_window(model.config)
        self.kernels = self._pick_kernels(kernels, cuda)
        # the Triton step reads only the filled part of the cache, so one graph serves every step: nothing to keep
        # between calls that is not cheap to rebuild, and the cache and weight copies are freed after each call
        triton = self.kernels == "triton"
        # a sharded (FSDP2) model: the full weights are gathered into the engine's own copies at every call and
        # freed after it, so no second full copy stays resident between steps
        sharded = is_sharded(model)
        self.release_memory = (triton and self.cuda_graphs or sharded) if release_memory is None else release_memory
        # a compute dtype other than the weights' (bf16 on a float32 model's CPU): one cast per call, not per matmul
        recast = self.dtype != next(model.parameters()).dtype
        own = (cuda or sharded or recast) if own_weights is None else own_weights
        pack = onednn.packs(device, self.dtype) and not sharded  # sharded: packs would be a second full copy
        self.weights = EngineWeights(model, self.dtype, own=own or triton, fold_norms=triton, pack=pack)
        self.weight_bytes = self.weights.nbytes()
        self._ws: Workspace | None = None
        self._pinned = False
        vocab = self.weights.lm_head[0].shape[0]
        self.eos_tensor = torch.tensor([i for i in self.eos_ids if i < vocab], dtype=torch.long, device=device)
        if sharded and self.release_memory:  # no full copy until the first generate gathers one
            self.weights.drop()
        self.ops = TorchOps(model, self.dims, self.dtype, self.eos_tensor)
        step = TritonStep(self.ops).step if triton else self.ops.step
        self.runner = StepRunner(step, self.cuda_graphs, any_width=triton, device=device)
        self.last_stats: dict[str, Any] = {}

    def _pick_kernels(self, kernels: str | None, cuda: bool) -> str:
        if kernels is None:
            head_dim = self.dims.head_dim
            kernels = "triton" if cuda and _triton_available() and head_dim & (head_dim - 1) == 0 else "torch"
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels: 'torch' or 'triton', got {kernels!r}")
        return kernels

    def _workspace(self, P: int, G: int, prompt_width: int, max_new_tokens: int) -> Workspace:
        Wp = round_up(prompt_width, 32)
        Wc = round_up(max_new_tokens, self.block) if self.cuda_graphs else max_new_tokens
        key = (P, G, Wp, Wc)
        if self._ws is not None and self._ws.key == key:
            return self._ws
        if self._ws is not None:  # free the old one (and its graphs) first
            self._ws = None
            if self.cuda_graphs:
                torch.cuda.empty_cache()
        rope = self.ops.rope_tables(Wp + Wc + 1)
        pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self._ws = Workspace.allocate(key, self.dims, self.ops.kv_dtype, rope, pool)
        return self._ws

    def snapshot(self) -> None:
        """Copy the model's weights now and generate with this copy, however the model changes, until ``unpin``:
        sampling on another thread while the model trains (``train.async_rollouts``)."""
        if not self.weights.own:
            raise ValueError("a weight snapshot needs the engine's own weight copies (own_weights=True)")
        self.weights.refresh()
        self._pinned = True

    def unpin(self) -> None:
        """Back to reading the model's weights afresh at every generate (the snapshot's memory freed as usual)."""
        self._pinned = False
        if self.release_memory:
            self.release(empty_cache=False)

    def release(self, empty_cache: bool = True) -> None:
        """Free the caches, graphs and weight copies (the next generate call allocates and captures again);
        ``empty_cache`` also hands the freed memory back to the driver instead of keeping it for training."""
        self._ws = None
        self.weights.drop()
        if empty_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ the interface

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int] | None = None
    ) -> Rollout:
        self._check(prompt_ids, sampling.max_new_tokens)
        P, N = len(prompt_ids), len(prompt_ids) * n
        if seeds is None:
            seeds = draw_seeds(N) if not sampling.greedy else [0] * N
        started = time.perf_counter()
        self.last_stats = {}
        if not self._pinned:
            self.weights.refresh()
        ws = self._workspace(P, n, max(len(p) for p in prompt_ids), sampling.max_new_tokens)
        shared = shared_prefix(prompt_ids)
        ids, mask = left_pad([p[shared:] for p in prompt_ids], self.tokenizer.pad_token_id)
        prefix = torch.tensor(prompt_ids[0][:shared], dtype=torch.long).expand(P, -1)
        ids, mask = torch.cat([prefix, ids], dim=1).to(self.device), torch.cat([torch.ones_like(prefix), mask], dim=1).to(self.device)
        group = torch.arange(N, device=self.device) // n
        ws.load(mask, group, seeds, self.tokenizer.pad_token_id)
        self._first_tokens(ws, ids, mask, group, sampling, shared)
        prefilled = time.perf_counter()
        shape = StepShape(compacted=False, rows=N, prompts=P, group=n, width=0)
        t, steps, row_steps = self._decode(ws, shape, sampling)
        out_tokens, out_logprobs = ws.out_tokens[:N, :t].cpu(), ws.out_logprobs[:N, :t].cpu()
        decoded = time.perf_counter()
        rollout = self._rollout(prompt_ids, n, out_tokens, out_logprobs)
        d = self.dims
        kv_token_bytes = 2 * d.num_layers * d.num_kv_heads * d.head_dim * self.ops.kv_dtype.itemsize
        self.last_stats.update(
            prefill_s=prefilled - started,
            decode_s=decoded - prefilled,
            decode_steps=steps,
            rows=N,
            row_steps=row_steps,
            weight_bytes=self.weight_bytes,
            kernels=self.kernels,
            # the fewest KV bytes a decode step must read, averaged over the steps: each prompt once, each row's own tokens
            kv_bytes_per_step=kv_token_bytes * (float(mask.sum()) + N * (t / 2)) if steps else 0.0,
        )
        return rollout

    def _check(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompt_ids)
        if self.window is not None and width + max_new_tokens > self.window:
            raise ValueError(f"prompt + completion ({width + max_new_tokens} tokens) exceed the sliding window ({self.window})")

    def _first_tokens(
        self, ws: Workspace, ids: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, sampling: SamplingParams, shared: int
    ) -> None:
        """Prefill each prompt once (their common prefix once for all) and draw every row's first token from its
        prompt's last logits."""
        N = group.numel()
        logits = self.ops.prefill(ws, self.weights, ids, mask, shared)[group]
        tokens, logprobs = self.ops.sample(logits, ws.seeds, ws.t, sampling)
        ws.out_tokens[:N, 0], ws.out_logprobs[:N, 0] = tokens, logprobs
        ws.tokens.copy_(tokens)
        ws.done.copy_(torch.isin(tokens, self.eos_tensor))
        ws.t.fill_(1)
        if self.device.type == "cuda":  # this stream only: another thread may be training on the GPU meanwhile
            torch.cuda.current_stream().synchronize()

    def _decode(self, ws: Workspace, shape: StepShape, sampling: SamplingParams) -> tuple[int, int, int]:
        """Step until every row has ended or the completions are full, compacting when half of the rows have ended;
        returns the completion length and the steps and row-steps taken."""
        steps, row_steps, t = 0, 0, 1
        while t < sampling.max_new_tokens:
            if t % self.check_every == 0:
                if sampling.stop:
                    self._stop_at_strings(ws, shape, t, sampling.stop)
                active = (~ws.done[: shape.rows]).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                if self.compact and active.numel() <= shape.rows // 2:
                    shape = ws.compact(active, shape)
            shape = replace(shape, width=min(round_up(t, self.block), ws.Wc) if self.cuda_graphs else t)
            self.runner.run(ws, self.weights, shape, sampling, self.last_stats)
            steps += 1
            row_steps += shape.rows
            t += 1
        return t, steps, row_steps

    def _stop_at_strings(self, ws: Workspace, shape: StepShape, t: int, stops: tuple[str, ...]) -> None:
        """End the live rows whose text holds a stop string (checked every ``check_every`` steps, so a row may run a
        few tokens past it: the caller cuts there)."""
        slots = (~ws.done[: shape.rows]).nonzero().squeeze(1).tolist()
        rows, tokens = ws.row_ids[: shape.rows].tolist(), ws.out_tokens[:, :t].cpu()
        for slot in slots:
            if rows[slot] < ws.P * ws.G:  # not a padding slot
                text = self.tokenizer.decode(tokens[rows[slot]], skip_special_tokens=True)
                if any(s in text for s in stops):
                    ws.done[slot] = True

    def _rollout(self, prompt_ids: list[list[int]], n: int, out_tokens: torch.Tensor, out_logprobs: torch.Tensor) -> Rollout:
        """The completions cut at their first EOS (the memory released first when the engine frees it per call)."""
        cmask, truncated = completion_mask(out_tokens, self.eos_ids)
        width = int(cmask.sum(dim=1).max())
        completion_ids = torch.where(cmask.bool(), out_tokens, self.tokenizer.pad_token_id)[:, :width]
        cmask, logprobs = cmask[:, :width], (out_logprobs * cmask)[:, :width]
        if self.release_memory and not self._pinned:
            self.release(empty_cache=False)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rep_ids, rep_mask = left_pad([p for p in prompt_ids for _ in range(n)], self.tokenizer.pad_token_id)
        return Rollout(
            prompt_ids=rep_ids,
            prompt_mask=rep_mask,
            completion_ids=completion_ids,
            completion_mask=cmask,
            texts=texts,
            truncated=truncated,
            logprobs=logprobs,
        )


def shared_prefix(prompts: list[list[int]]) -> int:
    """The tokens all of several prompts begin with, leaving each at least its last token (the one whose logits
    draw the first completion token); 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < limit and all(p[length] == first[length] for p in prompts):
        length += 1
    return length


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def build_engine(
    name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bf16: bool = False, own_weights: bool | None = None
):
    """The engine ``rollout.engine`` names for ``model`` (which it reads afresh at every generate): "hf" or "fast"
    (computing in bf16 when training does; ``own_weights``: always in copies of its own, which ``snapshot`` needs)."""
    from rlreason.rollout.engine import HFEngine

    if name == "hf":
        return HFEngine(model, tokenizer)
    if name == "fast":
        return FastEngine(model, tokenizer, dtype=torch.bfloat16 if bf16 else None, own_weights=own_weights)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; available: 'hf', 'fast'")
