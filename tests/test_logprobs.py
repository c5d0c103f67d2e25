"""The lean log-prob computation against the plain one, and packed rows against padded rows.

Tolerances (float32 on the CPU): log-probs, entropies and the loss within 1e-5, gradients within 1e-4 relative
to their largest entry (the computations differ only in summation order).
"""

import pytest
import torch
from conftest import build_char_tokenizer, tiny_config
from transformers import AutoModelForCausalLM

import rlreason.training.logprobs as lp_module
from rlreason.models import compile_decoder
from rlreason.training.logprobs import (
    _full_logits_path,
    completion_logprobs,
    logprob_inputs,
    logprobs_from_inputs,
)


def _tiny(tmp_path, arch):
    tokenizer = build_char_tokenizer(tmp_path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id))


def _batch(seed=0, rows=6, vocab=90):
    """Left-padded prompts and right-padded completions of uneven lengths."""
    g = torch.Generator().manual_seed(seed)
    p_len, c_len = torch.randint(2, 9, (rows,), generator=g), torch.randint(1, 12, (rows,), generator=g)
    prompt_ids = torch.zeros(rows, int(p_len.max()), dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros(rows, int(c_len.max()), dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i in range(rows):
        prompt_ids[i, -p_len[i] :] = torch.randint(5, vocab, (int(p_len[i]),), generator=g)
        prompt_mask[i, -p_len[i] :] = 1
        completion_ids[i, : c_len[i]] = torch.randint(5, vocab, (int(c_len[i]),), generator=g)
        completion_mask[i, : c_len[i]] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _unpadded_prompts(seed=0, rows=6, vocab=90):
    """``_batch`` with every prompt as long as the widest (no left padding), completions still uneven."""
    prompt_ids, _, completion_ids, completion_mask = _batch(seed, rows, vocab)
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(5, vocab, prompt_ids.shape, generator=g)
    return prompt_ids, torch.ones_like(prompt_ids), completion_ids, completion_mask


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    lp, ent = completion_logprobs(model, *batch, temperature=0.7, entropy_grad=True, **kw)
    mask = batch[3].float()
    advantages = torch.linspace(-1, 1, mask.shape[0]).unsqueeze(1)
    loss = -((lp * advantages + 0.01 * ent) * mask).sum() / mask.sum()
    loss.backward()
    return lp.detach(), ent.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_matches_padded(model, batch, **layout):
    """Log-probs, entropies, loss and gradients of a row layout equal the padded rows' (the module's tolerances);
    both are 0 off the completion tokens."""
    lp_pad, ent_pad, loss_pad, grads_pad = _loss_and_grads(model, batch)
    lp, ent, loss, grads = _loss_and_grads(model, batch, **layout)
    mask = batch[3].bool()
    torch.testing.assert_close(lp[mask], lp_pad[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[mask], ent_pad[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, loss_pad, atol=1e-5, rtol=0)
    _close_grads(grads_pad, grads)
    assert (lp[~mask] == 0).all() and (lp_pad[~mask] == 0).all()


def _close_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        scale = a[name].abs().max().clamp(min=1e-8)
        assert ((a[name] - b[name]).abs().max() / scale) < 1e-4, name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "deepseek_v3"])
@pytest.mark.parametrize("cpu_products", [True, False])
def test_packed_equals_padded(tmp_path, arch, monkeypatch, cpu_products):
    """Packed rows run under the mask transformers makes from their position ids: on the CPU as plain products in
    every layer, or (scores over ``SCORES_BYTES``) SDPA under that mask; either way the padded rows' values."""
    monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 90 * 7)  # chunks of 7 tokens: several per batch
    if not cpu_products:
        monkeypatch.setattr(lp_module, "SCORES_BYTES", 0)
    attended, attend = [], lp_module._attend
    monkeypatch.setattr(lp_module, "_attend", lambda *a: attended.append(1) or attend(*a))
    model = _tiny(tmp_path, arch)
    _assert_matches_padded(model, _batch(), packing=True)
    assert len(attended) == (model.config.num_hidden_layers if cpu_products else 0)  # left-padded rows: SDPA


def test_chunked_head_equals_full_logits(tmp_path, monkeypatch):
    """The head a chunk at a time (recomputed in backward) gives the plain path's values and gradients."""
    monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 90 * 5)
    model = _tiny(tmp_path, "llama")
    batch = _batch(seed=1)
    lp, ent, loss, grads = _loss_and_grads(model, batch)

    model.zero_grad()
    ref_lp, ref_ent = _full_logits_path(model, logprob_inputs(*batch), temperature=0.7, entropy_grad=True)
    mask = batch[3].float()
    advantages = torch.linspace(-1, 1, mask.shape[0]).unsqueeze(1)
    ref_loss = -((ref_lp * advantages + 0.01 * ref_ent) * mask).sum() / mask.sum()
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(lp, ref_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=0)
    _close_grads(ref_grads, grads)


