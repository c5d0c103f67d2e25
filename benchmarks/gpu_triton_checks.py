"""The fast engine's Triton kernels against its PyTorch path and the reference engine.

Run with pytest on a GPU machine (`pytest benchmarks/gpu_triton_checks.py`), or on the CPU under Triton's interpreter (TRITON_INTERPRET=1, which
must be set before Python starts). Not part of the test suite: CI has no Triton and no GPU.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # conftest's tiny models and tokenizer
from conftest import build_char_tokenizer, tiny_config  # noqa: E402

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs a GPU here, or TRITON_INTERPRET=1", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter takes a loaded scalar's index with int() of a 1-element array, which NumPy 2 refuses:
    # a loop bound read on the device failed
    from triton.runtime import interpreter

    def _patch_lang_tensor(tensor, scope, _patch=interpreter._patch_lang_tensor):
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = _patch_lang_tensor

from rlreason.models import load_model, load_tokenizer  # noqa: E402
from rlreason.rollout import sampling  # noqa: E402
from rlreason.rollout import triton_decode as K  # noqa: E402
from rlreason.rollout.engine import HFEngine, SamplingParams  # noqa: E402
from rlreason.rollout.fast import FastEngine  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def on_device():
    """The kernel tests build their tensors where the kernels run."""
    with torch.device(DEVICE):
        yield


def _inv_rms(x, eps):
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("with_bias", [False, True])
def test_rms_norm_and_silu_mul(with_bias):
    x, w = torch.randn(5, 96), torch.randn(96)
    torch.testing.assert_close(K.rms_norm(x, w, 1e-5), w * x * _inv_rms(x, 1e-5), atol=1e-5, rtol=1e-5)
    gu, bias = torch.randn(5, 2 * 70) * 4, torch.randn(2 * 70) if with_bias else None
    scaled = gu * _inv_rms(x, 1e-5) + (bias if with_bias else 0)
    expected = torch.nn.functional.silu(scaled[:, :70]) * scaled[:, 70:]
    torch.testing.assert_close(K.silu_mul(gu, x, bias, 1e-5), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("qk_norm,with_bias", [(False, False), (True, False), (False, True)])
def test_rope_cache_and_attention_against_plain_math(qk_norm, with_bias):
    torch.manual_seed(0)
    Pp, G, H, Hkv, D, Wp, Wc, t = 2, 3, 4, 2, 16, 7, 9, 5
    R = Pp * G
    qkv = torch.randn(R, (H + 2 * Hkv) * D)
    pos0 = torch.tensor([3, 3, 3, 6, 6, 6])
    angles = torch.arange(40).float()[:, None] * torch.rand(D // 2)[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    signed_sin = torch.cat([-sin[:, : D // 2], sin[:, D // 2 :]], -1)
    kc, vc = torch.randn(Pp, Hkv, G, Wc, D), torch.randn(Pp, Hkv, G, Wc, D)
    qn, kn = (torch.rand(D) + 0.5, torch.rand(D) + 0.5) if qk_norm else (None, None)
    tt = torch.tensor(t)
    x = torch.randn(R, 40) * 3  # the residual stream: qkv is scaled by its 1/rms
    bias = torch.randn((H + 2 * Hkv) * D) if with_bias else None
    q = K.rope_and_cache(qkv, x, bias, cos, signed_sin, pos0, tt, kc, vc, qn, kn, 1e-6, H, Hkv, D, G)
    qkv = qkv * _inv_rms(x, 1e-6) + (bias if with_bias else 0)

    def rope(x, pos):
        rot = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], -1)
        return x * cos[pos][:, None] + rot * sin[pos][:, None]

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w if w is not None else x

    pos = pos0 + t - 1
    q_ref = rope(norm(qkv[:, : H * D].view(R, H, D), qn), pos) * D**-0.5
    k_ref = rope(norm(qkv[:, H * D : (H + Hkv) * D].view(R, Hkv, D), kn), pos)
    v_ref = qkv[:, (H + Hkv) * D :].view(R, Hkv, D)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc[:, :, :, t - 1].permute(0, 2, 1, 3).reshape(R, Hkv, D), k_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vc[:, :, :, t - 1].permute(0, 2, 1, 3).reshape(R, Hkv, D), v_ref, atol=1e-5, rtol=1e-5)

    kp, vp = torch.randn(Pp, Hkv, Wp, D), torch.randn(Pp, Hkv, Wp, D)
    bias = torch.zeros(Pp, Wp)
    bias[0, :2] = float("-inf")  # left padding of the first prompt
    out = K.decode_attention(q, kp, vp, bias, kc, vc, tt, G)
    for r in range(R):
        p, g = divmod(r, G)
        keys = torch.cat([kp[p], kc[p, :, g, :t]], dim=1).repeat_interleave(H // Hkv, 0)  # [H, Wp + t, D]
        values = torch.cat([vp[p], vc[p, :, g, :t]], dim=1).repeat_interleave(H // Hkv, 0)
        scores = (q[r].unsqueeze(1) @ keys.transpose(1, 2)).squeeze(1) + torch.cat([bias[p], torch.zeros(t)])
        expected = (scores.softmax(-1).unsqueeze(1) @ values).squeeze(1).reshape(H * D)
        torch.testing.assert_close(out[r], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("on_device")
@pytest.mark.parametrize("dtype,temperature,banned", [(torch.float32, 1.0, False), (torch.bfloat16, 0.7, True)])
def test_sample_and_record_is_the_seeded_draw(dtype, temperature, banned):
    torch.manual_seed(0)
    R, V, width, eos = 6, 3000, 9, torch.tensor([2, 7])  # V is not a multiple of the block: a short last block
    logits = (torch.randn(R, V) * 3).to(dtype)
    logits[0, 2] = 40.0  # row 0 would end at once if EOS were allowed
    seeds, t = torch.arange(100, 100 + R), torch.tensor(4)
    row_ids = torch.tensor([5, 0, 1, 2, 3, 6])  # after a compaction: slot r writes output row row_ids[r]
    out_tokens, out_logprobs = torch.zeros(R + 1, width, dtype=torch.long), torch.zeros(R + 1, width)
    tokens, done = torch.zeros(R, dtype=torch.long), torch.tensor([False, False, True, False, False, False])
    min_new = 10 if banned else 0
    K.sample_and_record(logits, temperature, min_new, eos, seeds, t, row_ids, out_tokens, out_logprobs, tokens, done)

    plain = logits.float()
    expected_lp = torch.log_softmax(plain / temperature, dim=-1)
    held = plain.clone()
    if banned:
        held[:, eos] = float("-inf")
    expected = sampling.sample(held, seeds, t, temperature)
    assert tokens.tolist() == expected.tolist()
    assert out_tokens[row_ids, t].tolist() == expected.tolist()
    torch.testing.assert_close(out_logprobs[row_ids, t], expected_lp.gather(1, expected[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    assert done.tolist() == [tok in eos.tolist() or r == 2 for r, tok in enumerate(expected.tolist())]
    assert (expected[0] == 2) != banned  # the ban is what kept row 0 going


@pytest.mark.parametrize("system", ["", "You are terse. Answer: "])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_triton_engine_draws_the_reference_tokens(tmp_path, arch, system):
    """Also after a common system text, which the engine prefills once for all prompts."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer(tmp_path)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(tmp_path)
    model, tokenizer = load_model(str(tmp_path)).to(DEVICE), load_tokenizer(str(tmp_path))
    prompts = [tokenizer(system + t, add_special_tokens=False)["input_ids"] for t in ["What is 2 + 3?", "hi"]]
    params, seeds = SamplingParams(max_new_tokens=12), list(range(8))
    fast = FastEngine(model, tokenizer, kernels="triton", check_every=4).generate(prompts, 4, params, seeds=seeds)
    hf = HFEngine(model, tokenizer).generate(prompts, 4, params, seeds=seeds)
    assert fast.completion_ids.tolist() == hf.completion_ids.tolist()
    assert fast.texts == hf.texts


