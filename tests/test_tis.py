"""The engine/trainer log-prob gap: truncated and masked importance sampling against float64 numbers worked out by
hand, the Objective with the correction on and off, the logged gap on a hand-made batch, config validation, and a
one-step run with the fast engine."""

import dataclasses
import math

import pytest
import torch
from conftest import problems_of, write_config

from rlreason.cli import main
from rlreason.config import load_config
from rlreason.objective.losses import rollout_correction_weights
from rlreason.objective.objective import FrozenPass, Objective
from rlreason.observe.runlog import read_jsonl
from rlreason.training.groups import frozen_logprobs
from rlreason.training.trainer import Trainer

f64 = torch.float64
LOG = math.log
# trainer log-prob minus engine log-prob of five tokens: ratios 0.6, 1, 1.5, 3 (above the cap 2), 0.25 (below 1/2)
OLD = torch.tensor([[LOG(0.3), LOG(0.5), LOG(0.6)], [LOG(0.9), LOG(0.2), LOG(0.7)]], dtype=f64)
ENGINE = torch.tensor([[LOG(0.5), LOG(0.5), LOG(0.4)], [LOG(0.3), LOG(0.8), LOG(0.7)]], dtype=f64)
RATIOS = [[0.6, 1.0, 1.5], [3.0, 0.25, 1.0]]


def t(rows):
    return torch.tensor(rows, dtype=f64)


# ----------------------------------------------------------------- the weights by hand


def test_tis_truncates_the_ratio_at_the_cap():
    weights, truncated = rollout_correction_weights(OLD, ENGINE, "tis", cap=2.0)
    torch.testing.assert_close(weights, t([[0.6, 1.0, 1.5], [2.0, 0.25, 1.0]]), rtol=0, atol=1e-12)
    assert truncated.tolist() == [[False, False, False], [True, False, False]]
    weights, truncated = rollout_correction_weights(OLD, ENGINE, "tis", cap=4.0)  # the cap not hit: w = r
    torch.testing.assert_close(weights, t(RATIOS), rtol=0, atol=1e-12)
    assert not truncated.any()


def test_mis_keeps_the_ratio_inside_the_band_and_drops_the_token_outside():
    weights, masked = rollout_correction_weights(OLD, ENGINE, "mis", cap=2.0)  # band [1/2, 2]
    torch.testing.assert_close(weights, t([[0.6, 1.0, 1.5], [0.0, 0.0, 1.0]]), rtol=0, atol=1e-12)
    assert masked.tolist() == [[False, False, False], [True, True, False]]
    weights, masked = rollout_correction_weights(OLD, ENGINE, "mis", cap=2.0, low=0.2)  # band [0.2, 2]
    torch.testing.assert_close(weights, t([[0.6, 1.0, 1.5], [0.0, 0.25, 1.0]]), rtol=0, atol=1e-12)
    assert masked.tolist() == [[False, False, False], [True, False, False]]


def test_the_weights_carry_no_gradient_and_an_infinite_ratio_is_masked_not_nan():
    old = OLD.clone().requires_grad_()
    weights, _ = rollout_correction_weights(old, ENGINE, "tis")
    assert not weights.requires_grad
    huge = t([[0.0]]), t([[-1000.0]])  # exp(1000) overflows to inf
    weights, masked = rollout_correction_weights(*huge, "mis")
    assert weights.item() == 0.0 and masked.item()
    assert rollout_correction_weights(*huge, "tis")[0].item() == 2.0
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_correction_weights(OLD, ENGINE, "cispo")


# ----------------------------------------------------------------- the objective, on and off


