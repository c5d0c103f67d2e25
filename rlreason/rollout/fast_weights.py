"""The fast engine's weights: the model's own tensors, or its own fused copies (q/k/v and gate/up in one matrix each).

A linear layer with LoRA adapters (peft) contributes its base weight plus each active adapter's scale * B @ A,
folded at every refresh, so decoding a LoRA policy costs what decoding the base model costs.

Under FSDP2 the model's parameters are DTensor shards: the engine keeps its own copies, and each refresh gathers
every parameter once (``full_tensor``, base weight and adapter factors alike) straight into them, one layer at a
time; the copies are freed after every generate (``drop``), so no full copy stays between steps.

On the CPU every projection is also packed into oneDNN's blocked layout at each refresh (``linear``, see
rlreason.onednn)."""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from rlreason import onednn


def is_sharded(model: torch.nn.Module) -> bool:
    """The model's parameters are FSDP2 shards (DTensors): the engine must gather them into its own copies."""
    return any(isinstance(p, DTensor) for p in model.parameters())


PACKED_FOR_ROWS = 32
"""The row count oneDNN is told to expect when a weight is packed (any count works; a decode step's rows)."""


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a shard (a collective: every process gathers the same parameters in the same order)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _ptr(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


class EngineWeights:
    """The tensors the engine computes with: the model's own, or (``own``) fused copies in ``dtype``.

    ``fold_norms`` (with ``own``) multiplies each layer's RMSNorm weights into the projection that reads the norm's
    output, in float32 before rounding to ``dtype``: RMSNorm(x) @ W.T = (x / rms(x)) @ (W * norm_weight).T, so the
    Triton step applies only a scale per row (``ln1``/``ln2`` are then None).

    A sharded model (FSDP2) needs ``own``: each refresh gathers every parameter once into the copies, one layer at
    a time, so the full weights exist only in them (freed by ``drop``) and in one layer's gathers.
    """

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype, own: bool, fold_norms: bool = False, pack: bool = False):
        if fold_norms and not own:
            raise ValueError("fold_norms needs the engine's own weight copies (own=True)")
        self.sharded = is_sharded(model)
        if self.sharded and not own:
            raise ValueError("a sharded (FSDP2) model needs the engine's own weight copies (own=True)")
        self.model, self.dtype, self.own, self.fold_norms, self.pack = model, dtype, own, fold_norms, pack
        self.layers: list[dict] | None = None
        self._packed: dict[int, torch.Tensor] = {}
        self.refresh()

    def linear(self, x: torch.Tensor, weight_bias: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """``F.linear(x, *weight_bias)``, through the weight's packed copy when there is one (``pack``)."""
        weight, bias = weight_bias
        packed = self._packed.get(id(weight))
        if packed is None:
            return F.linear(x, weight, bias)
        return onednn.linear(x, packed, bias)

    def _pack(self) -> None:
        """Every projection (the layers' and the head) in oneDNN's layout, keyed by the tensor it copies."""
        projections = [v for layer in self.layers for v in layer.values() if isinstance(v, tuple)] + [self.lm_head]
        self._packed = {id(w): onednn.pack(w, PACKED_FOR_ROWS) for w, _ in projections}

    def drop(self) -> None:
        """Free the engine's own copies (the next refresh allocates them again)."""
        if self.own:
            self.layers = self.embed = self.norm = self.lm_head = None
        self._packed = {}

    @staticmethod
    def _linear(module: torch.nn.Module, gather: bool = False, fold: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias ``module`` computes with: under active, unmerged LoRA adapters a new tensor, base
        weight + their deltas (``get_delta_weight``: scale * B @ A), which refresh recomputes after every step.

        ``gather`` (FSDP2): base weight, bias and both adapter factors gathered whole first, so the sum is a plain
        tensor; ``fold=False``: the base weight alone (a sharded model's shapes, before anything is gathered)."""
        weight, bias = module.weight, getattr(module, "bias", None)
        if gather:
            weight, bias = _full(weight), _full(bias)
        lora = sys.modules.get("peft.tuners.lora")  # adapters exist only once peft was imported
        if fold and lora is not None and isinstance(module, lora.LoraLayer) and not module.merged and not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.lora_A:
                    if gather:  # peft's Linear.get_delta_weight, on the gathered factors
                        delta = _full(module.lora_B[name].weight) @ _full(module.lora_A[name].weight)
                        delta = (delta.T if module.fan_in_fan_out else delta) * module.scaling[name]
                    else:
                        delta = module.get_delta_weight(name)
                    weight = weight + delta.to(weight.dtype)
        return weight, bias

    def _layer(self, layer: torch.nn.Module, gather: bool = False, fold: bool = True) -> dict[str, Any]:
        """One decoder layer's tensors (``gather``, ``fold``: as ``_linear``)."""
        a, m = layer.self_attn, layer.mlp
        full = _full if gather else (lambda t: t)
        linear = lambda module: self._linear(module, gather, fold)  # noqa: E731
        return {
            "ln1": full(layer.input_layernorm.weight),
            "ln2": full(layer.post_attention_layernorm.weight),
            "q": linear(a.q_proj),
            "k": linear(a.k_proj),
            "v": linear(a.v_proj),
            "o": linear(a.o_proj),
            "q_norm": full(getattr(getattr(a, "q_norm", None), "weight", None)),
            "k_norm": full(getattr(getattr(a, "k_norm", None), "weight", None)),
            "gate": linear(m.gate_proj),
            "up": linear(m.up_proj),
            "down": linear(m.down_proj),
        }

    def _source(self, fold: bool = True) -> dict[str, Any]:
        base = self.model.model
        return {
            "embed": base.embed_tokens.weight,
            "norm": base.norm.weight,
            "lm_head": self._linear(self.model.get_output_embeddings(), fold=fold),
            "layers": [self._layer(layer, fold=fold) for layer in base.layers],
        }

    def _gathered_source(self) -> dict[str, Any]:
        """``_source`` of a sharded model, gathered: the top-level tensors now, each layer's only when iterated
        (a generator), so one layer's gathers at a time are alive beside the copies."""
        base = self.model.model
        head = self.model.get_output_embeddings()
        lm_head = (None, _full(getattr(head, "bias", None))) if self._tied else self._linear(head, gather=True)
        return {
            "embed": _full(base.embed_tokens.weight),
            "norm": _full(base.norm.weight),
            "lm_head": lm_head,
            "layers": (self._layer(layer, gather=True) for layer in base.layers),
        }

    @torch.no_grad()
    def refresh(self) -> None:
        """Point at (or copy) the model's current weights; call after every optimizer step (generate does).
        Sharded (FSDP2): a collective, every process refreshes in step."""
        if self.sharded:
            if self.layers is None:  # shapes only: nothing gathered yet
                self._allocate(self._source(fold=False))
            self._copy(self._gathered_source())
            return
        src = self._source()
        if not self.own:
            self._point(src)
        else:
            if self.layers is None:  # first call (or after drop): allocate the fused buffers
                self._allocate(src)
            self._copy(src)
        if self.pack:
            self._pack()

    def _point(self, src: dict[str, Any]) -> None:
        cast = (lambda t: t) if src["embed"].dtype == self.dtype else (lambda t: None if t is None else t.to(self.dtype))
        self.embed, self.norm = cast(src["embed"]), cast(src["norm"])
        self.lm_head = (cast(src["lm_head"][0]), cast(src["lm_head"][1]))
        self.layers = [
            {k: (tuple(cast(t) for t in v) if isinstance(v, tuple) else cast(v)) for k, v in layer.items()}
            for layer in src["layers"]
        ]

    def _allocate(self, src: dict[str, Any]) -> None:
        fold_norms = self.fold_norms

        def alloc(*tensors: torch.Tensor | None) -> torch.Tensor | None:
            if any(t is None for t in tensors):
                return None
            return torch.empty((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), dtype=self.dtype, device=tensors[0].device)

        self.embed = alloc(src["embed"])
        tied = _ptr(src["lm_head"][0]) == _ptr(src["embed"])
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

    @staticmethod
    def _fill(dst: torch.Tensor | None, *parts: torch.Tensor | None, norm: torch.Tensor | None = None) -> None:
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

    def _copy(self, src: dict[str, Any]) -> None:
        fill, fold_norms = self._fill, self.fold_norms
        fill(self.embed, src["embed"])
        if not self._tied:
            fill(self.lm_head[0], src["lm_head"][0])
        fill(self.lm_head[1], src["lm_head"][1])
        fill(self.norm, src["norm"])
        for d, s in zip(self.layers, src["layers"], strict=True):  # sharded: each layer gathered here, freed at the next
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

