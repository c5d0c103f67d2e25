"""The GRPO-family options through the trainer on a tiny random-init model: config validation, the exact ratio of
one pass, a short run per loss type, DAPO dynamic sampling, overlong masking, the reference refresh."""

import pytest
import torch
from conftest import make_tiny_model, write_config

import rlreason.objective.objective as objective_module
from rewards.registry import reward
from rlreason.cli import main
from rlreason.config import ConfigError, load_config
from rlreason.observe.runlog import read_jsonl
from rlreason.rollout.engine import Rollout, concat_rollouts
from rlreason.training.logprobs import completion_logprobs
from rlreason.training.trainer import Trainer

SIGNAL = [{"name": "objectives_position"}]  # every group has signal, whatever a random model samples
NO_EVAL = {"eval_before": False}


@reward("objectives_odd_answers_vary")
def odd_answers_vary(completions, samples):
    """Rewards that differ within a group exactly when the prompt's answer is odd; all 0 otherwise."""
    return [float(i) if int(s["answer"]) % 2 else 0.0 for i, s in enumerate(samples)]


@reward("objectives_position")
def position(completions, samples):
    """Rewards that differ within every group: every advantage is non-zero, so a moved ratio clips."""
    return [float(i % 3) for i in range(len(completions))]


@reward("objectives_always_zero")
def always_zero(completions, samples):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("objectives-model"))


def trainer(tmp_path, model_dir, train=None, rewards=SIGNAL, **sections):
    tmp_path.mkdir(exist_ok=True)
    train = {"steps": 1, "learning_rate": 1e-2, "micro_batch_size": 4, **(train or {})}
    path = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "run", rewards=rewards, train=train, run=NO_EVAL, **sections)
    return Trainer(load_config(path))


# ----------------------------------------------------------------- config


def test_every_option_is_validated_by_name():
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            [
                "train.loss_type=mean",
                "train.advantage=ppo",
                "train.scale_rewards=std",
                "train.importance_sampling=sentence",
                "train.kl_estimator=k4",
                "train.overlong=cut",
                "train.epsilon_high=0",
                "train.dual_clip=1.0",
                "train.kl_in_reward=true",
                "train.max_sampling_rounds=0",
                "train.top_entropy_quantile=1.5",
            ],
        )
    fields = [p.split(":")[0] for p in info.value.problems]
    assert fields == [
        "train.loss_type",
        "train.advantage",
        "train.scale_rewards",
        "train.importance_sampling",
        "train.kl_estimator",
        "train.overlong",
        "train.epsilon_high",
        "train.dual_clip",
        "train.kl_in_reward",
        "train.max_sampling_rounds",
        "train.top_entropy_quantile",
    ]
    # the messages say what is allowed
    assert "must be > 1" in info.value.problems[7] and "(0, 1]" in info.value.problems[10]
    with pytest.raises(ConfigError, match="train.ref_update_every: needs train.beta > 0"):
        load_config(None, ["train.ref_update_every=5"])
    with pytest.raises(ConfigError, match=r"train.overlong_buffer: must be in \[1, rollout.max_new_tokens = 96\]"):
        load_config(None, ["train.overlong=soft"])
    with pytest.raises(ConfigError, match="train.top_entropy_quantile"):
        load_config(None, ["train.top_entropy_quantile=0"])


def test_scale_rewards_reads_the_old_boolean_spelling():
    assert load_config(None, ["train.scale_rewards=true"]).train.scale_rewards == "group"
    assert load_config(None, ["train.scale_rewards=false"]).train.scale_rewards == "none"
    assert load_config(None, ["train.scale_rewards=batch"]).train.scale_rewards == "batch"


