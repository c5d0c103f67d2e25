"""Per-token log-probabilities of completions under a model, the quantity every policy loss is built from.

Lean by construction: the vocabulary projection runs only on the positions that predict a completion token (not on
prompts or padding), in chunks of tokens, each recomputed in the backward pass (on the CPU: its probabilities kept)
with its gradient in closed form (``_HeadChunk``), so no float32 [batch, length, vocab] tensor is ever materialised;
with ``packing`` the rows of a micro-batch are laid end to end (no padding) and attention is kept inside each row by
the mask their position ids make; with ``shared_prompt`` a group's G completions share one copy of their prompt in
one row (a tree-shaped attention mask: each completion sees the prompt and itself), so the prompt is computed once
per group instead of G times.

The work is split in two so that a GPU never waits on the host: ``logprob_inputs`` does everything whose size
depends on the data (which positions are real, the packing) on the CPU, before any of it is on the device, and
``logprobs_from_inputs`` only launches fixed-size device work. A trainer prepares all its micro-batches, moves them
once, and then runs forward and backward passes back to back with no host synchronisation in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rlreason.models import causal_lm
from rlreason.training.packed_products import Packs, packs_for

SHARED_PROMPT_ATTENTION = "rlreason_shared_prompt"
"""The attention function shared-prompt rows use with sdpa models: registered with transformers below."""

CAUSAL_ATTENTION = "rlreason_causal"
"""Attention under a name transformers builds no mask for (registered below), for rows that need causal attention
only: given no mask, SDPA runs its causal kernels (``is_causal``), or the CPU plain products (``causal_attention``).
Under "sdpa" itself transformers makes a 4-d mask whenever it reads the position ids as packed sequences, which is
always while the decoder is compiled (train.compile) and, eagerly, whenever right padding repeats a row's last
position."""

MASKED_ATTENTION = "rlreason_masked"
"""Attention under the mask transformers makes for sdpa (its mask function is registered for this name below), for
packed rows, whose sequences the mask keeps apart: SDPA with that mask, or on the CPU ``_attend``'s plain products."""

SCORES_BYTES = 1 << 26
"""The most float32 attention scores (64 MiB a layer) the CPU attention computes as plain products (``_attend``)."""

CHUNK_BYTES = 1 << 26
"""Float32 logits per chunk of the vocabulary projection on the CPU (64 MiB, near its caches): tokens per chunk =
CHUNK_BYTES / (4 x vocab)."""

GPU_CHUNK_BYTES = 1 << 30
"""The same on a GPU (1 GiB: 5,461 tokens at SmolLM2's 49,152-token vocabulary). Each chunk's weight gradient is a
whole [vocab, hidden] product summed into the others, and its products reach the GPU's rate only with thousands of
rows, so small chunks spend the head's time on launches and on writing and adding those gradients; a chunk this size
holds about 2 GiB more at its peak than one of 64 MiB at the benchmark's shapes (benchmarks/head_chunks.py)."""

EXP_FLOOR = -87.0
"""Log-probabilities below this are exponentiated as this (exp(-87) ~ 1.6e-38, float32's smallest normal, where a
probability is 0 to every sum it enters): on the CPU an exp whose result is subnormal takes ~30x longer, and a trained
model's log-probs over the vocabulary reach that far."""

KEPT_PROBS_BYTES = 1 << 30
"""On the CPU, the most bytes of probabilities (1 GiB a micro-batch) the head's forward keeps for its backward."""


@dataclass
class SharedLayout:
    """Where a shared-prompt row's pieces are, for ``shared_prompt_attention``: each row's prompt at columns
    [0, its length), then its segments (one completion each), as index tensors padded to the longest piece."""

    segment: torch.Tensor  # [R, C] of every column: -1 padding, 0 prompt, k + 1 the row's k-th completion
    prompt_mask: torch.Tensor  # [R, 1, Pw, Pw] bool: causal inside each row's prompt
    query_at: torch.Tensor  # [S, Cw] each segment's columns, as flat indices into [R * C] (padding repeats its first)
    key_at: torch.Tensor  # [S, Pw + Cw] flat indices of its row's prompt columns, then its own
    segment_mask: torch.Tensor  # [S, 1, Cw, Pw + Cw] bool: the row's prompt, and the segment causally
    out_at: torch.Tensor  # [T] flat indices into [R * C] of every real query, prompts first, then segments
    prompt_take: torch.Tensor  # [Tp] flat indices into [R, Pw] of the real prompt queries
    segment_take: torch.Tensor  # [Ts] flat indices into [S, Cw] of the real segment queries

    def to(self, device: torch.device | str) -> SharedLayout:
        return SharedLayout(**{f.name: _to_device(getattr(self, f.name), device) for f in fields(self)})


