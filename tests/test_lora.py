"""LoRA (model.lora): config checks, adapters-only training with the base model as reference, the fast engine's
folded weights, adapter checkpoints that resume exactly, and ``rlreason export``'s merged model."""

import json

import pytest
import torch
from conftest import make_tiny_model, write_config
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlreason.cli import main
from rlreason.config import ConfigError, LoraConfig, load_config
from rlreason.models import apply_lora, load_model, load_tokenizer, merged
from rlreason.observe.runlog import read_jsonl
from rlreason.rollout.engine import HFEngine, SamplingParams
from rlreason.rollout.fast import FastEngine
from rlreason.training.logprobs import completion_logprobs
from rlreason.training.trainer import Trainer

LORA = {"r": 4, "alpha": 8.0, "target_modules": "all-linear"}


def lora_config(tmp_path, model_dir, run_dir, name="c", **sections):
    base = {
        "model": {"lora": LORA}, "rewards": [{"name": "conftest:char_codes"}],
        "train": {"steps": 2, "learning_rate": 1e-2}, "run": {"eval_before": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return write_config(tmp_path / f"{name}.yaml", model_dir, run_dir, **base)


def randomized_lora(model_dir, seed=0):
    """A LoRA model whose B matrices are not zero, so the adapters change what it computes."""
    torch.manual_seed(seed)
    model = apply_lora(load_model(str(model_dir)), LoraConfig(r=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval()


def test_config_errors_name_each_field():
    with pytest.raises(ConfigError) as err:
        load_config(None, [
            "model.lora={r: 0, dropout: 1.0, target_modules: every}", "train.beta=0.1", "train.ref_update_every=2",
        ])
    problems = err.value.problems
    assert problems[:3] == [
        "model.lora.r: must be >= 1, got 0",
        "model.lora.dropout: must be in [0, 1), got 1.0",
        "model.lora.target_modules: a list of module names or 'all-linear', got 'every'",
    ]
    assert problems[3].startswith("train.ref_update_every: not with model.lora")
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.lora={rank: 4}"])
    assert err.value.problems == ["model.lora.rank: unknown key"]
    assert load_config(None, ["model.lora={target_modules: [q_proj, v_proj]}"]).model.lora.target_modules == ["q_proj", "v_proj"]
    assert load_config(None, []).model.lora is None


def test_only_adapters_train_and_the_reference_is_the_base_model(tiny_llama, tmp_path):
    """train.beta > 0 loads no reference copy: its log-probs are those of the untouched base model."""
    config = load_config(lora_config(tmp_path, tiny_llama, tmp_path / "run"), ["train.beta=0.1"])
    trainer = Trainer(config)
    assert trainer.reference is None
    base = load_model(str(tiny_llama))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n for n in moved)
    assert all(not p.requires_grad for n, p in after.items() if "lora_" not in n)

    batch = trainer._sample_groups(1, config.rollout.group_size)
    rollout = batch.rollout
    frozen = trainer._frozen_pass(rollout, lambda: trainer._model_inputs(rollout))
    args = (rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids, rollout.completion_mask)
    with torch.no_grad(), trainer.accelerator.autocast():  # the run's precision
        expected, _ = completion_logprobs(base, *args)
        policy, _ = completion_logprobs(trainer.model, *args)
    mask = rollout.completion_mask.bool()
    torch.testing.assert_close(frozen.ref[mask], expected[mask], atol=1e-5, rtol=0)
    assert not torch.allclose(policy[mask], expected[mask], atol=1e-3)  # the adapters did change the policy


def test_fast_engine_folds_the_adapters(tiny_llama):
    """Same tokens as the hf engine on the peft model and as the fast engine on the merged model; the recorded
    log-probs are the LoRA model's, and a refresh picks up adapters changed after the engine was built."""
    model, tokenizer = randomized_lora(tiny_llama), load_tokenizer(str(tiny_llama))
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["What is 2 + 3?", "hi"]]
    params, seeds = SamplingParams(max_new_tokens=12, temperature=0.8), list(range(6))
    fast_engine = FastEngine(model, tokenizer)
    fast = fast_engine.generate(prompts, 3, params, seeds=seeds)
    hf = HFEngine(model, tokenizer).generate(prompts, 3, params, seeds=seeds)
    assert fast.completion_ids.tolist() == hf.completion_ids.tolist() and fast.texts == hf.texts
    with torch.no_grad():
        fresh, _ = completion_logprobs(
            model, fast.prompt_ids, fast.prompt_mask, fast.completion_ids, fast.completion_mask, temperature=0.8
        )
    mask = fast.completion_mask.bool()
    torch.testing.assert_close(fast.logprobs[mask], fresh[mask], atol=1e-4, rtol=0)
    as_merged = FastEngine(merged(randomized_lora(tiny_llama)), tokenizer).generate(prompts, 3, params, seeds=seeds)
    assert as_merged.completion_ids.tolist() == fast.completion_ids.tolist()
    base = FastEngine(load_model(str(tiny_llama)), tokenizer).generate(prompts, 3, params, seeds=seeds)
    assert base.completion_ids.tolist() != fast.completion_ids.tolist()  # the adapters matter

    negate_b(model)  # as an optimizer step would: the engine refolds at its next generate
    changed = fast_engine.generate(prompts, 3, params, seeds=seeds)
    assert changed.completion_ids.tolist() != fast.completion_ids.tolist()
    negated = randomized_lora(tiny_llama)
    negate_b(negated)
    expected = FastEngine(merged(negated), tokenizer).generate(prompts, 3, params, seeds=seeds)
    assert changed.completion_ids.tolist() == expected.completion_ids.tolist()


def negate_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)


def test_checkpoints_hold_adapters_and_resume_exactly(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    common = {"run": {"save_every": 1, "eval_before": False}, "train": {"steps": 3, "learning_rate": 1e-2, "beta": 0.05}}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", str(lora_config(tmp_path, model_dir, straight, "a", **common))]) == 0
    path = lora_config(tmp_path, model_dir, resumed, "b", **common)
    Trainer(load_config(path, ["train.steps=2"])).train()
    saved = resumed / "checkpoints" / "step-000002" / "model"
    assert (saved / "adapter_model.safetensors").is_file() and (saved / "adapter_config.json").is_file()
    assert not list(saved.glob("model*.safetensors"))  # the base weights are not copied
    assert main(["train", str(path), "--resume"]) == 0

    a, b = read_jsonl(straight / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [m["step"] for m in b] == [1, 2, 3]
    for key in ("reward", "loss", "grad_norm", "kl", "completion_length"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    assert a[2]["kl"] > 0  # the policy moved away from the base model it is compared with

    out = tmp_path / "exported"
    assert main(["export", str(resumed), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in exported.named_parameters())
    policy = PeftModel.from_pretrained(load_model(str(model_dir)), resumed / "checkpoints" / "step-000003" / "model")
    ids = torch.tensor([[5, 17, 30, 42, 9, 11]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=0)
        assert not torch.allclose(exported(ids).logits, load_model(str(model_dir))(ids).logits, atol=1e-3)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file()


def test_export_refuses_a_non_empty_directory_and_copies_a_full_fine_tuning_run(tiny_llama, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = write_config(
        tmp_path / "full.yaml", tiny_llama, run_dir, rewards=[{"name": "conftest:char_codes"}],
        train={"steps": 1}, run={"eval_before": False},
    )
    assert main(["train", str(path)]) == 0
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["export", str(run_dir), str(taken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {taken} already exists and is not empty: choose another OUT_DIR"
    assert (taken / "keep.txt").read_text() == "mine"

    out = tmp_path / "full"
    assert main(["export", str(run_dir), str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "step-000001" / "model")
    for (name, a), (_, b) in zip(exported.state_dict().items(), trained.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