def test_no_grad_pass_and_packing_of_a_single_row(tmp_path):
    model = _tiny(tmp_path, "llama")
    batch = tuple(t[:1] for t in _batch(seed=2))
    with torch.no_grad():
        padded, _ = completion_logprobs(model, *batch)
        packed, _ = completion_logprobs(model, *batch, packing=True)
    assert not padded.requires_grad
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_compiled_decoder_gives_the_same_loss_and_gradients(tmp_path):
    """train.compile: the compiled decoder stack computes what the eager one computes, on a padded batch, a batch
    of another width (a recompile with a dynamic width) and a packed one, with no graph break. The CPU test
    compiles with the "aot_eager" backend (dynamo capture and AOT autograd, no code generation, which takes
    minutes on two cores); the GPU benchmark runs inductor."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _tiny(tmp_path, "llama")
    compiled = _tiny(tmp_path, "llama")
    compile_decoder(compiled, backend="aot_eager")
    for seed, packing in ((3, False), (4, False), (5, True)):
        batch = _batch(seed=seed)
        lp_e, _, loss_e, grads_e = _loss_and_grads(eager, batch, packing=packing)
        lp_c, _, loss_c, grads_c = _loss_and_grads(compiled, batch, packing=packing)
        torch.testing.assert_close(lp_c, lp_e, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=0)
        _close_grads(grads_e, grads_c)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their names


def _explicit_2d_mask(monkeypatch):
    """The computation as it was before masks were left out: the model's own attention and the 2-d mask."""
    monkeypatch.setattr(lp_module, "_attention_and_mask", lambda inputs, config: (config._attn_implementation, inputs.attention_mask))


def _spy_model_masks(model):
    """The attention_mask of every call to ``model``, as it was called."""
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
    return seen


def _spy_sdpa(monkeypatch):
    """(mask given, is_causal) of every scaled_dot_product_attention call."""
    seen, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(*args, attn_mask=None, is_causal=False, **kwargs):
        seen.append((attn_mask is not None, is_causal))
        return sdpa(*args, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("deepseek_v3", "sdpa")])