def test_triton_compaction_keeps_every_row(tmp_path):
    from test_fast_rollout import _model, _prompts

    model, tokenizer = _model(tmp_path, "llama")
    model = model.to(DEVICE)
    prompts, seeds, params = _prompts(tokenizer), list(range(200, 224)), SamplingParams(max_new_tokens=30)
    compacted = FastEngine(model, tokenizer, kernels="triton", check_every=2).generate(prompts, 8, params, seeds=seeds)
    plain = FastEngine(model, tokenizer, kernels="torch", check_every=2, compact=False).generate(prompts, 8, params, seeds=seeds)
    assert compacted.completion_ids.tolist() == plain.completion_ids.tolist()
    lengths = plain.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max()
    torch.testing.assert_close(compacted.logprobs, plain.logprobs, atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU code (train.compile)")
def test_compiled_head_math_with_inductor():
    """train.compile's head math as inductor generates it for the GPU, against the eager functions (the CPU suite
    checks the compiled graphs without code generation)."""
    from rlreason.training import logprobs

    torch.manual_seed(0)
    compiled = logprobs.compiled_head_math()
    for rows in (341, 77):  # two lengths: one dynamic-shape graph
        logits = torch.randn(rows, 49152, device="cuda", dtype=torch.bfloat16) * 4
        targets = torch.randint(0, 49152, (rows,), device="cuda")
        grad_token, grad_entropy = torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")
        expected, got = logprobs.EAGER_HEAD.stats(logits, targets, 0.7), compiled.stats(logits, targets, 0.7)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        for g_ent in (None, grad_entropy):
            a = compiled.logit_grad(logits, targets, expected[1], grad_token, g_ent, 0.7)
            b = logprobs.EAGER_HEAD.logit_grad(logits, targets, expected[1], grad_token, g_ent, 0.7)
            torch.testing.assert_close(a.float(), b.float(), atol=1e-3, rtol=1e-2)
