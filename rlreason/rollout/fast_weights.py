"""The fast engine's weights: the model's own tensors, or its own fused copies (q/k/v and gate/up in one matrix each).

A linear layer with LoRA adapters (peft) contributes its base weight plus each active adapter's scale * B @ A,
folded at every refresh, so decoding a LoRA policy costs what decoding the base model costs."""

from __future__ import annotations

import sys
from typing import Any

import torch
from transformers import PreTrainedModel


class EngineWeights:
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
    def _linear(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias ``module`` computes with: under active, unmerged LoRA adapters a new tensor, base
        weight + their deltas (``get_delta_weight``: scale * B @ A), which refresh recomputes after every step."""
        weight, bias = module.weight, getattr(module, "bias", None)
        lora = sys.modules.get("peft.tuners.lora")  # adapters exist only once peft was imported
        if lora is not None and isinstance(module, lora.LoraLayer) and not module.merged and not module.disable_adapters:
            for name in module.active_adapters:
                if name in module.lora_A:
                    weight = weight + module.get_delta_weight(name).to(weight.dtype)
        return weight, bias

    def _source(self) -> dict[str, Any]:
        base = self.model.model
        layers = []
        for layer in base.layers:
            a, m = layer.self_attn, layer.mlp
            layers.append(
                {
                    "ln1": layer.input_layernorm.weight,
                    "ln2": layer.post_attention_layernorm.weight,
                    "q": self._linear(a.q_proj),
                    "k": self._linear(a.k_proj),
                    "v": self._linear(a.v_proj),
                    "o": self._linear(a.o_proj),
                    "q_norm": getattr(getattr(a, "q_norm", None), "weight", None),
                    "k_norm": getattr(getattr(a, "k_norm", None), "weight", None),
                    "gate": self._linear(m.gate_proj),
                    "up": self._linear(m.up_proj),
                    "down": self._linear(m.down_proj),
                }
            )
        head = self.model.get_output_embeddings()
        return {
            "embed": base.embed_tokens.weight,
            "norm": base.norm.weight,
            "lm_head": self._linear(head),
            "layers": layers,
        }

    @torch.no_grad()
    def refresh(self) -> None:
        """Point at (or copy) the model's current weights; call after every optimizer step (generate does)."""
        src = self._source()
        if not self.own:
            self._point(src)
            return
        if self.layers is None:  # first call (or after drop): allocate the fused buffers
            self._allocate(src)
        self._copy(src)

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

