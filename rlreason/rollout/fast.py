"""A fast rollout engine for Llama-family decoders (Llama, SmolLM, Mistral, Qwen2, Qwen3): ``rollout.engine: fast``.

Same interface and, for the same seeds, the same completions as ``HFEngine`` (the reference; tests say so), but:

- each prompt is prefilled once; its keys and values are stored once and read by all n completions of its group
  (the group's queries attend the shared prompt cache, then each row its own completion cache);
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

It computes the model itself from the module's weights (no ``model.forward``); on CUDA it keeps its own copy of the
weights in the compute dtype, with q/k/v and gate/up fused, refreshed from the model at every ``generate``.
Left out: sliding-window attention beyond the window, dynamic RoPE scaling, other architectures (use "hf").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlreason.rollout import sampling as seeded
from rlreason.rollout.engine import Rollout, SamplingParams, completion_mask, eos_token_ids, left_pad

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


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ------------------------------------------------------------------------------------------------ weights


class _Weights:
    """The tensors the engine computes with: the model's own, or (``own``) fused copies in ``dtype``.

    ``fold_norms`` (with ``own``) multiplies each layer's RMSNorm weights into the projection that reads the norm's
    output, in float32 before rounding to ``dtype``: RMSNorm(x) @ W.T = (x / rms(x)) @ (W * norm_weight).T, so the
    Triton step applies only a scale per row (``ln1``/``ln2`` are then None).
    """

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype, own: bool, fold_norms: bool = False):
        if fold_norms and not own:
            raise ValueError("fold_norms needs the engine's own weight copies (own=True)")
        self.model, self.dtype, self.own, self.fold_norms = model, dtype, own, fold_norms
        self.layers: list[dict] | None = None
        self.refresh()

    def drop(self) -> None:
        """Free the engine's own copies (the next refresh allocates them again)."""
        if self.own:
            self.layers = self.embed = self.norm = self.lm_head = None

    @staticmethod
    def _bias(module: torch.nn.Module) -> torch.Tensor | None:
        return getattr(module, "bias", None)

    def _source(self) -> dict[str, Any]:
        base = self.model.model
        layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            layers.append(
                {
                    "ln1": layer.input_layernorm.weight,
                    "ln2": layer.post_attention_layernorm.weight,
                    "q": (a.q_proj.weight, self._bias(a.q_proj)),
                    "k": (a.k_proj.weight, self._bias(a.k_proj)),
                    "v": (a.v_proj.weight, self._bias(a.v_proj)),
                    "o": (a.o_proj.weight, self._bias(a.o_proj)),
                    "q_norm": getattr(getattr(a, "q_norm", None), "weight", None),
                    "k_norm": getattr(getattr(a, "k_norm", None), "weight", None),
                    "gate": (m.gate_proj.weight, self._bias(m.gate_proj)),
                    "up": (m.up_proj.weight, self._bias(m.up_proj)),
                    "down": (m.down_proj.weight, self._bias(m.down_proj)),
                }
            )
        head = self.model.get_output_embeddings()
        return {
            "embed": base.embed_tokens.weight,
            "norm": base.norm.weight,
            "lm_head": (head.weight, self._bias(head)),
            "layers": layers,
        }

    @torch.no_grad()
    def refresh(self) -> None:
        """Point at (or copy) the model's current weights; call after every optimizer step (generate does)."""
        src = self._source()
        if not self.own:
            cast = (lambda t: t) if src["embed"].dtype == self.dtype else (lambda t: None if t is None else t.to(self.dtype))
            self.embed, self.norm = cast(src["embed"]), cast(src["norm"])
            self.lm_head = (cast(src["lm_head"][0]), cast(src["lm_head"][1]))
            self.layers = [
                {k: (tuple(cast(t) for t in v) if isinstance(v, tuple) else cast(v)) for k, v in layer.items()}
                for layer in src["layers"]
            ]
            return
        fold_norms = self.fold_norms
        if self.layers is None:  # first call (or after drop): allocate the fused buffers
            def alloc(*tensors: torch.Tensor | None) -> torch.Tensor | None:
                if any(t is None for t in tensors):
                    return None
                return torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=self.dtype, device=tensors[0].device)

            self.embed = alloc(src["embed"])
            tied = src["lm_head"][0].data_ptr() == src["embed"].data_ptr()
            self.lm_head = (self.embed if tied else alloc(src["lm_head"][0]), alloc(src["lm_head"][1]))
            self.norm = alloc(src["norm"])
            self.layers = []
            for s in src["layers"]:
                q, k, v = s["q"], s["k"], s["v"]
                self.layers.append(
                    {
                        "ln1": None if fold_norms else alloc(s["ln1"]),
                        "ln2": None if fold_norms else alloc(s["ln2"]),
                        "qkv": (alloc(q[0], k[0], v[0]), alloc(q[1], k[1], v[1])),
                        "o": (alloc(s["o"][0]), alloc(s["o"][1])),
                        "q_norm": alloc(s["q_norm"]) if s["q_norm"] is not None else None,
                        "k_norm": alloc(s["k_norm"]) if s["k_norm"] is not None else None,
                        "gate_up": (alloc(s["gate"][0], s["up"][0]), alloc(s["gate"][1], s["up"][1])),
                        "down": (alloc(s["down"][0]), alloc(s["down"][1])),
                    }
                )
            self._tied = tied

        def fill(dst: torch.Tensor | None, *parts: torch.Tensor | None, norm: torch.Tensor | None = None) -> None:
            if dst is None:
                return
            row = 0
            for p in parts:
                rows = dst[row : row + p.shape[0]]
                if norm is None:
                    rows.copy_(p)
                else:  # computed in float32, rounded once into the copy: no temporaries
                    torch.mul(p, norm, out=rows)
                row += p.shape[0]

        fill(self.embed, src["embed"])
        if not self._tied:
            fill(self.lm_head[0], src["lm_head"][0])
        fill(self.lm_head[1], src["lm_head"][1])
        fill(self.norm, src["norm"])
        for d, s in zip(self.layers, src["layers"], strict=True):
            fill(d["ln1"], s["ln1"])
            fill(d["ln2"], s["ln2"])
            fill(d["qkv"][0], s["q"][0], s["k"][0], s["v"][0], norm=s["ln1"] if fold_norms else None)
            fill(d["qkv"][1], s["q"][1], s["k"][1], s["v"][1])
            fill(d["o"][0], s["o"][0])
            fill(d["o"][1], s["o"][1])
            fill(d["q_norm"], s["q_norm"])
            fill(d["k_norm"], s["k_norm"])
            fill(d["gate_up"][0], s["gate"][0], s["up"][0], norm=s["ln2"] if fold_norms else None)
            fill(d["gate_up"][1], s["gate"][1], s["up"][1])
            fill(d["down"][0], s["down"][0])
            fill(d["down"][1], s["down"][1])

    def nbytes(self) -> int:
        """Bytes read per decode step: every weight but the embedding table (only P rows of it are read)."""
        total = 0
        for layer in self.layers:
            for v in layer.values():
                for t in v if isinstance(v, tuple) else (v,):
                    total += t.numel() * t.element_size() if t is not None else 0
        return total + self.norm.numel() * self.norm.element_size() + self.lm_head[0].numel() * self.lm_head[0].element_size()


