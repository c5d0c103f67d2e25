"""The fast engine against the reference (HFEngine): same tokens, and logprobs equal to a fresh forward pass.

Tolerances (float32 on the CPU): recorded logprobs within 1e-4 of ``completion_logprobs`` (the two compute the
same function in a different order; seen ~1e-6).
"""

import pytest
import torch
from conftest import build_char_tokenizer, tiny_config

from rlreason import onednn
from rlreason.models import load_model, load_tokenizer
from rlreason.rollout.engine import HFEngine, SamplingParams
from rlreason.rollout.fast import FastEngine, shared_prefix, unsupported_reason
from rlreason.rollout.fast_weights import EngineWeights
from rlreason.training.logprobs import completion_logprobs

LOGPROB_ATOL = 1e-4


def _model(directory, arch, seed=0):
    from transformers import AutoModelForCausalLM

    tokenizer = build_char_tokenizer(directory)
    torch.manual_seed(seed)
    if arch == "qwen3":
        from transformers import Qwen3Config

        config = Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        )
    else:
        config = tiny_config(arch, len(tokenizer), tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger weights than the init: peaked distributions, some EOS, and no near-ties
        for name, p in model.named_parameters():
            p.mul_(6.0 if p.dim() > 1 else 1.0)
            if name.endswith("norm.weight"):  # not all ones: folding them into the projections must matter
                p.mul_(torch.rand_like(p) + 0.5)
    model.save_pretrained(directory)
    return load_model(str(directory)), load_tokenizer(str(directory))


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def model_and_tokenizer(request, tmp_path_factory):
    """Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms)."""
    return _model(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _model(tmp_path_factory.mktemp("llama"), "llama")


def _prompts(tokenizer):
    texts = ["What is 2 + 3?", "hi", "A longer prompt, with more tokens in it."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _system_prompts(tokenizer):
    """The same prompts after a common system text, which the engine prefills once for all of them."""
    system = tokenizer("You are terse. Answer: ", add_special_tokens=False)["input_ids"]
    return [system + p for p in _prompts(tokenizer)]


def _same(a, b):
    assert a.completion_ids.tolist() == b.completion_ids.tolist()
    assert a.completion_mask.tolist() == b.completion_mask.tolist()
    assert a.truncated.tolist() == b.truncated.tolist()
    assert a.texts == b.texts
    assert a.prompt_ids.tolist() == b.prompt_ids.tolist() and a.prompt_mask.tolist() == b.prompt_mask.tolist()


def test_greedy_equals_reference(model_and_tokenizer):
    """Also with the engine's own fused copies of q/k/v and gate/up (its CUDA layout), and with the norms folded
    into them (the layout of its Triton step, which the prefill shares)."""
    model, tokenizer = model_and_tokenizer
    params = SamplingParams(max_new_tokens=16, greedy=True)
    reference = HFEngine(model, tokenizer).generate(_prompts(tokenizer), 2, params)
    for own_weights in (False, True):
        _same(FastEngine(model, tokenizer, own_weights=own_weights).generate(_prompts(tokenizer), 2, params), reference)
    folded = FastEngine(model, tokenizer)
    folded.weights = EngineWeights(model, folded.dtype, own=True, fold_norms=True)
    assert all(layer["ln1"] is None and layer["ln2"] is None for layer in folded.weights.layers)
    _same(folded.generate(_prompts(tokenizer), 2, params), reference)


def test_a_cpu_without_bf16_packs_multiplies_plain_weights(llama, monkeypatch):
    """oneDNN packs bf16 only on some CPUs (AVX-512 or AVX-NE-CONVERT) and raises elsewhere: the engine then
    multiplies plain weights instead of failing at its first generate."""
    model, tokenizer = llama

    def no_bf16(weight, rows):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    onednn._cpu_packs.cache_clear()
    monkeypatch.setattr(onednn, "pack", no_bf16)
    try:
        assert not onednn.packs(torch.device("cpu"), torch.bfloat16)
        engine = FastEngine(model, tokenizer, dtype=torch.bfloat16)
        out = engine.generate(_prompts(tokenizer), 2, SamplingParams(max_new_tokens=6), seeds=list(range(6)))
        assert not engine.weights._packed and out.completion_ids.shape[0] == 6
    finally:
        onednn._cpu_packs.cache_clear()


def test_bf16_on_a_float32_model_computes_from_its_own_copies(llama):
    """Computing in bf16 on a float32 model (the CPU's bf16 path) keeps bf16 copies, cast once a call rather than
    at every matrix product: the same tokens as casting the model's own weights each time. Attention reads a float32
    cache there."""
    model, tokenizer = llama
    params = SamplingParams(max_new_tokens=16, greedy=True)
    engine = FastEngine(model, tokenizer, dtype=torch.bfloat16)
    assert engine.weights.own and engine.weights.layers[0]["o"][0].dtype == torch.bfloat16
    per_matmul = FastEngine(model, tokenizer, dtype=torch.bfloat16, own_weights=False)
    assert not per_matmul.weights.own
    _same(engine.generate(_prompts(tokenizer), 2, params), per_matmul.generate(_prompts(tokenizer), 2, params))
    assert all(getattr(engine._ws, name).dtype == torch.float32 for name in ("kp", "vp", "kc", "vc"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_products_read_weights_packed_at_every_call(llama, dtype):
    """On the CPU every projection is multiplied from a oneDNN-packed copy, packed again at each generate: the tokens
    and log-probs of plain products, also after the model's weights change between calls (stale packs would not).
    On a CPU that cannot pack bf16 both engines multiply plain weights."""
    model, tokenizer = llama
    packs = onednn.packs(torch.device("cpu"), dtype)
    assert packs or dtype == torch.bfloat16  # only bf16 packing depends on the CPU's instructions
    packed = FastEngine(model, tokenizer, dtype=dtype)
    plain = FastEngine(model, tokenizer, dtype=dtype)
    plain.weights = EngineWeights(model, dtype, own=packed.weights.own, pack=False)
    # each layer's qkv, o, gate_up and down in the engine's own copies (else q, k, v, o, gate, up, down), and the head
    projections = ((4 if packed.weights.own else 7) * len(model.model.layers) + 1) if packs else 0
    params, seeds = SamplingParams(max_new_tokens=12, temperature=0.9), list(range(6))
    original = [p.detach().clone() for p in model.parameters()]
    try:
        for _ in range(2):
            ours, theirs = (e.generate(_prompts(tokenizer), 2, params, seeds=seeds) for e in (packed, plain))
            assert len(packed.weights._packed) == projections and not plain.weights._packed
            _same(ours, theirs)
            torch.testing.assert_close(ours.logprobs, theirs.logprobs, atol=1e-5, rtol=0)  # float32: another summation order
            with torch.no_grad():  # an optimizer step's worth of change
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        assert ours.texts != FastEngine(model, tokenizer, dtype=dtype).generate(_prompts(tokenizer), 2, params, seeds=seeds).texts
    finally:
        with torch.no_grad():
            for p, before in zip(model.parameters(), original, strict=True):
                p.copy_(before)


@pytest.mark.parametrize("filters", [{}, {"top_k": 5, "top_p": 0.9, "temperature": 0.7}])
def test_seeded_sampling_equals_reference(llama, filters):
    """With the same completion seeds, both engines draw the same tokens (rlreason.rollout.sampling)."""
    model, tokenizer = llama
    params = SamplingParams(max_new_tokens=16, **filters)
    seeds = list(range(100, 112))
    fast = FastEngine(model, tokenizer, check_every=4).generate(_prompts(tokenizer), 4, params, seeds=seeds)
    hf = HFEngine(model, tokenizer).generate(_prompts(tokenizer), 4, params, seeds=seeds)
    _same(fast, hf)
    assert len(set(fast.texts)) > 3


def test_logprobs_match_a_fresh_forward_pass(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    params = SamplingParams(max_new_tokens=20, temperature=0.8)
    rollout = FastEngine(model, tokenizer).generate(_prompts(tokenizer), 3, params, seeds=list(range(9)))
    with torch.no_grad():
        fresh, _ = completion_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature=0.8
        )
    mask = rollout.completion_mask.bool()
    assert rollout.logprobs.shape == rollout.completion_ids.shape
    assert (rollout.logprobs[~mask] == 0).all()
    torch.testing.assert_close(rollout.logprobs[mask], fresh[mask], atol=LOGPROB_ATOL, rtol=0)


def test_shared_prefix_leaves_every_prompt_its_last_token():
    assert shared_prefix([[1, 2, 3]]) == 0
    assert shared_prefix([[1, 2, 3], [1, 2, 4]]) == 2
    assert shared_prefix([[1, 2], [1, 2, 5, 6]]) == 1  # the shorter prompt keeps its last token
    assert shared_prefix([[7, 2], [1, 2]]) == 0


def test_a_common_prefix_computed_once_gives_the_reference_tokens_and_logprobs(model_and_tokenizer):
    """Greedy tokens equal HFEngine's, which runs every prompt whole; seeded samples equal it too; logprobs match a
    fresh forward pass. The prompts have different lengths, so the suffixes are left-padded after the prefix."""
    model, tokenizer = model_and_tokenizer
    prompts = _system_prompts(tokenizer)
    assert shared_prefix(prompts) >= 10
    greedy = SamplingParams(max_new_tokens=16, greedy=True)
    _same(FastEngine(model, tokenizer).generate(prompts, 2, greedy), HFEngine(model, tokenizer).generate(prompts, 2, greedy))
    params, seeds = SamplingParams(max_new_tokens=20, temperature=0.8), list(range(9))
    rollout = FastEngine(model, tokenizer, check_every=2).generate(prompts, 3, params, seeds=seeds)
    _same(rollout, HFEngine(model, tokenizer).generate(prompts, 3, params, seeds=seeds))
    with torch.no_grad():
        fresh, _ = completion_logprobs(
            model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask, temperature=0.8
        )
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(rollout.logprobs[mask], fresh[mask], atol=LOGPROB_ATOL, rtol=0)


def test_min_new_tokens_and_compaction(llama):
    """EOS is held back until min_new_tokens; rows that end are compacted away without changing anyone's tokens."""
    model, tokenizer = llama
    prompts, seeds = _prompts(tokenizer), list(range(200, 224))
    forced = FastEngine(model, tokenizer).generate(prompts, 8, SamplingParams(max_new_tokens=8, min_new_tokens=8), seeds=seeds)
    assert (forced.completion_mask.sum(dim=1) == 8).all()
    params = SamplingParams(max_new_tokens=30)
    compacted = FastEngine(model, tokenizer, check_every=2, compact=True).generate(prompts, 8, params, seeds=seeds)
    plain = FastEngine(model, tokenizer, check_every=2, compact=False).generate(prompts, 8, params, seeds=seeds)
    _same(compacted, plain)
    torch.testing.assert_close(compacted.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    lengths = plain.completion_mask.sum(dim=1)
    assert lengths.min() < lengths.max()  # some rows ended early, so compaction had something to do


def test_unsupported_architectures_are_named(tmp_path):
    model, _ = _model(tmp_path, "deepseek_v3")
    assert "deepseek_v3" in unsupported_reason(model)
    with pytest.raises(ValueError, match="rollout.engine 'hf'"):
        FastEngine(model, load_tokenizer(str(tmp_path)))


def test_a_training_step_with_the_fast_engine_packing_and_rollout_logprobs(tiny_llama, tmp_path):
    from conftest import write_config

    from rlreason.config import load_config
    from rlreason.rollout.fast import FastEngine as Fast
    from rlreason.training.trainer import Trainer

    path = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run",
        rollout={"engine": "fast"},
        train={"packing": True, "rollout_logprobs": True, "num_iterations": 2, "steps": 1},
        rewards=[{"name": "conftest:char_codes"}],  # no flat group: every completion runs through the update
    )
    trainer = Trainer(load_config(path))
    assert isinstance(trainer.engine, Fast)
    metrics = trainer.train_step()
    assert metrics["loss"] == metrics["loss"] and metrics["ratio"] == pytest.approx(1.0, abs=0.05)


def test_compaction_moves_live_rows_to_a_smaller_shape():
    """Live rows keep their state and prompt cache in order; padding slots are finished and write to the scratch row."""
    from rlreason.rollout.fast_workspace import ModelDims, StepShape, Workspace

    dims = ModelDims(num_heads=2, num_kv_heads=1, head_dim=4, num_layers=1, eps=1e-6)
    rope = (torch.zeros(8, 4), torch.zeros(8, 4))
    ws = Workspace.allocate((2, 4, 3, 2), dims, torch.float32, rope, pool=None)
    ws.tokens.copy_(torch.arange(10, 18))
    ws.row_ids.copy_(torch.arange(8))
    ws.kp[0, :, 0, 0, 0] = torch.tensor([1.0, 2.0])
    ws.kc[0, :, 0, :, 0, 0] = torch.arange(8.0).view(2, 4)
    shape = StepShape(compacted=False, rows=8, prompts=2, group=4, width=1)
    compacted = ws.compact(torch.tensor([1, 5, 6]), shape)
    assert compacted == StepShape(compacted=True, rows=4, prompts=4, group=1, width=1)
    assert ws.tokens[:3].tolist() == [11, 15, 16] and ws.row_ids[:4].tolist() == [1, 5, 6, 8]
    assert ws.done[:4].tolist() == [False, False, False, True]
    assert ws.rows_cache["kp"][0, :3, 0, 0, 0].tolist() == [1.0, 2.0, 2.0]
    assert ws.rows_cache["kc"][0, :3, 0, 0, 0, 0].tolist() == [1.0, 5.0, 6.0]
    assert ws.compact(torch.tensor([0, 1, 2]), compacted) is compacted  # no smaller size than four rows