# ----------------------------------------------------------------- the ratio of one pass


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_one_iteration_ratio_is_exactly_one_and_nothing_clips(level, tmp_path, model_dir, monkeypatch):
    """Through the trainer: with num_iterations = 1 the batch was sampled by the very policy being updated, so
    every ratio is exactly 1 and even a clip range of 1e-9 never triggers; a second pass moves the ratio."""
    seen, policy_loss = [], objective_module.policy_loss

    def recording(*args, **kwargs):
        loss, stats = policy_loss(*args, **kwargs)
        seen.append(stats)
        return loss, stats

    monkeypatch.setattr(objective_module, "policy_loss", recording)
    tiny = {"epsilon": 1e-9, "epsilon_high": 1e-9, "dual_clip": 1.0 + 1e-9, "importance_sampling": level}
    # kl_in_reward and top_entropy_quantile make the trainer compute the sampling policy's log-probs in a
    # separate pass; the ratio must still be exactly 1
    extra = {"beta": 0.1, "kl_in_reward": True, "top_entropy_quantile": 0.5}
    metrics = trainer(tmp_path, model_dir, {**tiny, **extra}).train_step()  # every advantage non-zero
    assert len(seen) == 2  # 8 completions, micro-batches of 4
    for stats in seen:
        assert torch.all(stats["ratio"] == 1.0)
        assert not stats["clipped"].any() and not stats["clipped_dual"].any()
    assert metrics["ratio"] == 1.0
    assert metrics["clip_fraction"] == metrics["clip_fraction_low"] == metrics["clip_fraction_high"] == 0.0
    assert metrics["clip_fraction_dual"] == 0.0

    seen.clear()
    two = trainer(tmp_path / "two", model_dir, {**tiny, "num_iterations": 2}).train_step()
    assert len(seen) == 4
    for stats in seen[:2]:  # first pass: old log-probs from a separate pass over the same weights
        torch.testing.assert_close(stats["ratio"], torch.ones_like(stats["ratio"]), rtol=0, atol=1e-3)
    assert all(stats["clipped"].any() for stats in seen[2:]) and two["clip_fraction"] > 0


# ----------------------------------------------------------------- a short run per objective

LOGGED = ["loss", "clip_fraction", "clip_fraction_low", "clip_fraction_high", "ratio", "entropy", "grad_norm"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_short_run_per_loss_type(loss_type, tmp_path, model_dir):
    train = {"steps": 2, "learning_rate": 1e-2, "micro_batch_size": 4, "num_iterations": 2, "loss_type": loss_type}
    config = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "run", rewards=SIGNAL, train=train, run=NO_EVAL)
    assert main(["train", str(config)]) == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        for key in LOGGED:
            assert m[key] is not None and torch.isfinite(torch.tensor(m[key])), key
        assert m["grad_norm"] > 0


def test_short_run_with_every_option(tmp_path, model_dir):
    train = {
        "steps": 2,
        "learning_rate": 1e-2,
        "micro_batch_size": 4,
        "num_iterations": 2,
        "loss_type": "dapo",
        "advantage": "rloo",
        "scale_rewards": "batch",
        "importance_sampling": "sequence",
        "epsilon_high": 0.28,
        "dual_clip": 3.0,
        "beta": 0.05,
        "kl_estimator": "k2",
        "ref_update_every": 1,
        "dynamic_sampling": True,
        "max_sampling_rounds": 2,
        "overlong": "soft",
        "overlong_buffer": 4,
        "entropy_coef": 0.01,
        "top_entropy_quantile": 0.5,
    }
    config = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "run", rewards=SIGNAL, train=train, run=NO_EVAL)
    assert main(["train", str(config)]) == 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for key in LOGGED + [
        "clip_fraction_dual",
        "kl",
        "dynamic_sampling/rounds",
        "dynamic_sampling/dropped_groups",
        "dynamic_sampling/refilled_groups",
        "overlong/penalized",
        "overlong/penalty",
        "trained_token_fraction",
    ]:
        assert all(key in m for m in metrics), key
    assert all(1 <= m["dynamic_sampling/rounds"] <= 2 for m in metrics)
    assert all(0 < m["trained_token_fraction"] <= 0.75 for m in metrics)  # about half the tokens train