@dataclass
class LogprobInputs:
    """A micro-batch laid out for the model: its input rows, and for every completion token (row-major order of
    the completion mask) the (row, column) of the hidden state predicting it and its place in the [N, Lc] output."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # [N, L]; None when packed (position ids keep sequences apart) or shared
    hidden_rows: torch.Tensor
    hidden_cols: torch.Tensor
    targets: torch.Tensor
    out_rows: torch.Tensor
    out_cols: torch.Tensor
    completion_mask: torch.Tensor  # [N, Lc] the micro-batch's completion tokens (N rows before packing)
    packed: bool  # rows are not the micro-batch's rows (packed or shared prompts)
    shared: SharedLayout | None = None
    left_padded: bool = False  # some prompt is padded on the left (read from the CPU mask: no device sync later)
    trailing_cols: int = 0  # padding columns after the completions (``width_multiple``)
    loss_mask: torch.Tensor | None = None  # [N, Lc] the tokens the loss reads: the completion mask less observations

    @property
    def completion_width(self) -> int:
        return self.completion_mask.shape[1]

    @property
    def trained_mask(self) -> torch.Tensor:
        """[N, Lc] the completion tokens the loss and its statistics read (an episode's observations left out)."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    def to(self, device: torch.device | str) -> LogprobInputs:
        """Every tensor on ``device``, without waiting for the device."""
        return LogprobInputs(**{f.name: _to_device(getattr(self, f.name), device) for f in fields(self)})


def _to_device(value, device: torch.device | str):
    """Tensors (and layouts of them) to ``device``; from CPU to GPU through pinned memory, asynchronously."""
    if isinstance(value, SharedLayout):
        return value.to(device)
    if not isinstance(value, torch.Tensor):
        return value
    if torch.device(device).type == "cuda" and value.device.type == "cpu":
        value = value.pin_memory()
    return value.to(device, non_blocking=True)


def logprob_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    packing: bool = False,
    shared_prompt: bool = False,
    width_multiple: int = 1,
    pad_id: int = 0,
    loss_mask: torch.Tensor | None = None,
) -> LogprobInputs:
    """The model's inputs for a padded micro-batch (prompts left-padded, completions right-padded). Cheapest on CPU
    tensors: it reads the masks' contents. Position ids follow the attention mask, as in ``generate``, so left
    padding does not shift the prompt's positions.

    ``width_multiple``: padded rows are widened to a multiple of it by columns of ``pad_id`` after the completions,
    so that the model sees few distinct widths (train.cuda_graphs records a graph per width). Padding on the right
    changes nothing a real token sees, and unlike left padding it needs no attention mask (``_attention_and_mask``).

    ``loss_mask``: the completion tokens the loss reads (an episode's observation tokens are in ``completion_mask``,
    which the model attends to, but not in it); None: all of them."""
    out_rows, out_cols = completion_mask.nonzero(as_tuple=True)
    targets = completion_ids[out_rows, out_cols]
    if packing and shared_prompt:
        raise ValueError("train.packing and train.shared_prompt: choose one layout")
    if width_multiple > 1 and (packing or shared_prompt):
        raise ValueError("width_multiple: padded rows only (not train.packing or train.shared_prompt)")
    if shared_prompt:
        ids, positions, rows, cols, layout = _share_prompts(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return LogprobInputs(
            ids, positions, None, rows, cols, targets, out_rows, out_cols, completion_mask, True, layout, loss_mask=loss_mask
        )
    if packing:
        ids, positions, rows, cols = _pack(prompt_ids, prompt_mask, completion_ids, completion_mask)
        return LogprobInputs(ids, positions, None, rows, cols, targets, out_rows, out_cols, completion_mask, True, loss_mask=loss_mask)
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    trailing = -ids.shape[1] % width_multiple
    ids, mask = F.pad(ids, (0, trailing), value=pad_id), F.pad(mask, (0, trailing), value=0)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    cols = out_cols + prompt_ids.shape[1] - 1  # the position before a completion token predicts it
    return LogprobInputs(
        ids, positions, mask, out_rows, cols, targets, out_rows, out_cols, completion_mask, False,
        left_padded=not bool(prompt_mask.all()), trailing_cols=trailing, loss_mask=loss_mask,
    )


def completion_logprobs(
    model: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = False,
    packing: bool = False,
    shared_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(completion token | prefix) at ``temperature`` [N, Lc], and the per-token entropy (detached unless
    ``entropy_grad``, which an entropy bonus needs). Both are 0 where ``completion_mask`` is 0.

    The logits are divided by the sampling temperature so that the ratio against the sampling policy is 1 when
    nothing changed. ``packing`` and ``shared_prompt`` give the same values (up to float error;
    tests/test_logprobs.py) from fewer, unpadded rows.
    """
    inputs = logprob_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask, packing, shared_prompt)
    return logprobs_from_inputs(model, inputs, temperature, entropy_grad)


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of each row of a chunk's logits, at ``temperature``, in float32."""
    token, entropy, _ = _chunk_stats_and_probs(logits, targets, temperature)
    return token, entropy


def _probs(logp: torch.Tensor) -> torch.Tensor:
    """exp(logp), from ``EXP_FLOOR`` up."""
    return logp.clamp(min=EXP_FLOOR).exp_()


def _chunk_logit_grad(
    logits: torch.Tensor, targets: torch.Tensor, entropy: torch.Tensor, grad_token: torch.Tensor, grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """The loss's gradient with respect to a chunk's logits (in their dtype), given the gradients of ``_chunk_stats``'s
    two outputs (the entropy's: None when it takes none); in place where it can, so eagerly a chunk holds two
    float32 copies at most."""
    logp = _log_softmax(logits, temperature)
    if grad_entropy is None:
        grad = logp.clamp_(min=EXP_FLOOR).exp_().mul_(-grad_token.unsqueeze(-1))
    else:
        probs = _probs(logp)
        grad = probs * logp.add_(entropy.unsqueeze(-1)).mul_(-grad_entropy.unsqueeze(-1)) - probs * grad_token.unsqueeze(-1)
    return _token_grad_added(grad, targets, grad_token, temperature).to(logits.dtype)


def _token_grad_added(grad: torch.Tensor, targets: torch.Tensor, grad_token: torch.Tensor, temperature: float) -> torch.Tensor:
    """``grad`` (float32, the -p terms) plus the one-hot term of d log p(target), through the temperature; in place."""
    grad.scatter_add_(-1, targets.unsqueeze(-1), grad_token.unsqueeze(-1))
    if temperature != 1.0:
        grad /= temperature
    return grad


def _chunk_stats_and_probs(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_chunk_stats``, and the float32 probabilities they were computed from (a backward can keep them)."""
    logp = _log_softmax(logits, temperature)
    token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = logp.clamp_(min=EXP_FLOOR).exp()  # in the entropy a term below the floor is ~1e-36 either way
    return token, -(probs * logp).sum(-1), probs


def _kept_probs_logit_grad(
    probs: torch.Tensor, targets: torch.Tensor, token: torch.Tensor, grad_token: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``_chunk_logit_grad`` with no entropy gradient, from the probabilities the forward kept (in the logits'
    dtype), in that dtype. The target's own entry, g (1 - p) / T, comes from its float32 log-probability ``token``: from a
    bf16 p it would be g (1 - round(p)), and a p above 0.998 rounds to 1."""
    scale = grad_token / temperature
    grad = probs * -scale.to(probs.dtype).unsqueeze(-1)
    own = -torch.expm1(token) * scale
    return grad.scatter_(-1, targets.unsqueeze(-1), own.to(grad.dtype).unsqueeze(-1))


class HeadMath(NamedTuple):
    """The head's math past its matrix product (``_chunk_stats``, ``_chunk_logit_grad``), eager or compiled."""

    stats: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    logit_grad: Callable[..., torch.Tensor]


EAGER_HEAD = HeadMath(_chunk_stats, _chunk_logit_grad)


def compiled_head_math(backend: str = "inductor") -> HeadMath:
    """The head's math compiled, each function into a few fused kernels: eagerly a 64 MiB chunk of float32 logits
    is written and read by about ten separate kernels (the float copy, log_softmax, exp, products, sums), each a
    full pass over memory that fusing saves. Dynamic shapes: the last chunk of a batch has any length."""
    return HeadMath(
        torch.compile(_chunk_stats, backend=backend, dynamic=True), torch.compile(_chunk_logit_grad, backend=backend, dynamic=True)
    )


def _lean_parts(model) -> tuple[PreTrainedModel, torch.nn.Module | None, torch.nn.Linear | None]:
    """The causal LM under DDP / accelerate / peft wrappers (calls still go through ``model``), its decoder and its
    head; decoder and head None when its logits are more than a Linear head of the decoder's output (soft-capping,
    scaling), which the lean paths cannot compute."""
    inner = causal_lm(getattr(model, "module", model))
    base = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if base is None or not isinstance(head, torch.nn.Linear) or _scales_logits(inner.config):
        return inner, None, None
    return inner, base, head


def can_share_prompts(model: PreTrainedModel) -> bool:
    """Whether ``logprobs_from_inputs`` takes shared-prompt inputs for this model: a Linear head, and attention it
    can lay out as a tree (sdpa or eager)."""
    inner, _, head = _lean_parts(model)
    implementation = getattr(inner.config, "_attn_implementation", "sdpa")
    return head is not None and implementation in ("sdpa", "eager", SHARED_PROMPT_ATTENTION)


def logprobs_from_inputs(
    model: PreTrainedModel, inputs: LogprobInputs, temperature: float = 1.0, entropy_grad: bool = False, head_math: HeadMath = EAGER_HEAD
) -> tuple[torch.Tensor, torch.Tensor]:
    """``completion_logprobs`` of inputs from ``logprob_inputs``, already on the model's device; ``head_math``:
    ``compiled_head_math()`` under train.compile."""
    inner, base, head = _lean_parts(model)
    if head is None:
        if inputs.packed:
            raise ValueError(f"train.packing / train.shared_prompt: not supported for {type(inner).__name__}")
        return _full_logits_path(model, inputs, temperature, entropy_grad)

    (implementation, mask), extra = _attention_and_mask(inputs, inner.config), {}
    if inputs.shared is not None:
        if implementation == "eager":  # a tree-shaped mask over the whole row, added to the scores
            tree = _tree_mask(inputs.shared.segment)
            mask = torch.zeros(tree.shape, device=tree.device).masked_fill(~tree, torch.finfo(torch.float32).min)
        elif implementation in ("sdpa", SHARED_PROMPT_ATTENTION):
            extra = {"shared_layout": inputs.shared}
            implementation = SHARED_PROMPT_ATTENTION
        else:
            raise ValueError(f"train.shared_prompt: needs sdpa or eager attention, the model uses {implementation!r}")
    with _attention(inner.config, implementation):
        hidden, autocast = _final_hidden(model, base, input_ids=inputs.input_ids, position_ids=inputs.position_ids, attention_mask=mask, **extra)
    with torch.autocast(hidden.device.type, dtype=autocast[1], enabled=autocast[0]):
        lp, ent = _head_logprobs(_gather(hidden, inputs.hidden_rows * hidden.shape[1] + inputs.hidden_cols), head.weight, head.bias, inputs.targets, temperature, entropy_grad, head_math)
    return _scatter(lp, inputs), _scatter(ent, inputs)


def labelled_logprobs(
    model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None, ignore: int = -100
) -> torch.Tensor | None:
    """log p(labels[r, c] | input_ids[r, :c]) of every label that is not ``ignore`` (row-major, [T]): the supervised
    loss's terms, with the head run only on the positions that predict a label (a cold start's rows are mostly
    prompt). Rows are right-padded, or packed with ``position_ids`` restarting at each sequence, which keeps
    attention inside it. None for models whose logits are more than a Linear head (their own loss is exact)."""
    inner, base, head = _lean_parts(model)
    if head is None:
        return None
    rows, cols = (labels[:, 1:] != ignore).nonzero(as_tuple=True)
    implementation = getattr(inner.config, "_attn_implementation", "sdpa")
    if position_ids is None and implementation == "sdpa" and _causal_only(inner.config):
        implementation = CAUSAL_ATTENTION  # right padding follows every real token: causal attention alone is exact
    elif position_ids is not None and implementation == "sdpa":
        implementation = MASKED_ATTENTION
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    with _attention(inner.config, implementation):
        hidden, autocast = _final_hidden(model, base, input_ids=input_ids, position_ids=position_ids)
    with torch.autocast(hidden.device.type, dtype=autocast[1], enabled=autocast[0]):
        lp, _ = _head_logprobs(_gather(hidden, rows * hidden.shape[1] + cols), head.weight, head.bias, labels[rows, cols + 1], 1.0, False)
    return lp


def padded_causal_mask(mask: torch.Tensor, additive: bool = False) -> torch.Tensor:
    """[N, 1, L, L] attention mask of rows whose 2-d ``mask`` [N, L] pads them: causal over real keys, and each
    padding query attends itself. Without that, a left-padding query has no key at all; some kernels (SDPA compiled
    by inductor on CUDA, seen on an H200) then give NaN there, and its gradient reaches every weight (0 * NaN), though
    the loss never reads that position. ``additive``: 0 / float32 min, for eager attention; else True where allowed."""
    L = mask.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    allowed = ((causal & mask.bool()[:, None, :]) | torch.eye(L, dtype=torch.bool, device=mask.device)).unsqueeze(1)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, device=mask.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _attention_and_mask(inputs: LogprobInputs, config) -> tuple[str, torch.Tensor | None]:
    """The attention implementation and the mask the model runs the rows with.

    Rows with no left-padded prompt get no mask: causal attention alone is exact, since a row's padding all follows
    its last real token (completions are right-padded), where no real query looks, and no padding position's output
    is read; under sdpa they run as ``CAUSAL_ATTENTION`` (SDPA's ``is_causal``) when every layer is plainly causal.
    Left-padded rows under sdpa and eager attention get the 4-d mask of ``padded_causal_mask`` when every layer is
    plainly causal; otherwise (sliding windows, which only the masks transformers makes carry; flash-attention) the
    2-d mask, from which the model makes its own. Packed rows under sdpa run as ``MASKED_ATTENTION``, under the mask
    transformers makes from their position ids; shared rows (and packed ones otherwise) the model's own, no mask."""
    implementation = getattr(config, "_attn_implementation", "sdpa")
    causal = _causal_only(config)
    if not inputs.left_padded:
        if implementation == "sdpa" and inputs.packed and inputs.shared is None:
            return MASKED_ATTENTION, None
        fast = implementation == "sdpa" and not inputs.packed and causal
        return (CAUSAL_ATTENTION if fast else implementation), None
    if implementation in ("sdpa", "eager") and causal:
        return implementation, padded_causal_mask(inputs.attention_mask, additive=implementation == "eager")
    return implementation, inputs.attention_mask


def _causal_only(config) -> bool:
    """Every layer attends causally to the whole row: no sliding window or attention chunks, which transformers
    builds into the mask it makes (and would leave out under ``CAUSAL_ATTENTION``), and not bidirectional."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"]
    return (
        getattr(config, "is_causal", True)
        and all(kind == "full_attention" for kind in layer_types)
        and getattr(config, "sliding_window", None) is None
        and getattr(config, "attention_chunk_size", None) is None
    )


def _gather(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """x[r, c] of [N, L, ...] for the flat indices ``at`` = r * L + c (any shape), as one gather along a single
    dimension: its backward is one index_add, not advanced indexing's accumulating index_put, serial on the CPU."""
    return x.flatten(0, 1).index_select(0, at.flatten()).view(*at.shape, *x.shape[2:])


def _scatter(values: torch.Tensor, inputs: LogprobInputs) -> torch.Tensor:
    """[T] per-token values back to [N, Lc], zeros elsewhere (differentiable, no host synchronisation)."""
    out = values.new_zeros(inputs.completion_mask.shape)
    return out.index_put((inputs.out_rows, inputs.out_cols), values)


def _scales_logits(config) -> bool:
    """Models whose logits are more than ``lm_head(hidden)`` (soft-capping, scaling) take the plain path."""
    return any(getattr(config, name, None) not in (None, 1.0) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))


def _final_hidden(model, base, **inputs) -> tuple[torch.Tensor, tuple[bool, torch.dtype]]:
    """The decoder's last hidden states (after its final norm), computed through ``model`` itself so that
    wrappers (DDP's gradient hooks, accelerate's autocast) still apply; the head runs on one position only."""
    seen: dict[str, object] = {}

    def grab(module, args, output):
        seen["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state
        device = seen["hidden"].device.type
        seen["autocast"] = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    handles = [base.register_forward_hook(grab)]
    rotary = getattr(base, "rotary_emb", None)
    if isinstance(rotary, torch.nn.Module):
        handles.append(rotary.register_forward_hook(_rotary_tables_in_autocast_dtype))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen["hidden"], seen["autocast"]


def _rotary_tables_in_autocast_dtype(module, args, output):
    """On the CPU under autocast, the rotary cos and sin in the autocast dtype, as a bf16 model (and the engine)
    has them: float32 tables promote the bf16 queries and keys to float32, so every pass of the rotation, of its
    gradient and of the attention's gathers moves twice the bytes. On a GPU the rotation is a small share of the
    step and stays as the model computes it."""
    tables = isinstance(output, tuple) and len(output) == 2
    if not (tables and all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in output)):
        return None  # not a (cos, sin) pair of float32 tables (complex frequencies, say): left as it is
    device = output[0].device.type
    if device != "cpu" or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in output)


def head_chunk_tokens(device: str, vocab: int) -> int:
    """Tokens per chunk of the head on ``device`` (a device type): ``CHUNK_BYTES`` or ``GPU_CHUNK_BYTES`` of float32
    logits, read when called, so a benchmark can set them."""
    return max(16, (CHUNK_BYTES if device == "cpu" else GPU_CHUNK_BYTES) // (4 * vocab))


def _head_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, temperature: float, entropy_grad: bool,
    head_math: HeadMath = EAGER_HEAD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T] log-probabilities of ``targets`` and entropies from [T, H] hidden states, a chunk of tokens at a time.
    The products run in the autocast dtype, cast once for all chunks (as autocast's own cast cache would)."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    packs = packs_for(weight, dtype)
    # On the CPU the backward's second product is the head's costliest part, and memory is plentiful; on a GPU a
    # micro-batch's [tokens, vocab] kept until its backward is what the chunks exist to avoid.
    keep = device == "cpu" and not entropy_grad and hidden.shape[0] * weight.shape[0] * dtype.itemsize <= KEPT_PROBS_BYTES
    with torch.autocast(device, enabled=False):
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        chunk = head_chunk_tokens(device, weight.shape[0])
        lps, ents = [], []
        for start in range(0, hidden.shape[0], chunk):
            lp, ent = _HeadChunk.apply(
                hidden[start : start + chunk], weight, bias, targets[start : start + chunk], temperature, entropy_grad,
                head_math, packs, keep,
            )
            lps.append(lp)
            ents.append(ent)
    if not lps:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty
    return torch.cat(lps), torch.cat(ents)


class _HeadChunk(torch.autograd.Function):
    """log p(target) and the entropy for a chunk of positions, from their hidden states and the head.

    The gradient is written in closed form, d log p(target) = one-hot - p and d entropy = -p (log p + entropy),
    instead of differentiating log_softmax, gather and the entropy's sum step by step: a handful of passes over the
    chunk's logits instead of about twenty. Nothing of [tokens, vocab] size is kept for backward, which recomputes
    the logits, unless ``keep``: then the forward keeps the probabilities (in the logits' dtype) and the backward
    needs no product but the two gradient ones. The inputs share one dtype (``_head_logprobs`` casts them); the math
    past the product is float32."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature: float, entropy_grad: bool, head_math: HeadMath, packs: Packs | None,
        keep: bool,
    ):
        logits = _logits(hidden, weight, bias, packs)
        if keep:
            token, entropy, probs = _chunk_stats_and_probs(logits, targets, temperature)
            kept = probs.to(logits.dtype)
        else:
            (token, entropy), kept = head_math.stats(logits, targets, temperature), None
        ctx.save_for_backward(hidden, weight, bias, targets, entropy, kept, token if keep else None)
        ctx.temperature, ctx.entropy_grad, ctx.head_math, ctx.packs = temperature, entropy_grad, head_math, packs
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return token, entropy

    @staticmethod
    def backward(ctx, grad_token, grad_entropy):
        hidden, weight, bias, targets, entropy, kept, token = ctx.saved_tensors
        if kept is not None:
            grad = _kept_probs_logit_grad(kept, targets, token, grad_token, ctx.temperature)
        else:
            grad_entropy = grad_entropy if ctx.entropy_grad else None
            logits = _logits(hidden, weight, bias, ctx.packs)
            grad = ctx.head_math.logit_grad(logits, targets, entropy, grad_token, grad_entropy, ctx.temperature)
        grad_hidden = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grad @ weight if ctx.packs is None else ctx.packs.times(grad)
        grad_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packs: Packs | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias) if packs is None else packs.times_transposed(hidden, bias)


def _pack(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Lay each row's real tokens (prompt, then completion) end to end, first-fit by decreasing length into rows
    no longer than the longest sequence; position ids restart at 0 for each sequence, which is how transformers
    keeps attention inside a sequence without an attention mask. Returns ids and positions [R, C] and, for every
    completion token (row-major order of ``completion_mask``), the (row, column) of the position predicting it."""
    device = prompt_ids.device
    p_len, c_len = prompt_mask.sum(dim=1).tolist(), completion_mask.sum(dim=1).tolist()
    lengths = [p + c for p, c in zip(p_len, c_len, strict=True)]
    capacity = max(lengths)
    bins: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(space):
            if free >= lengths[i]:
                bins[b].append(i)
                space[b] -= lengths[i]
                break
        else:
            bins.append([i])
            space.append(capacity - lengths[i])
    ids = torch.zeros(len(bins), capacity, dtype=prompt_ids.dtype, device=device)
    positions = torch.zeros(len(bins), capacity, dtype=torch.long, device=device)
    where = torch.zeros(len(lengths), 2, dtype=torch.long)  # (packed row, start column) of each original row
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            tokens = torch.cat([prompt_ids[i][prompt_mask[i].bool()], completion_ids[i][completion_mask[i].bool()]])
            ids[r, at : at + lengths[i]] = tokens
            positions[r, at : at + lengths[i]] = torch.arange(lengths[i], device=device)
            where[i] = torch.tensor([r, at])
            at += lengths[i]
        # the padding at the end of a row is one more sequence of its own (positions from 0): it attends only itself
        positions[r, at:] = torch.arange(capacity - at, device=device)
    rows_of, cols_of = [], []
    for i in range(len(lengths)):
        r, start = where[i].tolist()
        first = start + p_len[i] - 1  # predicts completion token 0
        rows_of += [r] * c_len[i]
        cols_of += range(first, first + c_len[i])
    return ids, positions, torch.tensor(rows_of, device=device, dtype=torch.long), torch.tensor(cols_of, device=device, dtype=torch.long)


def _share_prompts(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """One row per run of consecutive rows with the same prompt: the prompt once, then each completion's tokens,
    with the positions each would have after the prompt alone. A completion's first token is predicted by the
    prompt's last position, shared by the group. Returns ids, positions, for every completion token (row-major
    order of ``completion_mask``) the (row, column) of the position predicting it, and the layout attention needs."""
    p_len, c_len = prompt_mask.sum(dim=1).tolist(), completion_mask.sum(dim=1).tolist()
    prompts = [prompt_ids[i][prompt_mask[i].bool()] for i in range(len(p_len))]
    groups: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if groups and torch.equal(prompts[groups[-1][0]], prompt):
            groups[-1].append(i)
        else:
            groups.append([i])
    capacity = max(p_len[g[0]] + sum(c_len[i] for i in g) for g in groups)
    ids = torch.zeros(len(groups), capacity, dtype=prompt_ids.dtype)
    positions = torch.zeros(len(groups), capacity, dtype=torch.long)
    segment = torch.full((len(groups), capacity), -1, dtype=torch.long)
    rows_of, cols_of, segments = [], [], []  # segments: (row, start column, length) of each completion
    for r, members in enumerate(groups):
        p = p_len[members[0]]
        ids[r, :p], positions[r, :p], segment[r, :p] = prompts[members[0]], torch.arange(p), 0
        at = p
        for k, i in enumerate(members):
            c = c_len[i]
            ids[r, at : at + c] = completion_ids[i][completion_mask[i].bool()]
            positions[r, at : at + c] = torch.arange(p, p + c)
            segment[r, at : at + c] = k + 1
            rows_of += [r] * c
            cols_of += [p - 1, *range(at, at + c - 1)] if c else []
            segments.append((r, at, c))
            at += c
    layout = _shared_layout(segment, [p_len[g[0]] for g in groups], segments)
    device = prompt_ids.device
    return (
        ids.to(device), positions.to(device),
        torch.tensor(rows_of, dtype=torch.long, device=device), torch.tensor(cols_of, dtype=torch.long, device=device),
        layout.to(device),
    )


def _tree_mask(segment: torch.Tensor) -> torch.Tensor:
    """[R, 1, C, C] bool from segment ids: a token sees the earlier tokens of its own segment and the prompt;
    padding sees only itself, so no row of the softmax is empty."""
    columns = segment.shape[1]
    causal = torch.ones(columns, columns, dtype=torch.bool, device=segment.device).tril()
    seg_q, seg_k = segment.unsqueeze(2), segment.unsqueeze(1)
    mask = causal & (seg_k >= 0) & ((seg_k == seg_q) | (seg_k == 0)) & (seg_q >= 0)
    return (mask | torch.eye(columns, dtype=torch.bool, device=segment.device)).unsqueeze(1)


def _shared_layout(segment: torch.Tensor, prompts: list[int], segments: list[tuple[int, int, int]]) -> SharedLayout:
    """Index tensors for ``shared_prompt_attention`` (see ``SharedLayout``): ``prompts`` is each row's prompt
    length, ``segments`` each completion's (row, start column, length)."""
    seg_rows, starts, seg_len = (torch.tensor(column) for column in zip(*segments, strict=True))
    pw, cw = max(prompts), max(1, int(seg_len.max()))
    k, j = torch.arange(pw), torch.arange(cw)
    prompt_valid = k < torch.tensor(prompts).unsqueeze(1)  # [R, Pw]
    segment_valid = j < seg_len.unsqueeze(1)  # [S, Cw]
    query_cols = torch.where(segment_valid, starts.unsqueeze(1) + j, starts.unsqueeze(1))
    sees_prompt = prompt_valid[seg_rows].unsqueeze(1).expand(-1, cw, -1)
    sees_own = (j <= j.unsqueeze(1)) & segment_valid.unsqueeze(1)
    p_rows, p_cols = prompt_valid.nonzero(as_tuple=True)
    s_idx, s_j = segment_valid.nonzero(as_tuple=True)
    columns = segment.shape[1]
    query_at = seg_rows.unsqueeze(1) * columns + query_cols
    prompt_at = seg_rows.unsqueeze(1) * columns + k
    return SharedLayout(
        segment=segment,
        prompt_mask=(((k.unsqueeze(1) >= k) & prompt_valid.unsqueeze(1)) | torch.eye(pw, dtype=torch.bool)).unsqueeze(1),
        query_at=query_at,
        key_at=torch.cat([prompt_at, query_at], dim=1),
        segment_mask=torch.cat([sees_prompt, sees_own], dim=2).unsqueeze(1),
        out_at=torch.cat([p_rows * columns + p_cols, query_at[s_idx, s_j]]),
        prompt_take=prompt_valid.flatten().nonzero().squeeze(1),
        segment_take=segment_valid.flatten().nonzero().squeeze(1),
    )


def shared_prompt_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, shared_layout: SharedLayout | None = None, **kwargs):
    """Attention for shared-prompt rows without scoring every query against the whole row: the prompt attends
    causally to itself, and each completion to the prompt and its own tokens, as a batch of short sequences.
    Calls without a layout (any other forward of the model) are plain sdpa."""
    if shared_layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    lay = shared_layout
    batch, heads, length, dim = query.shape
    pw = lay.prompt_mask.shape[-1]
    prompt = _attend(query[:, :, :pw], key[:, :, :pw], value[:, :, :pw], lay.prompt_mask, scaling, dropout)

    def pieces(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # [B, H, L, D] -> [S, H, n, D] of at [S, n]
        return _gather(x.transpose(1, 2), at).transpose(1, 2)

    own = _attend(
        pieces(query, lay.query_at), pieces(key, lay.key_at), pieces(value, lay.key_at), lay.segment_mask, scaling, dropout
    )
    values = torch.cat([
        prompt.transpose(1, 2).reshape(-1, heads * dim).index_select(0, lay.prompt_take),
        own.transpose(1, 2).reshape(-1, heads * dim).index_select(0, lay.segment_take),
    ])
    out = values.new_zeros(batch * length, heads * dim).index_copy(0, lay.out_at, values)
    return out.view(batch, length, heads, dim), None


def _attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor, scaling: float | None, dropout: float
) -> torch.Tensor:
    """Attention of [S, H, n, D] queries over [S, Hkv, m, D] keys under a bool mask [S or 1, 1, n, m]. On the CPU as
    plain products (``_MaskedScores``; the values' in their dtype), each kv head's query heads stacked into one
    matrix, with the softmax in float32: for short sequences SDPA's CPU kernels (flash attention's backward above
    all) run at a fraction of the products' rate. Elsewhere, and where the float32 scores would exceed
    ``SCORES_BYTES`` (they are kept for the backward pass), SDPA."""
    S, H, n, D = query.shape
    kv_heads, m = key.shape[1], key.shape[2]
    scale = D**-0.5 if scaling is None else scaling
    if dropout or not _as_cpu_products(query, m):
        key, value = repeat_kv(key, H // kv_heads), repeat_kv(value, H // kv_heads)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, dropout_p=dropout, scale=scale)
    # contiguous operands: a CPU bf16 product copies any other layout than a (transposed) contiguous one first
    stacked, key, value = query.reshape(S, kv_heads, H // kv_heads * n, D), key.contiguous(), value.contiguous()
    probs = torch.softmax(_MaskedScores.apply(stacked, key, allowed, scale), dim=-1)
    return (probs.to(value.dtype).view(S, kv_heads, -1, m) @ value).view(S, H, n, D).to(query.dtype)


class _MaskedScores(torch.autograd.Function):
    """scale * q @ k.T in float32, -inf where ``allowed`` [S or 1, 1, n, m] is False, for queries stacked per kv head
    [S, Hkv, rep * n, D]. As in flash attention, the scores are float32 products (autocast would round them to bf16)
    and their gradient multiplies in the inputs' dtype (bf16 runs at three times float32's rate on the CPU). The
    gradient is 0 wherever the mask is (softmax gives those positions probability 0): the backward needs no mask."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
        S, kv_heads, rows, _ = query.shape
        n, m = allowed.shape[-2:]
        with torch.autocast(query.device.type, enabled=False):
            scores = (query.float() @ key.float().transpose(-1, -2)).mul_(scale).view(S, kv_heads, rows // n, n, m)
        # an additive mask: a broadcast add is a tenth of a broadcast masked_fill_ here
        scores.add_(torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf")).unsqueeze(1))
        ctx.save_for_backward(query, key)
        ctx.scale = scale
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        query, key = ctx.saved_tensors
        for_key = grad.flatten(2, 3).to(key.dtype)
        for_query = for_key if query.dtype == key.dtype else grad.flatten(2, 3).to(query.dtype)  # one cast, usually
        grad_query = (for_key @ key).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
        grad_key = (for_query.transpose(-1, -2) @ query).mul_(ctx.scale) if ctx.needs_input_grad[1] else None
        return grad_query, grad_key, None, None


def _as_cpu_products(query: torch.Tensor, keys: int) -> bool:
    """Whether attention of ``query`` [S, H, n, D] over ``keys`` keys runs as plain products (``_attend``)."""
    S, H, n, _ = query.shape
    return query.device.type == "cpu" and 4 * S * H * n * keys <= SCORES_BYTES


def causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """``CAUSAL_ATTENTION``: sdpa with its causal kernels, or on the CPU (small enough, see ``_attend``) the same
    attention as float32 products under a causal mask."""
    n, m = query.shape[2], key.shape[2]
    if attention_mask is not None or dropout or n != m or n == 1 or not _as_cpu_products(query, m):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    causal = torch.ones(n, n, dtype=torch.bool, device=query.device).tril().view(1, 1, n, n)
    out = _attend(query, key, value, causal, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def masked_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """``MASKED_ATTENTION``: sdpa, or on the CPU (small enough, see ``_attend``) the same attention as plain products
    under the bool mask transformers made (none: causal, as sdpa's own mask function allows)."""
    if attention_mask is None:
        return causal_attention(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if attention_mask.dtype != torch.bool or dropout or not _as_cpu_products(query, key.shape[2]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    out = _attend(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)
AttentionInterface.register(CAUSAL_ATTENTION, causal_attention)
AttentionInterface.register(MASKED_ATTENTION, masked_attention)
AttentionMaskInterface.register(MASKED_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _attention(config, implementation: str):
    """The model's attention implementation set to ``implementation`` for one forward pass."""
    before = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = before


def _full_logits_path(model, inputs: LogprobInputs, temperature: float, entropy_grad: bool):
    """The plain computation (full logits of the completion positions), for models whose head is not a Linear."""
    length, end = inputs.completion_width, inputs.input_ids.shape[1] - inputs.trailing_cols
    config = getattr(model, "module", model).config
    implementation, mask = _attention_and_mask(inputs, config)
    with _attention(config, implementation):
        logits = model(
            input_ids=inputs.input_ids, attention_mask=mask, position_ids=inputs.position_ids, logits_to_keep=length + 1 + inputs.trailing_cols
        ).logits
    logits = logits[:, :length].float() / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    token_logprobs = logprobs.gather(-1, inputs.input_ids[:, end - length : end].unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = -(_probs(logprobs) * logprobs).sum(-1)
    keep = inputs.completion_mask.to(token_logprobs.dtype)
    return token_logprobs * keep, entropy * keep
