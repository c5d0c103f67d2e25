"""train.async_rollouts: the engine's weight snapshot holds while the model changes, each batch after the first is
sampled by the weights before the previous update, its old log-probs are the engine's, checkpoints draw the batch
in flight again, and the config refuses what it cannot run."""

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model, problems_of, write_config

from rlreason.cli import main
from rlreason.config import load_config
from rlreason.models import load_model, load_tokenizer
from rlreason.objective.objective import FrozenPass, Objective
from rlreason.observe.runlog import read_jsonl
from rlreason.rollout.engine import SamplingParams
from rlreason.rollout.fast import FastEngine
from rlreason.training.checkpoint import latest_checkpoint
from rlreason.training.trainer import Trainer


def _generate(engine, tokenizer):
    prompts = [tokenizer("12+3=")["input_ids"], tokenizer("7*8=")["input_ids"]]
    return engine.generate(prompts, 3, SamplingParams(max_new_tokens=10, temperature=1.0), seeds=list(range(6)))


def test_a_snapshot_samples_the_weights_it_copied_however_the_model_changes(tmp_path):
    directory = make_tiny_model(tmp_path / "model")
    model, tokenizer = load_model(str(directory)), load_tokenizer(str(directory))
    engine = FastEngine(model, tokenizer, own_weights=True)
    before = _generate(engine, tokenizer)
    engine.snapshot()
    with torch.no_grad():  # what the update does on the training thread meanwhile
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    pinned = [_generate(engine, tokenizer) for _ in range(2)]  # a multi-turn episode generates more than once
    engine.unpin()
    after = _generate(engine, tokenizer)
    for rollout in pinned:
        assert torch.equal(rollout.completion_ids, before.completion_ids)
        torch.testing.assert_close(rollout.logprobs, before.logprobs, rtol=0, atol=1e-6)
    assert not torch.equal(after.completion_ids, before.completion_ids) or not torch.allclose(after.logprobs, before.logprobs)


def test_a_snapshot_needs_weight_copies_of_the_engine_s_own(tmp_path):
    directory = make_tiny_model(tmp_path / "model")
    engine = FastEngine(load_model(str(directory)), load_tokenizer(str(directory)), own_weights=False)
    with pytest.raises(ValueError, match="own weight copies"):
        engine.snapshot()


def test_a_stale_batch_keeps_its_old_log_probs_for_the_ratio():
    old = torch.zeros(2, 3)
    assert Objective().loss_inputs(FrozenPass(old=old)).old is None  # on-policy: the ratio is exactly 1
    assert Objective().loss_inputs(FrozenPass(old=old), stale=True).old is old


def _async_config(tmp_path, model_dir, run_dir, **train):
    path = write_config(
        tmp_path / f"{run_dir.name}.yaml", model_dir, run_dir, rewards=[{"name": "conftest:char_codes"}],
        rollout={"engine": "fast", "max_new_tokens": 8},
        train={"steps": 3, "learning_rate": 0.05, "micro_batch_size": 4, **train},
        run={"eval_before": False},
    )
    return load_config(path)


def test_each_batch_after_the_first_is_sampled_by_the_weights_before_the_last_update(tmp_path):
    model_dir = make_tiny_model(tmp_path / "model")
    trainer = Trainer(_async_config(tmp_path, model_dir, tmp_path / "run", async_rollouts=True))
    weight = lambda: trainer.model.model.layers[0].self_attn.o_proj.weight.detach().clone()  # noqa: E731
    sampled_by, old_logprobs = [], []
    generate, frozen_pass = trainer.engine.generate, trainer._frozen_pass

    def recording_generate(*args, **kwargs):
        sampled_by.append(trainer.engine.weights.layers[0]["o"][0].clone())
        return generate(*args, **kwargs)

    def recording_frozen_pass(rollout, inputs, stale=False):
        frozen = frozen_pass(rollout, inputs, stale)
        old_logprobs.append((frozen.old, rollout.logprobs))
        return frozen

    trainer.engine.generate, trainer._frozen_pass = recording_generate, recording_frozen_pass
    at_step_start = []
    for _ in range(3):
        at_step_start.append(weight())
        trainer.train_step()
    trainer.close()

    # the engine holds the weights in its own precision (bf16 where the CPU has bf16 products): compare in it
    at_step_start = [w.to(sampled_by[0].dtype) for w in at_step_start]
    assert not torch.equal(at_step_start[0], at_step_start[1])  # the updates moved the weights
    # step 1 samples its own batch and starts step 2's before updating; step 2 starts step 3's; step 3 starts none
    assert len(sampled_by) == 3
    for sampled, weights in zip(sampled_by, [at_step_start[0], at_step_start[0], at_step_start[1]], strict=True):
        torch.testing.assert_close(sampled, weights, rtol=0, atol=0)
    assert old_logprobs[0][0] is None  # on-policy: no old log-probs needed
    for old, recorded in old_logprobs[1:]:
        assert old is recorded
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "rollout/logprob_gap" in metrics[0] and "rollout/logprob_gap" not in metrics[1]  # only at the sampling weights


