"""CPU training products through weights packed once per block (rlreason.training.packed_products): the same
log-probs, losses and gradients as plain products, packs made afresh in every block, the model's layers given back."""

import pytest
import torch
from conftest import build_char_tokenizer, tiny_config
from test_logprobs import _batch
from transformers import AutoModelForCausalLM

import rlreason.training.packed_products as pp
from rlreason import onednn
from rlreason.training.logprobs import completion_logprobs
from rlreason.training.packed_products import packed_products


def _tiny(tmp_path, arch):
    tokenizer = build_char_tokenizer(tmp_path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id))


def _loss_and_grads(model, batch, bf16):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        lp, ent = completion_logprobs(model, *batch, temperature=0.7, shared_prompt=False)
    mask = batch[3].float()
    loss = -(lp * torch.linspace(-1, 1, mask.shape[0]).unsqueeze(1) * mask).sum() / mask.sum()
    loss.backward()
    return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_close(ours, theirs, tol):
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=0)
    assert ours[2].keys() == theirs[2].keys()
    for name, grad in theirs[2].items():
        assert ((ours[2][name] - grad).abs().max() / grad.abs().max().clamp(min=1e-8)) < tol, name


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied head, and q/k/v biases with an untied head
@pytest.mark.parametrize("bf16", [False, True])
def test_products_through_packs_equal_plain_products(tmp_path, arch, bf16):
    """Every linear layer's weight and the head's are packed once (in the autocast dtype under bf16), and log-probs,
    entropies and every parameter's gradient equal plain products' (float32: another summation order; bf16: both
    multiply in bf16, the tolerance is bf16's). On a CPU that cannot pack bf16 nothing is packed."""
    model = _tiny(tmp_path, arch)
    batch = _batch()
    plain = _loss_and_grads(model, batch, bf16)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    with packed_products(model):
        packed = _loss_and_grads(model, batch, bf16)
        dtype = torch.bfloat16 if bf16 else torch.float32
        packs = onednn.packs(torch.device("cpu"), dtype)
        assert packs or bf16  # only bf16 packing depends on the CPU's instructions
        assert set(pp._open) == ({(w, dtype) for w in weights} if packs else set())
    _assert_close(packed, plain, 2e-2 if bf16 else 1e-5)


def test_each_block_packs_the_weights_as_they_are_then(tmp_path):
    """Packs last one block: after an update, the next block multiplies by the new weights (stale packs would not),
    and outside any block the layers are plain again, also after a block that raised."""
    model = _tiny(tmp_path, "llama")
    batch = _batch()
    with packed_products(model):
        _loss_and_grads(model, batch, False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = _loss_and_grads(model, batch, False)
    with packed_products(model):
        packed = _loss_and_grads(model, batch, False)
    _assert_close(packed, plain, 1e-5)
    with pytest.raises(RuntimeError, match="inside"), packed_products(model):
        raise RuntimeError("inside")
    assert pp._open is None
    assert not any("forward" in vars(m) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_no_packs_when_disabled_or_nested(tmp_path):
    model = _tiny(tmp_path, "llama")
    with packed_products(model, enabled=False):
        assert pp._open is None
    with packed_products(model):
        outer = pp._open
        with packed_products(model):
            assert pp._open is outer
        assert pp._open is outer
