"""train.skip_zero_advantage: completions of advantage 0 are left out of the update's passes, and the update is the
same as over the whole batch."""

import dataclasses

import numpy as np
import pytest
import torch
from conftest import write_config

import rlreason.training.groups as groups
from rlreason.config import load_config
from rlreason.objective.objective import FrozenPass, Objective
from rlreason.training.groups import update_rows
from rlreason.training.trainer import Trainer

ADVANTAGES = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.9, -0.3, -0.3, -0.3])  # group 1 flat, group 2 not


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"num_iterations": 2, "epsilon_high": 0.28, "dual_clip": 3.0},
        {"num_iterations": 2, "importance_sampling": "sequence", "loss_type": "dr_grpo"},
        {"rollout_correction": "tis"},
        {"rollout_correction": "mis"},
        {"beta": 0.1, "kl_in_reward": True},
    ],
)
def test_a_zero_advantage_has_no_gradient_where_the_objective_says_so(options):
    """The claim ``has_gradient`` rests on, checked on the loss itself: with old and engine log-probs away from the
    policy's (so that every ratio, clip and correction is active somewhere), rows of advantage 0 get no gradient."""
    objective = Objective(max_len=6, **options)
    torch.manual_seed(0)
    logprobs = (-torch.rand(8, 6, dtype=torch.float64) * 3).requires_grad_()
    offsets = torch.randn(2, 8, 6, dtype=torch.float64) * 0.3
    frozen = objective.loss_inputs(FrozenPass(old=logprobs.detach() + offsets[0], engine=logprobs.detach() + offsets[1]), stale=True)
    mask = torch.ones(8, 6, dtype=torch.float64)
    advantages = ADVANTAGES.double()
    loss, _ = objective.loss(logprobs, advantages, mask, frozen, torch.zeros_like(mask))
    loss.sum().backward()
    keep = objective.has_gradient(advantages)
    assert keep.tolist() == [False] * 4 + [True] * 4
    assert not logprobs.grad[~keep].any() and logprobs.grad[keep].abs().sum(dim=1).gt(0).all()


@pytest.mark.parametrize("options", [{"beta": 0.1}, {"entropy_coef": 0.01}, {"skip_zero_advantage": False}])
def test_every_row_trains_where_a_zero_advantage_still_has_a_gradient_or_skipping_is_off(options):
    assert Objective(**options).has_gradient(ADVANTAGES).all() and not Objective(**options).leaves_out_zero_advantage


class _Processes:
    def __init__(self, n: int):
        self.num_processes = n


def test_update_rows_keep_the_rows_with_a_gradient_and_top_up_where_shapes_or_processes_need():
    has_gradient = torch.tensor([False, True, False, False, True, True, False, False])
    one = _Processes(1)
    assert update_rows(has_gradient, 2, one).tolist() == [1, 4, 5]
    assert update_rows(has_gradient, 2, one, whole_micro_batches=True).tolist() == [0, 1, 4, 5]
    assert update_rows(has_gradient, 5, one, whole_micro_batches=True).tolist() == [0, 1, 2, 4, 5]
    six = has_gradient | torch.tensor([True, False, True, True, False, False, False, False])
    assert update_rows(six, 5, one, whole_micro_batches=True).tolist() == list(range(8))  # two of 5, capped at 8
    assert update_rows(torch.zeros(8, dtype=torch.bool), 2, one).tolist() == []


def test_every_process_runs_as_many_micro_batches_as_the_busiest(monkeypatch):
    has_gradient = torch.tensor([False, True, False, False, True, True, False, False])  # 2 micro-batches of 2 here
    monkeypatch.setattr(groups, "gather_object", lambda mine: mine + [4])  # another process needs 4
    assert update_rows(has_gradient, 2, _Processes(2)).tolist() == [0, 1, 2, 3, 4, 5, 6]  # 7 rows: 4 micro-batches
    monkeypatch.setattr(groups, "gather_object", lambda mine: mine + [0])  # the other has nothing to train
    assert update_rows(has_gradient, 2, _Processes(2)).tolist() == [1, 4, 5]
    assert update_rows(torch.zeros(8, dtype=torch.bool), 2, _Processes(2)).tolist() == []  # nobody trains: no pass