# ------------------------------------------------------------------------------------------------ workspace


@dataclass
class _Workspace:
    """Every buffer a generate call of one shape uses; CUDA graphs are captured against these addresses."""

    key: tuple
    P: int
    G: int
    Wp: int
    Wc: int
    kp: torch.Tensor  # [layers, P, Hkv, Wp, D]   prompt cache, one per group
    vp: torch.Tensor
    kc: torch.Tensor  # [layers, P, Hkv, G, Wc, D] completion cache, one per row
    vc: torch.Tensor
    bias_p: torch.Tensor  # [P, Wp] 0 on a prompt's tokens, -inf elsewhere
    pos0: torch.Tensor  # [N] position of each row's first completion token
    seeds: torch.Tensor  # [N]
    tokens: torch.Tensor  # [N] the token each row feeds next
    done: torch.Tensor  # [N] bool
    row_ids: torch.Tensor  # [N] original row of each slot (N: the scratch row of a padding slot)
    t: torch.Tensor  # [] index in the completion of the token sampled next
    cos: torch.Tensor  # [positions, D] RoPE tables
    sin: torch.Tensor  # [positions, D] sin with its first half negated
    out_tokens: torch.Tensor  # [N + 1, Wc]
    out_logprobs: torch.Tensor  # [N + 1, Wc]
    rows_cache: dict[str, torch.Tensor] = field(default_factory=dict)  # after compaction: kp/vp/kc/vc/bias per row
    graphs: dict[tuple, Any] = field(default_factory=dict)
    pool: Any = None


