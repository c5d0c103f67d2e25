"""Model loading: the default GGUF model is de-quantized once, cached as safetensors, then loaded from the cache."""

import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

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


class SlowFake:
    """Stands in for the de-quantized model and tokenizer: slow to save, so two conversions overlap."""

    config = SimpleNamespace()

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "weights.bin").write_bytes(b"0" * 1000)
        time.sleep(0.5)
        (Path(directory) / "config.json").write_text("{}")


def _fill_cache(gguf_file, cache, barrier, out):
    barrier.wait()
    out.put(str(models.cached_gguf(gguf_file, str(cache))))


def _convert_in_processes(tmp_path, monkeypatch, count):
    """``count`` forked processes fill one cache at once, with the real lock and rename around a fake conversion."""
    conversions = tmp_path / "conversions"

    def from_config(config):
        with open(conversions, "a") as f:
            f.write("converted\n")
        return SlowFake()

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: SlowFake())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: SlowFake())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_config", from_config)
    gguf_file = tmp_path / "tiny.gguf"
    gguf_file.write_bytes(b"GGUF")
    context = multiprocessing.get_context("fork")
    barrier, out = context.Barrier(count), context.Queue()
    procs = [context.Process(target=_fill_cache, args=(gguf_file, tmp_path / "cache", barrier, out)) for _ in range(count)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    paths = [out.get_nowait() for proc in procs if proc.exitcode == 0]
    return [proc.exitcode for proc in procs], paths, conversions.read_text().count("converted")


def test_two_processes_filling_the_cache_at_once_both_get_it(tmp_path, monkeypatch):
    exitcodes, paths, conversions = _convert_in_processes(tmp_path, monkeypatch, 2)
    target = tmp_path / "cache" / "gguf" / "tiny-4"
    assert exitcodes == [0, 0]
    assert paths == [str(target)] * 2
    assert conversions == 1  # the second process read the first one's copy
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny-4", "tiny-4.lock"]


def test_a_killed_conversion_leaves_nothing_behind_after_the_next_fill(tmp_path, monkeypatch):
    stale = tmp_path / "cache" / "gguf" / "tiny-4.partial-999999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    assert _convert_in_processes(tmp_path, monkeypatch, 1)[0] == [0]
    assert sorted(p.name for p in stale.parent.iterdir()) == ["tiny-4", "tiny-4.lock"]
