"""The fast engine's buffers and the shape of one decode step: what CUDA graphs are captured against, and the
compaction that moves the live rows into a smaller batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class ModelDims:
    """The sizes of the decoder the engine computes; fixed for the engine's life."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    eps: float

    @classmethod
    def of(cls, cfg: Any, num_layers: int) -> ModelDims:
        num_heads = cfg.num_attention_heads
        return cls(
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
            num_layers=num_layers,
            eps=cfg.rms_norm_eps,
        )


@dataclass(frozen=True)
class StepShape:
    """The batch one decode step computes; a CUDA graph is recorded per shape (and sampling), so it is hashable.

    Before compaction the ``rows`` are ``prompts`` groups of ``group`` completions reading the shared prompt cache;
    after it (``compacted``) every row is a group of one reading its own copy (``Workspace.rows_cache``).
    """

    compacted: bool
    rows: int
    prompts: int
    group: int
    width: int  # completion-cache slots the attention reads: the step number, or its bucket of ``block`` slots


@dataclass
class Workspace:
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

    @classmethod
    def allocate(
        cls, key: tuple[int, int, int, int], dims: ModelDims, kv_dtype: torch.dtype, rope: tuple[torch.Tensor, torch.Tensor], pool: Any
    ) -> Workspace:
        """Zeroed buffers for ``key`` = (prompts, group size, prompt width, completion width), the caches in ``kv_dtype``."""
        P, G, Wp, Wc = key
        N, nl, Hkv, D, dev = P * G, dims.num_layers, dims.num_kv_heads, dims.head_dim, rope[0].device

        def zeros(*shape: int, dtype: torch.dtype = kv_dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=dev)

        return cls(
            key=key, P=P, G=G, Wp=Wp, Wc=Wc,
            kp=zeros(nl, P, Hkv, Wp, D), vp=zeros(nl, P, Hkv, Wp, D),
            kc=zeros(nl, P, Hkv, G, Wc, D), vc=zeros(nl, P, Hkv, G, Wc, D),
            bias_p=zeros(P, Wp, dtype=torch.float32),
            pos0=zeros(N, dtype=torch.long), seeds=zeros(N, dtype=torch.long), tokens=zeros(N, dtype=torch.long),
            done=zeros(N, dtype=torch.bool), row_ids=zeros(N, dtype=torch.long), t=zeros(dtype=torch.long),
            out_tokens=zeros(N + 1, Wc, dtype=torch.long), out_logprobs=zeros(N + 1, Wc, dtype=torch.float32),
            cos=rope[0], sin=rope[1],
            pool=pool,
        )

    def load(self, mask: torch.Tensor, group: torch.Tensor, seeds: list[int], pad_token_id: int) -> None:
        """Reset the per-call state for prompts left-padded under ``mask``; ``group`` is each row's prompt."""
        self.bias_p.fill_(float("-inf"))
        self.bias_p[:, : mask.shape[1]].masked_fill_(mask.bool(), 0.0)
        self.pos0.copy_(mask.sum(dim=1)[group])
        self.seeds.copy_(torch.tensor(seeds, dtype=torch.long))
        self.row_ids.copy_(torch.arange(group.numel(), device=group.device))
        self.done.zero_()
        self.t.zero_()
        self.out_tokens.fill_(pad_token_id)
        self.out_logprobs.zero_()

    def compact(self, active: torch.Tensor, shape: StepShape) -> StepShape:
        """Move the live rows (slot indices ``active``) to the front of a batch of the next power of two rows."""
        n, R = active.numel(), shape.rows
        R_new = max(4, min(1 << (n - 1).bit_length(), R // 2))  # a fixed sequence of sizes: graphs are reused
        if R_new >= R:
            return shape
        rc = self._rows_cache()
        if shape.compacted:
            for name in ("kp", "vp", "kc", "vc"):
                rc[name][:, :n] = rc[name].index_select(1, active)
            rc["bias"][:n] = rc["bias"].index_select(0, active)
        else:
            group, member = active // shape.group, active % shape.group
            for name in ("kp", "vp"):
                rc[name][:, :n] = getattr(self, name).index_select(1, group)
            for name in ("kc", "vc"):
                rc[name][:, :n, :, 0] = getattr(self, name)[:, group, :, member].transpose(0, 1)
            rc["bias"][:n] = self.bias_p.index_select(0, group)
        rc["bias"][n:R_new] = 0.0  # padding slots attend to anything finite; their tokens go to the scratch row
        for name, pad in (("tokens", 0), ("pos0", 0), ("seeds", 0), ("row_ids", self.P * self.G), ("done", True)):
            buffer = getattr(self, name)
            buffer[:n] = buffer.index_select(0, active)
            buffer[n:R_new] = pad
        return StepShape(compacted=True, rows=R_new, prompts=R_new, group=1, width=shape.width)

    def _rows_cache(self) -> dict[str, torch.Tensor]:
        """The rows-phase caches, allocated at the first compaction; they hold half of the rows (at least 4)."""
        rc = self.rows_cache
        if not rc:
            nl, _, Hkv, _, D = self.kp.shape
            half = max(4, (self.P * self.G) // 2)  # compact() never makes fewer than 4 slots
            shape_p, shape_c = (nl, half, Hkv, self.Wp, D), (nl, half, Hkv, 1, self.Wc, D)
            rc.update(
                kp=self.kp.new_zeros(shape_p),
                vp=self.kp.new_zeros(shape_p),
                kc=self.kp.new_zeros(shape_c),
                vc=self.kp.new_zeros(shape_c),
                bias=self.bias_p.new_zeros(half, self.Wp),
            )
        return rc