class FastEngine:
    """The rollout engine of ``rollout.engine: fast``; see the module docstring."""

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
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.fused_norm = cuda
        self.window = _sliding_window(cfg)
        if kernels is None:
            kernels = "triton" if cuda and _triton_available() and self.head_dim & (self.head_dim - 1) == 0 else "torch"
        if kernels not in ("torch", "triton"):
            raise ValueError(f"kernels: 'torch' or 'triton', got {kernels!r}")
        self.kernels = kernels
        if kernels == "triton":
            from rlreason.rollout import triton_decode as _triton_decode

            self._triton = _triton_decode
        # the Triton step reads only the filled part of the cache, so one graph serves every step: nothing to keep
        # between calls that is not cheap to rebuild, and the cache and weight copies are freed after each call
        self.release_memory = kernels == "triton" and self.cuda_graphs if release_memory is None else release_memory
        own = cuda if own_weights is None else own_weights
        self.weights = _Weights(model, self.dtype, own=own or kernels == "triton", fold_norms=kernels == "triton")
        self.weight_bytes = self.weights.nbytes()
        self.num_layers = len(self.weights.layers)
        self._ws: _Workspace | None = None
        self._scores_out_dtype = cuda and self.dtype in (torch.bfloat16, torch.float16) and self._bmm_out_dtype_works()
        scale = [self.head_dim**-0.5] * self.num_heads + [1.0] * self.num_kv_heads  # queries carry 1/sqrt(D)
        self.qk_scale = torch.tensor(scale, dtype=self.dtype, device=device).view(1, -1, 1)
        vocab = self.weights.lm_head[0].shape[0]
        self.eos_tensor = torch.tensor([i for i in self.eos_ids if i < vocab], dtype=torch.long, device=device)
        self.last_stats: dict[str, Any] = {}
        self._side_stream = torch.cuda.Stream(device) if self.cuda_graphs else None  # where graphs are recorded
        self._warm: set[tuple] = set()  # steps already run eagerly once: libraries and Triton kernels ready

    # ------------------------------------------------------------------ numerics shared by prefill and decode

    def _bmm_out_dtype_works(self) -> bool:
        try:  # shaped like the decode step's use: a strided, transposed right operand
            a = torch.ones(3, 5, 16, dtype=self.dtype, device=self.device)
            b = torch.ones(3, 8, 2, 16, dtype=self.dtype, device=self.device)[:, :, 0].transpose(1, 2)
            out = torch.bmm(a, b, out_dtype=torch.float32)
            return out.dtype == torch.float32 and bool((out == 16).all())
        except (RuntimeError, TypeError):
            return False

    def _scores(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b for 3-d tensors, in float32 (bf16 operands accumulate and round in float32, like flash attention)."""
        if self._scores_out_dtype:
            return torch.bmm(a, b, out_dtype=torch.float32)
        return torch.bmm(a, b).float()

    def _rms(self, x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        """The Llama RMSNorm: normalise in float32, back to the input dtype, times the weight (None: folded into the
        next projection); on CUDA torch's fused kernel, which rounds once instead of twice."""
        if self.fused_norm:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        normed = x.float()
        normed = (normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed if weight is None else weight * normed

    def _project(self, h: torch.Tensor, layer: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "qkv" in layer:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            return F.linear(h, *layer["qkv"]).split([q_size, kv_size, kv_size], dim=-1)
        return F.linear(h, *layer["q"]), F.linear(h, *layer["k"]), F.linear(h, *layer["v"])

    def _mlp(self, h: torch.Tensor, layer: dict) -> torch.Tensor:
        if "gate_up" in layer:
            gate, up = F.linear(h, *layer["gate_up"]).chunk(2, dim=-1)
        else:
            gate, up = F.linear(h, *layer["gate"]), F.linear(h, *layer["up"])
        return F.linear(F.silu(gate) * up, *layer["down"])

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """RoPE: x cos + rotate_half(x) sin, with rotate_half(x) sin = roll(x, half) (sin with its first half negated)."""
        return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [length, head_dim] from the model's own rotary embedding (any static RoPE scaling)."""
        positions = torch.arange(length, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.model.model.rotary_emb(probe, positions)
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)

    # ------------------------------------------------------------------ workspace

    def _workspace(self, P: int, G: int, prompt_width: int, max_new_tokens: int) -> _Workspace:
        Wp = _round_up(prompt_width, 32)
        Wc = _round_up(max_new_tokens, self.block) if self.cuda_graphs else max_new_tokens
        key = (P, G, Wp, Wc)
        if self._ws is not None and self._ws.key == key:
            return self._ws
        if self._ws is not None:  # free the old one (and its graphs) first
            self._ws = None
            if self.cuda_graphs:
                torch.cuda.empty_cache()
        N, nl, Hkv, D, dev = P * G, self.num_layers, self.num_kv_heads, self.head_dim, self.device

        def zeros(*shape: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        cos, sin = self._rope_tables(Wp + Wc + 1)

        self._ws = _Workspace(
            key=key, P=P, G=G, Wp=Wp, Wc=Wc,
            kp=zeros(nl, P, Hkv, Wp, D), vp=zeros(nl, P, Hkv, Wp, D),
            kc=zeros(nl, P, Hkv, G, Wc, D), vc=zeros(nl, P, Hkv, G, Wc, D),
            bias_p=zeros(P, Wp, dtype=torch.float32),
            pos0=zeros(N, dtype=torch.long), seeds=zeros(N, dtype=torch.long), tokens=zeros(N, dtype=torch.long),
            done=zeros(N, dtype=torch.bool), row_ids=zeros(N, dtype=torch.long), t=zeros(dtype=torch.long),
            out_tokens=zeros(N + 1, Wc, dtype=torch.long), out_logprobs=zeros(N + 1, Wc, dtype=torch.float32),
            cos=cos, sin=sin,
            pool=torch.cuda.graph_pool_handle() if self.cuda_graphs else None,
        )
        return self._ws

    def release(self, empty_cache: bool = True) -> None:
        """Free the caches, graphs and weight copies (the next generate call allocates and captures again);
        ``empty_cache`` also hands the freed memory back to the driver instead of keeping it for training."""
        self._ws = None
        self.weights.drop()
        if empty_cache and self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ prefill: each prompt once

    def _prefill(self, ws: _Workspace, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the P left-padded prompts, fill the prompt cache, return the last position's logits [P, V] (float32)."""
        P, W = ids.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cos, sin = ws.cos[positions].unsqueeze(1), ws.sin[positions].unsqueeze(1)  # [P, 1, W, D]
        causal = torch.ones(W, W, dtype=torch.bool, device=self.device).tril()
        # a padding query attends itself only, so no row of the mask is empty (an empty row gives NaN)
        allowed = (causal & mask.bool()[:, None, :]) | torch.eye(W, dtype=torch.bool, device=self.device)
        allowed = allowed.unsqueeze(1)  # [P, 1, W, W]
        x = F.embedding(ids, self.weights.embed)
        for i, layer in enumerate(self.weights.layers):
            h = self._rms(x, layer["ln1"])
            q, k, v = self._project(h, layer)
            q = q.view(P, W, H, D).transpose(1, 2)
            k = k.view(P, W, Hkv, D).transpose(1, 2)
            v = v.view(P, W, Hkv, D).transpose(1, 2)
            if layer["q_norm"] is not None:
                q, k = self._rms(q, layer["q_norm"]), self._rms(k, layer["k_norm"])
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            ws.kp[i, :, :, :W].copy_(k)
            ws.vp[i, :, :, :W].copy_(v)
            if Hkv != H:
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            x = x + F.linear(attn.transpose(1, 2).reshape(P, W, H * D), *layer["o"])
            x = x + self._mlp(self._rms(x, layer["ln2"]), layer)
        last = self._rms(x[:, -1], self.weights.norm)
        return F.linear(last, *self.weights.lm_head).float()

    # ------------------------------------------------------------------ sampling

    def _sample(self, logits: torch.Tensor, seeds: torch.Tensor, t: torch.Tensor, sampling: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Token and its log-probability at the sampling temperature, for each row of float32 ``logits``: the draw
        of ``rlreason.rollout.sampling.sample`` (what HFEngine uses), with the position ``t`` a tensor for CUDA graphs."""
        temperature = 1.0 if sampling.greedy else sampling.temperature
        logprobs = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
        if sampling.min_new_tokens > 0:  # only the EOS columns are touched, in place (the logits are the step's own)
            held = torch.where(t < sampling.min_new_tokens, float("-inf"), logits.index_select(-1, self.eos_tensor))
            logits.index_copy_(-1, self.eos_tensor, held)
        if sampling.greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = seeded.sample(logits, seeds, t, temperature, sampling.top_p, sampling.top_k)
        return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------ one decode step

    def _step(self, ws: _Workspace, rows_phase: bool, R: int, Pp: int, G: int, B: int, sampling: SamplingParams) -> None:
        """Feed each row's last token, append its keys/values, sample the next token; all on the device."""
        if self.kernels == "triton":
            self._step_triton(ws, rows_phase, R, Pp, G, sampling)
            return
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        rep = H // Hkv
        if rows_phase:
            rc = ws.rows_cache
            kp, vp, kc, vc, bias_p = rc["kp"], rc["vp"], rc["kc"], rc["vc"], rc["bias"][:Pp]
        else:
            kp, vp, kc, vc, bias_p = ws.kp, ws.vp, ws.kc, ws.vc, ws.bias_p
        Wp = kp.shape[3]
        t = ws.t
        pos = ws.pos0[:R] + (t - 1)
        # RoPE of queries and keys in one go ([R, H + Hkv, D]), the queries' tables scaled by 1/sqrt(D)
        cos, sin = ws.cos[pos].unsqueeze(1) * self.qk_scale, ws.sin[pos].unsqueeze(1) * self.qk_scale
        slot = (t - 1).view(1)
        visible = torch.arange(B, device=self.device) < t
        comp_bias = torch.zeros(B, device=self.device).masked_fill(~visible, float("-inf"))
        bias = torch.cat([bias_p[:Pp].view(Pp, 1, 1, 1, Wp), comp_bias.view(1, 1, 1, 1, B).expand(Pp, 1, 1, 1, B)], dim=-1)
        x = F.embedding(ws.tokens[:R], self.weights.embed)  # [R, hidden]
        for i, layer in enumerate(self.weights.layers):
            h = self._rms(x, layer["ln1"])
            if "qkv" in layer:  # q and k are neighbours in the fused projection: one RoPE for both
                qkv = F.linear(h, *layer["qkv"])
                qk, v = qkv[:, : (H + Hkv) * D].view(R, H + Hkv, D), qkv[:, (H + Hkv) * D :].view(R, Hkv, D)
            else:
                q, k, v = self._project(h, layer)
                qk, v = torch.cat([q.view(R, H, D), k.view(R, Hkv, D)], dim=1), v.view(R, Hkv, D)
            if layer["q_norm"] is not None:
                qk = torch.cat([self._rms(qk[:, :H], layer["q_norm"]), self._rms(qk[:, H:], layer["k_norm"])], dim=1)
            qk = self._rotate(qk, cos, sin)
            q, k = qk[:, :H], qk[:, H:]
            # append to the cache: rows are (group, member) -> layout [Pp, Hkv, G, slot, D]
            kc_i, vc_i = kc[i, :Pp], vc[i, :Pp]
            kc_i.index_copy_(3, slot, k.view(Pp, G, Hkv, 1, D).transpose(1, 2))
            vc_i.index_copy_(3, slot, v.view(Pp, G, Hkv, 1, D).transpose(1, 2))
            # queries grouped by prompt and kv head: [Pp, Hkv, G, rep, D]
            qg = q.view(Pp, G, Hkv, rep, D).transpose(1, 2).contiguous()
            s_p = self._scores(qg.view(Pp * Hkv, G * rep, D), kp[i, :Pp].reshape(Pp * Hkv, Wp, D).transpose(1, 2))
            s_c = self._scores(qg.view(Pp * Hkv * G, rep, D), kc_i[..., :B, :].reshape(Pp * Hkv * G, B, D).transpose(1, 2))
            s = torch.cat([s_p.view(Pp, Hkv, G, rep, Wp), s_c.view(Pp, Hkv, G, rep, B)], dim=-1) + bias
            p = torch.softmax(s, dim=-1).to(self.dtype)
            o = torch.bmm(p[..., :Wp].reshape(Pp * Hkv, G * rep, Wp), vp[i, :Pp].reshape(Pp * Hkv, Wp, D)).view(Pp, Hkv, G, rep, D)
            o = o + torch.bmm(p[..., Wp:].reshape(Pp * Hkv * G, rep, B), vc_i[..., :B, :].reshape(Pp * Hkv * G, B, D)).view(Pp, Hkv, G, rep, D)
            x = x + F.linear(o.transpose(1, 2).reshape(R, H * D), *layer["o"])
            x = x + self._mlp(self._rms(x, layer["ln2"]), layer)
        self._record(ws, R, F.linear(self._rms(x, self.weights.norm), *self.weights.lm_head), sampling)

    def _step_triton(self, ws: _Workspace, rows_phase: bool, R: int, Pp: int, G: int, sampling: SamplingParams) -> None:
        """The same step with the kernels of rlreason.rollout.triton_decode: seven launches a layer. The norms are folded
        into the weights (their 1/rms scale applied by the kernels after each projection), and the output
        projections add into the residual stream ``x`` themselves."""
        K, W, eps = self._triton, self.weights, self.eps
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        if rows_phase:
            rc = ws.rows_cache
            kp, vp, kc, vc, bias = rc["kp"], rc["vp"], rc["kc"], rc["vc"], rc["bias"]
        else:
            kp, vp, kc, vc, bias = ws.kp, ws.vp, ws.kc, ws.vc, ws.bias_p
        x = F.embedding(ws.tokens[:R], W.embed)
        for i, layer in enumerate(W.layers):
            qkv_w, qkv_b = layer["qkv"]
            q = K.rope_and_cache(F.linear(x, qkv_w), x, qkv_b, ws.cos, ws.sin, ws.pos0, ws.t, kc[i, :Pp], vc[i, :Pp],
                                 layer["q_norm"], layer["k_norm"], eps, H, Hkv, D, G)
            attn = K.decode_attention(q, kp[i, :Pp], vp[i, :Pp], bias[:Pp], kc[i, :Pp], vc[i, :Pp], ws.t, G)
            self._add_projection(x, attn, layer["o"])
            gate_up_w, gate_up_b = layer["gate_up"]
            self._add_projection(x, K.silu_mul(F.linear(x, gate_up_w), x, gate_up_b, eps), layer["down"])
        self._record(ws, R, F.linear(K.rms_norm(x, W.norm, eps), *W.lm_head), sampling)

    @staticmethod
    def _add_projection(x: torch.Tensor, h: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        """x += h @ weight.T (+ bias), the addition done by the matrix multiply itself."""
        weight, bias = projection
        x.addmm_(h, weight.t())
        if bias is not None:
            x.add_(bias)

    def _record(self, ws: _Workspace, R: int, logits: torch.Tensor, sampling: SamplingParams) -> None:
        """Sample from the step's logits (any float dtype) and write the token, its log-prob and the row's state:
        with Triton and plain temperature sampling in two fused launches, otherwise by PyTorch ops."""
        t = ws.t
        if self.kernels == "triton" and not sampling.greedy and not sampling.top_k and sampling.top_p == 1.0:
            self._triton.sample_and_record(
                logits, sampling.temperature, sampling.min_new_tokens, self.eos_tensor, ws.seeds[:R], t, ws.row_ids[:R],
                ws.out_tokens, ws.out_logprobs, ws.tokens[:R], ws.done[:R],
            )
            t.add_(1)
            return
        tokens, logprobs = self._sample(logits.float(), ws.seeds[:R], t, sampling)
        rows = ws.row_ids[:R]
        column = t.expand(R)
        ws.out_tokens.index_put_((rows, column), tokens)
        ws.out_logprobs.index_put_((rows, column), logprobs)
        ws.tokens[:R].copy_(tokens)
        ws.done[:R] |= torch.isin(tokens, self.eos_tensor)
        ws.t.add_(1)

    def _run_step(self, ws: _Workspace, rows_phase: bool, R: int, Pp: int, G: int, B: int, sampling: SamplingParams) -> None:
        if not self.cuda_graphs:
            self._step(ws, rows_phase, R, Pp, G, B, sampling)
            return
        if self.kernels == "triton":
            B = 0  # the attention kernel reads the step from the device: one graph for every step
        key = (rows_phase, R, Pp, G, B, sampling.greedy, sampling.temperature, sampling.top_p, sampling.top_k, sampling.min_new_tokens)
        graph = ws.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # The first time, this step runs eagerly on the side stream (which warms up the libraries and compiles the
        # Triton kernels) and is then recorded without running; at later calls (a new workspace: release_memory)
        # it is only recorded, then replayed. Either way the state moves once.
        started = time.perf_counter()
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream())
        warm = key in self._warm
        if not warm:
            with torch.cuda.stream(side):
                self._step(ws, rows_phase, R, Pp, G, B, sampling)
            self._warm.add(key)
        # capture_begin/end rather than torch.cuda.graph, which empties the allocator's cache first: that would
        # hand back the training pass's blocks at every generate call, and the next pass would allocate them again
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            graph.capture_begin(pool=ws.pool)
            try:
                self._step(ws, rows_phase, R, Pp, G, B, sampling)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        ws.graphs[key] = graph
        if warm:
            graph.replay()
        self.last_stats["capture_s"] = self.last_stats.get("capture_s", 0.0) + time.perf_counter() - started

    # ------------------------------------------------------------------ compaction

    def _compact(self, ws: _Workspace, active: torch.Tensor, rows_phase: bool, R: int, G: int) -> int:
        """Move the live rows (slot indices ``active``) to the front of a batch of the next power of two rows."""
        n = active.numel()
        R_new = max(4, min(1 << (n - 1).bit_length(), R // 2))  # a fixed sequence of sizes: graphs are reused
        if R_new >= R:
            return R
        rc = ws.rows_cache
        if not rc:  # rows-phase caches hold at most half of the rows
            nl, Hkv, D, half = self.num_layers, self.num_kv_heads, self.head_dim, (ws.P * ws.G) // 2
            shape_p, shape_c = (nl, half, Hkv, ws.Wp, D), (nl, half, Hkv, 1, ws.Wc, D)
            rc.update(
                kp=torch.zeros(shape_p, dtype=self.dtype, device=self.device),
                vp=torch.zeros(shape_p, dtype=self.dtype, device=self.device),
                kc=torch.zeros(shape_c, dtype=self.dtype, device=self.device),
                vc=torch.zeros(shape_c, dtype=self.dtype, device=self.device),
                bias=torch.zeros(half, ws.Wp, dtype=torch.float32, device=self.device),
            )
        if rows_phase:
            for name in ("kp", "vp", "kc", "vc"):
                rc[name][:, :n] = rc[name].index_select(1, active)
            rc["bias"][:n] = rc["bias"].index_select(0, active)
        else:
            group, member = active // G, active % G
            for name in ("kp", "vp"):
                rc[name][:, :n] = getattr(ws, name).index_select(1, group)
            for name in ("kc", "vc"):
                rc[name][:, :n, :, 0] = getattr(ws, name)[:, group, :, member].transpose(0, 1)
            rc["bias"][:n] = ws.bias_p.index_select(0, group)
        rc["bias"][n:R_new] = 0.0  # padding slots attend to anything finite; their tokens go to the scratch row
        for name, pad in (("tokens", 0), ("pos0", 0), ("seeds", 0), ("row_ids", ws.P * ws.G), ("done", True)):
            buffer = getattr(ws, name)
            buffer[:n] = buffer.index_select(0, active)
            buffer[n:R_new] = pad
        return R_new

    # ------------------------------------------------------------------ the interface

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int] | None = None
    ) -> Rollout:
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        P, N, L = len(prompt_ids), len(prompt_ids) * n, sampling.max_new_tokens
        width = max(len(p) for p in prompt_ids)
        if self.window is not None and width + L > self.window:
            raise ValueError(f"prompt + completion ({width + L} tokens) exceed the sliding window ({self.window})")
        if seeds is None:
            seeds = seeded_draw(N) if not sampling.greedy else [0] * N
        started = time.perf_counter()
        self.last_stats = {}
        self.weights.refresh()
        ws = self._workspace(P, n, width, L)
        dev = self.device
        ids, mask = left_pad(prompt_ids, self.tokenizer.pad_token_id)
        ids, mask = ids.to(dev), mask.to(dev)
        lengths = mask.sum(dim=1)
        ws.bias_p.fill_(float("-inf"))
        ws.bias_p[:, : ids.shape[1]].masked_fill_(mask.bool(), 0.0)
        group = torch.arange(N, device=dev) // n
        ws.pos0.copy_(lengths[group])
        ws.seeds.copy_(torch.tensor(seeds, dtype=torch.long))
        ws.row_ids.copy_(torch.arange(N, device=dev))
        ws.done.zero_()
        ws.t.zero_()
        ws.out_tokens.fill_(self.tokenizer.pad_token_id)
        ws.out_logprobs.zero_()

        logits = self._prefill(ws, ids, mask)[group]
        tokens, logprobs = self._sample(logits, ws.seeds, ws.t, sampling)
        ws.out_tokens[:N, 0], ws.out_logprobs[:N, 0] = tokens, logprobs
        ws.tokens.copy_(tokens)
        ws.done.copy_(torch.isin(tokens, self.eos_tensor))
        ws.t.fill_(1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        prefilled = time.perf_counter()

        R, Pp, G, rows_phase, steps, row_steps, t = N, P, n, False, 0, 0, 1
        while t < L:
            if t % self.check_every == 0:
                active = (~ws.done[:R]).nonzero().squeeze(1)
                if active.numel() == 0:
                    break
                if self.compact and active.numel() <= R // 2:
                    R_new = self._compact(ws, active, rows_phase, R, G)
                    if R_new < R:
                        R, Pp, G, rows_phase = R_new, R_new, 1, True
            B = min(_round_up(t, self.block), ws.Wc) if self.cuda_graphs else t
            self._run_step(ws, rows_phase, R, Pp, G, B, sampling)
            steps += 1
            row_steps += R
            t += 1
        out_tokens, out_logprobs = ws.out_tokens[:N, :t].cpu(), ws.out_logprobs[:N, :t].cpu()
        decoded = time.perf_counter()

        cmask, truncated = completion_mask(out_tokens, self.eos_ids)
        width = int(cmask.sum(dim=1).max())
        completion_ids = torch.where(cmask.bool(), out_tokens, self.tokenizer.pad_token_id)[:, :width]
        cmask, logprobs = cmask[:, :width], (out_logprobs * cmask)[:, :width]
        if self.release_memory:
            self.release(empty_cache=False)
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        rep_ids, rep_mask = left_pad([p for p in prompt_ids for _ in range(n)], self.tokenizer.pad_token_id)
        kv_token_bytes = 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8
        self.last_stats.update(
            prefill_s=prefilled - started,
            decode_s=decoded - prefilled,
            decode_steps=steps,
            rows=N,
            row_steps=row_steps,
            weight_bytes=self.weight_bytes,
            kernels=self.kernels,
            # the fewest KV bytes a decode step must read, averaged over the steps: each prompt once, each row's own tokens
            kv_bytes_per_step=kv_token_bytes * (float(lengths.sum()) + N * (t / 2)) if steps else 0.0,
        )
        return Rollout(
            prompt_ids=rep_ids,
            prompt_mask=rep_mask,
            completion_ids=completion_ids,
            completion_mask=cmask,
            texts=texts,
            truncated=truncated,
            logprobs=logprobs,
        )


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def seeded_draw(count: int) -> list[int]:
    """Completion seeds from torch's global RNG (as HFEngine draws them when the caller names none)."""
    return torch.randint(0, 2**62, (count,)).tolist()


def build_engine(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, bf16: bool = False):
    """The engine ``rollout.engine`` names for ``model`` (which it reads afresh at every generate): "hf" or "fast"
    (computing in bf16 when training does)."""
    from rlreason.rollout.engine import HFEngine

    if name == "hf":
        return HFEngine(model, tokenizer)
    if name == "fast":
        return FastEngine(model, tokenizer, dtype=torch.bfloat16 if bf16 else None)
    raise ValueError(f"rollout.engine: unknown engine {name!r}; available: 'hf', 'fast'")