@pytest.mark.parametrize("left_padded", [False, True])
@pytest.mark.parametrize("cpu_products", [True, False])
def test_a_mask_only_for_left_padding(tmp_path, monkeypatch, arch, attention, left_padded, cpu_products):
    """Rows whose prompts are not left-padded (completions right-padded, of uneven lengths) reach the model with no
    attention mask, and under sdpa run causally with none: on the CPU as float32 products, or (scores over
    ``SCORES_BYTES``) SDPA's causal kernel; left-padded rows get a mask. Either way the log-probs, entropies, loss
    and gradients are those of the explicit 2-d mask (the module's tolerances)."""
    monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 90 * 7)
    if not cpu_products:
        monkeypatch.setattr(lp_module, "SCORES_BYTES", 0)
    model = _tiny(tmp_path, arch)
    model.config._attn_implementation = attention
    batch = _batch(seed=4) if left_padded else _unpadded_prompts(seed=4)
    assert bool(batch[1].all()) != left_padded and not batch[3].all()  # completions of uneven lengths
    with monkeypatch.context() as m:
        _explicit_2d_mask(m)
        expected = _loss_and_grads(model, batch)
    masks, sdpa = _spy_model_masks(model), _spy_sdpa(monkeypatch)
    lp, ent, loss, grads = _loss_and_grads(model, batch)
    assert [mask is not None for mask in masks] == [left_padded]
    if attention == "sdpa":  # both layers
        kernel = [] if cpu_products and not left_padded else [(left_padded, not left_padded)] * 2
        assert sdpa == kernel
    mask = batch[3].bool()
    torch.testing.assert_close(lp[mask], expected[0][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[mask], expected[1][mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected[2], atol=1e-5, rtol=0)
    _close_grads(expected[3], grads)
    assert model.config._attn_implementation == attention


@pytest.mark.parametrize("left_padded", [False, True])
def test_sliding_window_layers_keep_the_mask_transformers_makes(tmp_path, monkeypatch, left_padded):
    """Sliding-window layers take their window from the mask transformers makes, so a model with them keeps its own
    attention, with or without left padding (then from the 2-d mask, not ``padded_causal_mask``): its log-probs are
    the explicit 2-d mask's (a window shorter than the rows), and plain causal attention's would differ."""
    tokenizer = build_char_tokenizer(tmp_path)
    config = tiny_config("qwen2", len(tokenizer), tokenizer.eos_token_id)
    config.use_sliding_window, config.sliding_window, config.layer_types = True, 4, ["sliding_attention"] * 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    batch = _batch(seed=6) if left_padded else _unpadded_prompts(seed=6)
    assert bool(batch[1].all()) != left_padded
    masks = _spy_model_masks(model)
    with torch.no_grad():
        got, _ = completion_logprobs(model, *batch)
        with monkeypatch.context() as m:
            _explicit_2d_mask(m)
            expected, _ = completion_logprobs(model, *batch)
        with monkeypatch.context() as m:
            m.setattr(lp_module, "_causal_only", lambda config: True)
            causal, _ = completion_logprobs(model, *batch)
    assert masks[0] is None if not left_padded else masks[0].dim() == 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (causal - expected).abs().max() > 1e-3


def test_compiled_decoder_runs_unmasked_rows_with_the_causal_kernel(tmp_path, monkeypatch):
    """train.compile: transformers makes a 4-d mask for any sdpa call it compiles with no attention mask (it looks
    for packed sequences in the position ids), so rows that need none go through ``CAUSAL_ATTENTION``: the compiled
    graph calls SDPA with is_causal and no mask, and a left-padded batch with a mask; the log-probs are the eager ones.
    (As on a GPU: the CPU's plain products are left out by ``SCORES_BYTES``.)"""
    monkeypatch.setattr(lp_module, "SCORES_BYTES", 0)
    calls = []

    def backend(gm, example_inputs):
        calls.extend((n.kwargs.get("attn_mask") is not None, n.kwargs.get("is_causal")) for n in gm.graph.nodes if n.target is torch._C._nn.scaled_dot_product_attention)
        return gm.forward

    torch._dynamo.reset()
    eager, compiled = _tiny(tmp_path, "llama"), _tiny(tmp_path, "llama")
    compile_decoder(compiled, backend=backend)
    for batch, masked in ((_unpadded_prompts(seed=5), False), (_batch(seed=5), True)):
        calls.clear()
        with torch.no_grad():
            got, _ = completion_logprobs(compiled, *batch)
            expected, _ = completion_logprobs(eager, *batch)
        assert calls == [(masked, not masked)] * 2  # both layers
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("multiple", [16, 64])
@pytest.mark.parametrize("left_padded", [False, True])
def test_rows_padded_on_the_right_to_a_width_bucket_give_the_same_log_probs(tmp_path, multiple, left_padded):
    """train.cuda_graphs widens every row to a multiple of the bucket with padding columns after the completions:
    the log-probs are the unwidened rows' (on the lean path and the plain one), the completion columns and where they
    are read from do not move, and with no prompt left-padded the model still gets no mask."""
    model = _tiny(tmp_path, "llama")
    batch = _batch(seed=7) if left_padded else _unpadded_prompts(seed=7)
    plain, widened = logprob_inputs(*batch), logprob_inputs(*batch, width_multiple=multiple, pad_id=3)
    width = plain.input_ids.shape[1]
    assert widened.input_ids.shape[1] % multiple == 0 and widened.trailing_cols == widened.input_ids.shape[1] - width > 0
    assert torch.equal(widened.input_ids[:, :width], plain.input_ids) and (widened.input_ids[:, width:] == 3).all()
    assert torch.equal(widened.attention_mask[:, :width], plain.attention_mask) and not widened.attention_mask[:, width:].any()
    assert widened.completion_width == plain.completion_width and torch.equal(widened.hidden_cols, plain.hidden_cols)
    masks = _spy_model_masks(model)
    with torch.no_grad():
        expected, _ = logprobs_from_inputs(model, plain)
        got, _ = logprobs_from_inputs(model, widened)
        full, _ = _full_logits_path(model, widened, temperature=1.0, entropy_grad=False)
    assert [mask is not None for mask in masks] == [left_padded] * 3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="padded rows only"):
        logprob_inputs(*batch, packing=True, width_multiple=multiple)


def _sdpa_without_safe_softmax(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention with a plain softmax: NaN for a query that may attend no key, as the SDPA that
    inductor compiles on CUDA gave (torch's own CPU kernel returns zeros there instead)."""
    if enable_gqa:
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    scores = query @ key.transpose(-1, -2) * (scale or query.shape[-1] ** -0.5)
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def test_left_padding_never_leaves_a_query_without_keys(tmp_path, monkeypatch):
    """A left-padding query attends itself: with an attention kernel that gives NaN for a query with no key, the
    padded rows' log-probs, loss and gradients are still finite and equal torch's own kernel's."""
    model = _tiny(tmp_path, "llama")
    batch = _batch(seed=3)
    assert not batch[1].all()  # some prompt is padded on the left
    expected = _loss_and_grads(model, batch)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _sdpa_without_safe_softmax)
    lp, ent, loss, grads = _loss_and_grads(model, batch)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(lp, expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, expected[2], atol=1e-5, rtol=0)
    _close_grads(expected[3], grads)


def _grouped_batch(seed=0, groups=3, group_size=3, vocab=90):
    """``groups`` prompts of uneven lengths, each repeated for ``group_size`` completions of uneven lengths (one
    of them empty), laid out as the trainer does: a group's rows next to each other."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask, completion_ids, completion_mask = _batch(seed, rows=groups * group_size, vocab=vocab)
    for start in range(0, groups * group_size, group_size):  # the group's rows share its first row's prompt
        prompt_ids[start : start + group_size] = prompt_ids[start]
        prompt_mask[start : start + group_size] = prompt_mask[start]
    empty = int(torch.randint(0, len(completion_ids), (1,), generator=g))
    completion_mask[empty] = 0
    return prompt_ids, prompt_mask, completion_ids * completion_mask, completion_mask


@pytest.mark.parametrize(("arch", "attention"), [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("deepseek_v3", "sdpa")])
def test_shared_prompt_equals_padded(tmp_path, arch, attention):
    """train.shared_prompt: one row per group (prompt once, each completion attending to it and itself) gives the
    padded rows' log-probs, loss and gradients, also when a micro-batch cuts a group."""
    model = _tiny(tmp_path, arch)
    model.config._attn_implementation = attention
    batch = _grouped_batch()
    inputs = logprob_inputs(*batch, shared_prompt=True)
    assert inputs.input_ids.shape[0] == 3  # three groups, three rows
    assert int((inputs.input_ids != 0).sum()) < int(batch[1].sum() + batch[3].sum())  # each prompt stored once
    _assert_matches_padded(model, batch, shared_prompt=True)

    cut = tuple(t[2:7] for t in batch)  # the end of one group, a whole group, the start of another
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(model, *cut, shared_prompt=True)[0], completion_logprobs(model, *cut)[0], atol=1e-5, rtol=0)


def test_shared_prompt_refuses_what_it_cannot_do(tmp_path):
    model = _tiny(tmp_path, "llama")
    batch = _grouped_batch()
    with pytest.raises(ValueError, match="choose one"):
        logprob_inputs(*batch, packing=True, shared_prompt=True)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        completion_logprobs(model, *batch, shared_prompt=True)


@pytest.mark.parametrize("autocast,compiled", [(False, False), (True, False), (False, True)])
def test_closed_form_head_gradient_matches_autograd(autocast, compiled, monkeypatch):
    """The head's hand-written backward (bias included) against autograd through log_softmax, gather and the
    entropy, in float32 and under CPU bf16 autocast (where both multiply in bf16: the tolerance is bf16's); and
    its math compiled (train.compile), over chunks of two lengths (16, 16, 8 tokens: one dynamic-shape graph).
    The CPU compiles with "aot_eager" (dynamo capture and AOT autograd, no code generation)."""
    head_math = lp_module.compiled_head_math(backend="aot_eager") if compiled else lp_module.EAGER_HEAD
    if compiled:
        monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 50 * 16)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    w_tok, w_ent = torch.randn(40, generator=g), torch.randn(40, generator=g)

    def grads(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, ent = fn()
        ((lp * w_tok).sum() + (ent * w_ent).sum()).backward()
        return lp.detach(), ent.detach(), [t.grad.clone() for t in (hidden, weight, bias)]

    def reference():
        logprobs = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float() / 0.7, dim=-1)
        return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)

    ours = grads(lambda: lp_module._head_logprobs(hidden, weight, bias, targets, 0.7, entropy_grad=True, head_math=head_math))
    theirs = grads(reference)
    tol = 2e-2 if autocast else 1e-5
    for a, b in zip([*ours[:2], *ours[2]], [*theirs[:2], *theirs[2]], strict=True):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < tol


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kept", [True, False])
def test_head_gradient_from_kept_probabilities(autocast, kept, monkeypatch):
    """With no entropy gradient, a CPU head keeps each chunk's probabilities for its backward (within
    KEPT_PROBS_BYTES) instead of multiplying by the head again: the same gradients as autograd through log_softmax
    and gather, kept (a 40-token, 50-word batch in chunks of 16) or recomputed (a budget of 0 bytes)."""
    monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 50 * 16)
    if not kept:
        monkeypatch.setattr(lp_module, "KEPT_PROBS_BYTES", 0)
    from_kept = []
    real = lp_module._kept_probs_logit_grad
    monkeypatch.setattr(lp_module, "_kept_probs_logit_grad", lambda *a: from_kept.append(1) or real(*a))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (40,), generator=g)
    w_tok = torch.randn(40, generator=g)

    def grads(fn):
        for t in (hidden, weight, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp = fn()
        (lp * w_tok).sum().backward()
        return [lp.detach()] + [t.grad.clone() for t in (hidden, weight, bias)]

    def reference():
        logprobs = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias).float() / 0.7, dim=-1)
        return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    ours = grads(lambda: lp_module._head_logprobs(hidden, weight, bias, targets, 0.7, entropy_grad=False)[0])
    assert len(from_kept) == (3 if kept else 0)
    theirs = grads(reference)
    tol = 2e-2 if autocast else 1e-5
    for a, b in zip(ours, theirs, strict=True):
        assert ((a - b).abs().max() / b.abs().max().clamp(min=1e-6)) < tol


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kept_probabilities_give_a_confident_target_its_gradient(temperature):
    """A target of probability ~0.9997, whose bf16 probability is 1: its logit's gradient g (1 - p) / T still
    matches float32 autograd (from bf16 probabilities alone it would be 0)."""
    vocab, tokens = 50, 8
    hidden = torch.eye(tokens, 16)
    weight = torch.zeros(vocab, 16)
    bias = torch.zeros(vocab)
    bias[0] = 12.0 if temperature == 1.0 else 8.5  # exact in bf16: 1 - p is about 3e-4 either way
    bias.requires_grad_(True)
    targets = torch.zeros(tokens, dtype=torch.long)
    w_tok = torch.linspace(0.5, 1.5, tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = lp_module._head_logprobs(hidden, weight, bias, targets, temperature, entropy_grad=False)[0]
    (lp * w_tok).sum().backward()
    ours = bias.grad.clone()
    bias.grad = None
    exact = torch.log_softmax((hidden @ weight.T + bias) / temperature, dim=-1)[:, 0]
    (exact * w_tok).sum().backward()
    assert bias.grad[0] > 0
    assert abs(ours[0] / bias.grad[0] - 1) < 2e-2
    torch.testing.assert_close(ours[1:], bias.grad[1:], rtol=2e-2, atol=1e-7)


def test_shared_prompt_rows_use_the_short_attention_with_sdpa(tmp_path, monkeypatch):
    """With sdpa, shared-prompt rows go through ``shared_prompt_attention`` (the prompt, then each completion
    against the prompt and itself) rather than a full row-by-row masked attention, and the model's own attention
    setting is left as it was."""
    from transformers import AttentionInterface

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("shared_layout") is not None)
        return lp_module.shared_prompt_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, lp_module.SHARED_PROMPT_ATTENTION, spy)
    model = _tiny(tmp_path, "llama")
    completion_logprobs(model, *_grouped_batch(), shared_prompt=True)
    assert seen == [True, True]  # both layers
    assert model.config._attn_implementation == "sdpa"


