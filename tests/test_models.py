"""Model loading: the default GGUF model is de-quantized once, cached as safetensors, then loaded from the cache."""

import gguf
import numpy as np
import pytest
import torch
import transformers

from rlreason import models


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("model-cache")
    path = models.resolve("default", str(cache))
    return cache, path


def test_default_model_is_cached_as_safetensors(default_cache):
    cache, path = default_cache
    assert str(path).startswith(str(cache))
    assert (models.Path(path) / "model.safetensors").is_file()
    assert "quantization_config" not in (models.Path(path) / "config.json").read_text()
    assert not list(models.Path(path).parent.glob("*.partial-*"))


def test_cached_weights_equal_the_dequantized_gguf(default_cache):
    cache, _ = default_cache
    reader = gguf.GGUFReader(models.default_gguf_path())
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    model = models.load_model("default", str(cache))
    np.testing.assert_allclose(model.model.embed_tokens.weight.detach().numpy(), expected, rtol=0, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # ties survive


def test_second_load_never_touches_the_gguf(default_cache, monkeypatch):
    cache, path = default_cache

    def refuse(*args, **kwargs):
        if "gguf_file" in kwargs:
            raise AssertionError("de-quantized again instead of reading the cache")
        return original(*args, **kwargs)

    original = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", refuse)
    model = models.load_model("default", str(cache), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    tokenizer = models.load_tokenizer("default", str(cache))
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None
    assert tokenizer.chat_template


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLREASON_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    assert models.cache_root("/elsewhere") == models.Path("/elsewhere")


def test_resolve_names(tiny_llama, tmp_path):
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve(str(tiny_llama)) == str(tiny_llama)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="GGUF file"):
        models.resolve(str(tmp_path / "missing.gguf"))