def loss_of(objective, logprobs, frozen, fresh=False):
    advantages, mask = t([1.0, -2.0]), torch.ones(2, 3, dtype=f64)
    entropy = torch.full((2, 3), 0.5, dtype=f64)
    return objective.loss(logprobs, advantages, mask, frozen, entropy, fresh=fresh)


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_the_correction_multiplies_only_the_policy_term_by_the_weights(mode):
    """Two iterations (the ratio moves), a KL term and an entropy bonus: on minus off is the surrogate times (w - 1),
    and the surrogate's gradient is multiplied by w."""
    options = {"num_iterations": 2, "beta": 0.1, "entropy_coef": 0.01}
    logprobs = (OLD + t([[0.05, -0.1, 0.2], [0.0, 0.1, -0.05]])).requires_grad_()
    frozen = FrozenPass(old=OLD, ref=OLD - 0.3, engine=ENGINE)
    weights, _ = rollout_correction_weights(OLD, ENGINE, mode)
    on, stats = loss_of(Objective(**options, rollout_correction=mode), logprobs, frozen)
    off, off_stats = loss_of(Objective(**options), logprobs, frozen)
    surrogate, _ = loss_of(Objective(num_iterations=2), logprobs, frozen)
    torch.testing.assert_close(on - off, surrogate * (weights - 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats["is_weight"], weights, rtol=0, atol=0)
    assert ("is_truncated" if mode == "tis" else "is_masked") in stats and "is_weight" not in off_stats
    corrected, _ = loss_of(Objective(num_iterations=2, rollout_correction=mode), logprobs, frozen)
    (grad_on,) = torch.autograd.grad(corrected.sum(), logprobs)
    (grad_off,) = torch.autograd.grad(surrogate.sum(), logprobs)
    torch.testing.assert_close(grad_on, grad_off * weights, rtol=0, atol=1e-12)


def test_one_pass_divides_the_current_log_probs_by_the_engine_s():
    """num_iterations 1 has no old pass: the trainer's log-probs at the sampling weights are the current ones."""
    on, stats = loss_of(Objective(rollout_correction="tis"), OLD.clone().requires_grad_(), FrozenPass(engine=ENGINE))
    torch.testing.assert_close(stats["is_weight"], t([[0.6, 1.0, 1.5], [2.0, 0.25, 1.0]]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="rollout.engine 'fast'"):
        loss_of(Objective(rollout_correction="tis"), OLD, FrozenPass())


def test_the_gap_is_measured_on_a_fresh_pass_only_and_logged_under_the_rollout_names():
    logprobs = OLD.clone().requires_grad_()
    _, stats = loss_of(Objective(), logprobs, FrozenPass(engine=ENGINE), fresh=True)
    torch.testing.assert_close(stats["logprob_gap"], (OLD - ENGINE).abs(), rtol=0, atol=0)
    assert "logprob_gap" not in loss_of(Objective(), logprobs, FrozenPass(engine=ENGINE), fresh=False)[1]
    assert "logprob_gap" not in loss_of(Objective(), logprobs, FrozenPass(), fresh=True)[1]
    _, stats = loss_of(Objective(rollout_correction="mis"), logprobs, FrozenPass(engine=ENGINE), fresh=True)
    mask = torch.ones(2, 3, dtype=f64)
    names = [name for name, *_ in Objective.token_metrics(stats, torch.zeros(2, 3), mask, mask)]
    assert {"rollout/logprob_gap", "rollout/is_weight_mean", "rollout/is_masked_fraction"} <= set(names)


def test_loss_inputs_keep_the_engine_s_log_probs():
    frozen = FrozenPass(old=OLD, engine=ENGINE)
    assert Objective().loss_inputs(frozen).engine is ENGINE
    picked = frozen.select(slice(1, 2), 2)
    assert picked.engine.tolist() == ENGINE[1:2, :2].tolist() and picked.old.tolist() == OLD[1:2, :2].tolist()


# ----------------------------------------------------------------- the logged gap on a hand-made batch


def test_the_step_logs_the_gap_over_the_policy_s_tokens_at_the_sampling_weights(tiny_llama, tmp_path):
    """Engine log-probs = the trainer's + a known offset, with observation tokens whose offset is huge: the logged
    gap is the mean |offset| over the policy's tokens, from the first of two passes (the second is at moved
    weights), and the TIS weight mean and truncated share follow from the offsets."""
    path = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run", rewards=[{"name": "conftest:char_codes"}],
        rollout={"engine": "fast", "max_new_tokens": 12, "temperature": 0.7},
        train={"rollout_correction": "tis", "num_iterations": 2, "learning_rate": 0.05, "bf16": "false"},
        run={"eval_before": False},
    )
    trainer = Trainer(load_config(path))
    rollout = trainer._sample_groups(2, 4).rollout
    completion = rollout.completion_mask.bool()
    columns = torch.arange(completion.shape[1]).expand_as(completion)
    observation = completion & (columns % 4 == 1)
    assert (completion & ~observation).sum() > 8 and observation.any()
    offsets = torch.tensor([0.01, -0.02, 0.03, 1.2, 0.05, 0.0])[(columns + torch.arange(8)[:, None]) % 6]
    offsets = torch.where(observation, torch.full_like(offsets, 5.0), offsets) * completion
    trained, _ = frozen_logprobs(
        trainer.model, rollout, trainer._model_inputs(rollout), trainer.accelerator, 0.7, trainer.head_math
    )
    rollout = dataclasses.replace(rollout, logprobs=trained - offsets, observation_mask=observation.long())
    inputs = lambda: trainer._model_inputs(rollout)  # noqa: E731
    stats = trainer.optimize(rollout, torch.linspace(-1, 1, 8), trainer._frozen_pass(rollout, inputs), inputs)

    policy = rollout.loss_mask.bool()
    assert stats["rollout/logprob_gap"].tokens == int(policy.sum())  # the first pass's tokens only
    assert stats["rollout/logprob_gap"].value == pytest.approx(float(offsets[policy].abs().mean()), rel=1e-5)
    ratios = torch.exp(offsets[policy])
    assert stats["rollout/is_weight_mean"].value == pytest.approx(float(ratios.clamp(max=2).mean()), rel=1e-5)
    assert stats["rollout/is_truncated_fraction"].value == pytest.approx(float((ratios > 2).float().mean()))
    assert 0 < stats["rollout/is_truncated_fraction"].value < 1


# ----------------------------------------------------------------- config and a run


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.rollout_correction=tis"], "train.rollout_correction: 'tis' needs rollout.engine 'fast'"),
        (["train.rollout_correction=clip"], "train.rollout_correction: must be one of 'none', 'tis', 'mis'"),
        (["rollout.engine=fast", "train.rollout_correction=mis", "train.rollout_correction_cap=1"],
         "train.rollout_correction_cap: must be > 1"),
        (["rollout.engine=fast", "train.rollout_correction=tis", "train.rollout_correction_low=0.5"],
         "train.rollout_correction_low: only with train.rollout_correction 'mis'"),
        (["rollout.engine=fast", "train.rollout_correction=mis", "train.rollout_correction_low=1.5"],
         "train.rollout_correction_low: must be in [0, 1)"),
        (["rollout.engine=fast", "train.rollout_correction=tis", "train.rollout_logprobs=true", "train.num_iterations=2"],
         "train.rollout_correction: not with train.rollout_logprobs and num_iterations > 1"),
    ],
)
def test_bad_correction_settings_are_refused_with_one_named_problem(overrides, expected):
    (problem,) = problems_of(overrides)
    assert problem.startswith(expected), problem