def _trainer(tmp_path, model_dir, name, **train):
    path = write_config(
        tmp_path / f"{name}.yaml", model_dir, tmp_path / name, rewards=[{"name": "conftest:char_codes"}],
        rollout={"engine": "fast", "max_new_tokens": 12},
        train={"micro_batch_size": 2, "learning_rate": 0.05, "bf16": "false", **train},
        run={"eval_before": False},
    )
    return Trainer(load_config(path))


def _update(trainer, rollout, advantages):
    """The update's gradients (one list per optimizer step), its metrics and how many forward passes it ran."""
    params = list(trainer.model.parameters())
    gradients, forwards = [], []
    step = trainer.optimizer.step

    def recording_step():
        gradients.append([p.grad.clone() for p in params])
        step()

    trainer.optimizer.step = recording_step
    hook = trainer.model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        inputs = lambda: trainer._model_inputs(rollout)  # noqa: E731
        metrics = trainer.optimize(rollout, advantages, trainer._frozen_pass(rollout, inputs), inputs)
    finally:
        hook.remove()
    return gradients, metrics, len(forwards)


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_leaving_zero_advantage_rows_out_gives_the_whole_batch_update(tiny_llama, tmp_path, num_iterations):
    results = {}
    rollout = None
    for skip in (False, True):
        trainer = _trainer(tmp_path, tiny_llama, f"skip-{skip}", num_iterations=num_iterations, skip_zero_advantage=skip)
        rollout = rollout or trainer._sample_groups(2, 4).rollout
        results[skip] = _update(trainer, rollout, ADVANTAGES)
    (whole, whole_metrics, whole_forwards), (skipped, metrics, forwards) = results[False], results[True]
    assert len(whole) == len(skipped) == num_iterations
    for a, b in zip(whole, skipped, strict=True):  # each optimizer step's gradient, the second after a moved first
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-8)
    frozen_pass = 4 if num_iterations > 1 else 0  # the old log-probs, over the whole batch
    assert (whole_forwards, forwards) == (frozen_pass + 4 * num_iterations, frozen_pass + 2 * num_iterations)
    assert (whole_metrics["update_fraction"].value, metrics["update_fraction"].value) == (1.0, 0.5)
    assert metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-5)
    assert metrics["ratio"].tokens == rollout.loss_mask[4:].sum() * num_iterations  # the rows it ran


def test_an_update_with_nothing_to_train_still_steps_the_optimizer(tiny_llama, tmp_path):
    """All advantages 0: no pass at all, yet the optimizer and the schedule step as over the whole batch (weight
    decay moves the weights; Adam's moments see a zero gradient)."""
    weights = {}
    rollout = None
    for skip in (False, True):
        trainer = _trainer(tmp_path, tiny_llama, f"flat-{skip}", weight_decay=0.1, skip_zero_advantage=skip)
        rollout = rollout or trainer._sample_groups(2, 4).rollout
        before = [p.detach().clone() for p in trainer.model.parameters()]
        _, metrics, forwards = _update(trainer, rollout, torch.zeros(8))
        weights[skip] = [p.detach().clone() for p in trainer.model.parameters()]
        assert metrics["skipped_updates"] == 0.0 and metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
        assert forwards == (0 if skip else 4) and trainer.scheduler.last_epoch == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, weights[True], strict=True))
    for a, b in zip(weights[False], weights[True], strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize(("train", "layouts"), [({"beta": 0.1}, [8]), ({"num_iterations": 2}, [8, 4])])
def test_a_step_lays_out_its_batch_once_for_the_frozen_passes_and_an_update_of_all_of_it(tiny_llama, tmp_path, train, layouts):
    """With a KL term every completion trains: the update reuses the layout the reference's pass made. With a flat
    group the update lays out its own rows."""
    trainer = _trainer(tmp_path, tiny_llama, "layouts", **train)
    laid_out = []
    build = trainer._model_inputs
    trainer._model_inputs = lambda rollout: laid_out.append(len(rollout.texts)) or build(rollout)
    batch = trainer._sample_groups(2, 4)
    trainer._sample_groups = lambda P, G: dataclasses.replace(
        batch, scores=dataclasses.replace(batch.scores, total=np.concatenate([np.full(4, 0.5), batch.scores.total[4:]]))
    )  # the first group flat
    trainer.train_step()
    assert laid_out == layouts  # the rows of each layout made