def test_kl_in_reward_and_overlong_mask(tmp_path, model_dir):
    t = trainer(
        tmp_path,
        model_dir,
        {"beta": 0.1, "kl_in_reward": True, "kl_estimator": "k1", "overlong": "mask"},
        rollout={"prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6},
    )
    metrics = t.train_step()
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # first step: the reference is the policy
    truncated = round(metrics["truncated_fraction"] * 8)
    assert metrics["overlong/masked"] == truncated
    if truncated == 8:
        assert metrics["trained_token_fraction"] == 0.0 and metrics["loss"] == 0.0


def test_entropy_gradient_only_when_asked(model_dir):
    from rlreason.models import load_model

    model = load_model(str(model_dir))
    ids, mask = torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long)
    _, entropy = completion_logprobs(model, ids, mask, ids, mask)
    assert not entropy.requires_grad
    _, entropy = completion_logprobs(model, ids, mask, ids, mask, entropy_grad=True)
    assert entropy.requires_grad
    entropy.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ----------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_keeps_only_groups_with_signal(tmp_path, model_dir):
    t = trainer(
        tmp_path,
        model_dir,
        {"dynamic_sampling": True, "max_sampling_rounds": 20},
        rewards=[{"name": "objectives_odd_answers_vary"}],
        rollout={"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4},
    )
    batch = t._sample_groups(4, 2)
    rows, rollout, stats = batch.rows, batch.rollout, batch.stats
    assert len(rows) == 4 and len(rollout.texts) == 8 and rollout.completion_ids.shape[0] == 8
    assert all(int(row["answer"]) % 2 for row in rows)
    assert stats["dynamic_sampling/refilled_groups"] == 0
    seen = t.stream.position  # prompts taken from the stream: every one is either kept or dropped
    assert seen == 4 + stats["dynamic_sampling/dropped_groups"]
    assert stats["dynamic_sampling/rounds"] >= 1
    metrics = t.train_step()
    assert metrics["zero_std_groups"] == 0.0


def test_dynamic_sampling_cap_fills_the_batch_with_dropped_groups(tmp_path, model_dir):
    t = trainer(
        tmp_path,
        model_dir,
        {"dynamic_sampling": True, "max_sampling_rounds": 3},
        rewards=[{"name": "objectives_always_zero"}],
    )
    metrics = t.train_step()
    assert metrics["dynamic_sampling/rounds"] == 3
    assert metrics["dynamic_sampling/dropped_groups"] == 6  # 2 prompts per round, none with signal
    assert metrics["dynamic_sampling/refilled_groups"] == 2
    assert metrics["zero_std_groups"] == 1.0


def test_concat_rollouts_repads_prompts_left_and_completions_right():
    a = Rollout(
        prompt_ids=torch.tensor([[0, 5], [6, 7]]),
        prompt_mask=torch.tensor([[0, 1], [1, 1]]),
        completion_ids=torch.tensor([[8, 0], [9, 9]]),
        completion_mask=torch.tensor([[1, 0], [1, 1]]),
        texts=["a0", "a1"],
        truncated=torch.tensor([False, True]),
    )
    b = Rollout(
        prompt_ids=torch.tensor([[1, 2, 3]]),
        prompt_mask=torch.tensor([[1, 1, 1]]),
        completion_ids=torch.tensor([[4, 4, 4]]),
        completion_mask=torch.tensor([[1, 1, 1]]),
        texts=["b0"],
        truncated=torch.tensor([True]),
    )
    joined = concat_rollouts([(a, [1]), (b, [0]), (a, [])], pad_id=0)
    assert joined.prompt_ids.tolist() == [[0, 6, 7], [1, 2, 3]]
    assert joined.prompt_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    assert joined.completion_ids.tolist() == [[9, 9, 0], [4, 4, 4]]
    assert joined.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert joined.texts == ["a1", "b0"] and joined.truncated.tolist() == [True, True]


# ----------------------------------------------------------------- reference


def test_reference_refresh_and_resume(tmp_path, model_dir):
    train = {"steps": 1, "learning_rate": 1e-2, "micro_batch_size": 4, "beta": 0.1, "ref_update_every": 2}
    config = write_config(tmp_path / "c.yaml", model_dir, tmp_path / "run", rewards=SIGNAL, train=train, run={**NO_EVAL, "save_every": 1})
    t = Trainer(load_config(config))
    initial = [p.detach().clone() for p in t.reference.parameters()]
    t.train_step()  # step 1: the reference stays the initial model
    assert all(torch.equal(a, b) for a, b in zip(initial, t.reference.parameters(), strict=True))
    t.train_step()  # step 2: the reference becomes the policy
    policy = list(t.accelerator.unwrap_model(t.model).parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy, t.reference.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(initial, t.reference.parameters(), strict=True))
    t.save_checkpoint()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "reference").is_dir()

    resumed = Trainer(load_config(config, ["train.steps=3"]), resume=True)
    assert resumed.step == 2
    assert all(torch.equal(a, b) for a, b in zip(policy, resumed.reference.parameters(), strict=True))