def test_shared_prompt_under_bf16_autocast(tmp_path):
    """The trainer's CPU/GPU precision: bf16 autocast through the shared-prompt attention, within bf16 error."""
    model = _tiny(tmp_path, "llama")
    batch = _grouped_batch()
    mask = batch[3].bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared, _ = completion_logprobs(model, *batch, shared_prompt=True)
        padded, _ = completion_logprobs(model, *batch)
    assert (shared[mask] - padded[mask]).abs().max() < 5e-2


def test_compiled_head_without_entropy_gradient(monkeypatch):
    """The default training path (no entropy bonus: the entropy takes no gradient) with the head's math compiled,
    over chunks of two lengths, against autograd."""
    monkeypatch.setattr(lp_module, "CHUNK_BYTES", 4 * 50 * 16)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(40, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    targets, w_tok = torch.randint(0, 50, (40,), generator=g), torch.randn(40, generator=g)
    head_math = lp_module.compiled_head_math(backend="aot_eager")
    lp, _ = lp_module._head_logprobs(hidden, weight, None, targets, 1.0, entropy_grad=False, head_math=head_math)
    (lp * w_tok).sum().backward()
    ours = [lp.detach(), hidden.grad.clone(), weight.grad.clone()]
    hidden.grad = weight.grad = None
    expected = torch.log_softmax(hidden @ weight.t(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (expected * w_tok).sum().backward()
    for a, b in zip(ours, [expected.detach(), hidden.grad, weight.grad], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_cpu_autocast_rotates_in_bf16(tmp_path, monkeypatch, shared_prompt):
    """Under CPU bf16 autocast the rotary tables are bf16 for the lean pass, so the rotation gives bf16 queries
    and keys (float32 tables would promote them to float32); the log-probs stay within bf16 error of the float32
    ones, and the model's rotary embedding is left without hooks."""
    from transformers.models.llama import modeling_llama

    model = _tiny(tmp_path, "llama")
    batch = _grouped_batch()
    mask = batch[3].bool()
    seen, rotate = [], modeling_llama.apply_rotary_pos_emb

    def spy(*args, **kwargs):
        q, k = rotate(*args, **kwargs)
        seen.append((q.dtype, k.dtype))
        return q, k

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", spy)
    with torch.no_grad():
        exact, _ = completion_logprobs(model, *batch, shared_prompt=shared_prompt)
        assert seen and set(seen) == {(torch.float32, torch.float32)}
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded, _ = completion_logprobs(model, *batch, shared_prompt=shared_prompt)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert 0 < (rounded[mask] - exact[mask]).abs().max() < 5e-2
    assert not model.model.rotary_emb._forward_hooks