def test_a_valid_correction_loads_into_the_objective():
    config = load_config(None, ["rollout.engine=fast", "train.rollout_correction=mis", "train.rollout_correction_low=0.2"])
    objective = Objective.from_config(config)
    assert (objective.rollout_correction, objective.rollout_correction_cap, objective.rollout_correction_low) == ("mis", 2.0, 0.2)
    assert objective.needs_engine_logprobs and not Objective().needs_engine_logprobs


@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_one_step_with_the_fast_engine_logs_the_gap_and_the_weights(mode, tiny_llama, tmp_path):
    """float32 on the CPU: the engine and the trainer agree to ~1e-6 at the sampling temperature, so the weights are
    1 and nothing is truncated or masked."""
    config = write_config(
        tmp_path / "c.yaml", tiny_llama, tmp_path / "run", rewards=[{"name": "conftest:char_codes"}],
        rollout={"engine": "fast", "temperature": 0.7},
        train={"steps": 1, "rollout_correction": mode, "bf16": "false"}, run={"eval_before": False},
    )
    assert main(["train", str(config)]) == 0
    (metrics,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    acted = "rollout/is_truncated_fraction" if mode == "tis" else "rollout/is_masked_fraction"
    assert 0 <= metrics["rollout/logprob_gap"] < 1e-3
    assert metrics["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3) and metrics[acted] == 0.0
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