def test_a_checkpoint_records_the_stream_before_the_batch_in_flight(tmp_path):
    """Saved after step 1 with step 2's batch in flight: the checkpoint's data position is step 1's end, as in a run
    without prefetching, so a resumed run draws step 2's prompts again; the resumed run then finishes."""
    model_dir = make_tiny_model(tmp_path / "model")
    positions = {}
    for name, flag in (("sync", False), ("async", True)):
        run_dir = tmp_path / name
        config = _async_config(tmp_path, model_dir, run_dir, async_rollouts=flag, steps=2)
        config.run.save_every = 1
        trainer = Trainer(config)
        trainer.train_step()
        trainer.save_checkpoint()
        trainer.close()
        positions[name] = torch.load(latest_checkpoint(run_dir) / "trainer_state.pt", weights_only=False)["position"]
    assert positions["async"] == positions["sync"] == 2
    resumed = Trainer(_async_config(tmp_path, model_dir, tmp_path / "async", async_rollouts=True, steps=2), resume=True)
    assert resumed.stream.position == 2
    resumed.train()
    assert [m["step"] for m in read_jsonl(tmp_path / "async" / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.async_rollouts=true"], "train.async_rollouts: needs rollout.engine 'fast'"),
        (["rollout.engine=fast", "train.async_rollouts=true", "train.rollout_correction=tis"],
         "train.async_rollouts: not with train.rollout_correction"),
        (["rollout.engine=fast", "train.async_rollouts=true", "train.top_entropy_quantile=0.2"],
         "train.async_rollouts: not with train.top_entropy_quantile < 1"),
    ],
)
def test_what_async_rollouts_cannot_run_is_refused_with_one_named_problem(overrides, expected):
    (problem,) = problems_of(overrides)
    assert problem.startswith(expected), problem


def test_more_than_one_process_is_refused_in_one_line_before_a_model_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    import rlreason.training.trainer as trainer_module

    two = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True)
    monkeypatch.setattr(trainer_module, "make_accelerator", lambda config: two)
    monkeypatch.setattr(trainer_module, "load_training_models", lambda *a: pytest.fail("a model was loaded"))
    path = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run", rollout={"engine": "fast"}, train={"async_rollouts": True}
    )
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "config error: train.async_rollouts: one process only, got 2 (the sampling thread's collectives would race the "
        "update's gradient all-reduce)"
    )


def test_a_whole_run_evaluates_and_checkpoints_between_prefetched_steps(tmp_path):
    """Evaluations wait for the batch in flight; every checkpoint's data position is its own step's end."""
    model_dir = make_tiny_model(tmp_path / "model")
    config = _async_config(tmp_path, model_dir, tmp_path / "run", async_rollouts=True)
    config.run.eval_every, config.run.save_every, config.run.keep_last = 1, 1, 3
    Trainer(config).train()
    evals = read_jsonl(tmp_path / "run" / "evals.jsonl")
    assert [(e["stage"], e["step"]) for e in evals] == [("grpo", 1), ("grpo", 2), ("final", 3)]
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    positions = [torch.load(c / "trainer_state.pt", weights_only=False)["position"] for c in checkpoints]
    assert positions == [2, 4, 6]
