"""The objective of a run, built once from ``train.*`` and ``rollout.*``: the one place that reads its options.

The trainer asks it what a step needs (old, reference or engine log-probs, entropies), how to shape rewards
(soft overlong punishment, KL in the reward), which tokens train and how much each weighs (the loss type's
aggregation, overlong masking, the top-entropy tokens), and for the per-token loss and the metrics it logs. The
math itself stays in the pure functions of advantages.py and losses.py; this class only chooses and composes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from rlreason.config import Config
from rlreason.objective.advantages import compute_advantages, kl_penalised_rewards, overlong_penalty
from rlreason.objective.losses import (
    high_entropy_mask,
    kl_divergence,
    policy_loss,
    rollout_correction_weights,
    token_weights,
)

CLIP_STATS = ("clipped", "clipped_low", "clipped_high", "clipped_dual")
ROLLOUT_STATS = {
    "logprob_gap": "rollout/logprob_gap",
    "is_weight": "rollout/is_weight_mean",
    "is_truncated": "rollout/is_truncated_fraction",
    "is_masked": "rollout/is_masked_fraction",
}
"""Per-token stats of the engine/trainer gap and its correction -> their logged names."""


@dataclass(frozen=True)
class TokenMean:
    """A per-token metric as its sum and its token count, so that micro-batches and processes add up to the mean over
    the step's tokens (a mean of micro-batch means would depend on how rows were split)."""

    total: float
    tokens: float

    def __add__(self, other: TokenMean) -> TokenMean:
        return TokenMean(self.total + other.total, self.tokens + other.tokens)

    @property
    def value(self) -> float:
        return self.total / self.tokens if self.tokens else 0.0


@dataclass(frozen=True)
class FrozenPass:
    """Per-token tensors [N, L] of the batch under models that are not being updated, computed once per step: the
    sampling policy's log-probs and entropy, and the reference's log-probs; None where the objective needs none.
    ``engine``: the log-probs the rollout engine recorded while sampling (``Rollout.logprobs``), None where it
    records none."""

    old: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    ref: torch.Tensor | None = None
    engine: torch.Tensor | None = None

    def _tensors(self) -> list[torch.Tensor | None]:
        return [getattr(self, f.name) for f in fields(self)]

    def to(self, device: torch.device) -> FrozenPass:
        return FrozenPass(*(None if t is None else t.to(device) for t in self._tensors()))

    def select(self, rows: slice | torch.Tensor, width: int | None = None) -> FrozenPass:
        """Some rows (a micro-batch's, or an index), cut to a completion width."""
        return FrozenPass(*(None if t is None else t[rows, :width] for t in self._tensors()))


@dataclass(frozen=True)
class TokenWeights:
    """Which tokens train and how much each weighs in ``sum(per_token_loss * weights)``.

    ``weights`` is the loss type's aggregation over the tokens left in the loss (overlong masking applied);
    ``policy`` the 0/1 top-entropy selection of the tokens whose policy term trains, None when every token does.
    """

    weights: torch.Tensor
    policy: torch.Tensor | None = None

    @property
    def trained(self) -> torch.Tensor:
        """The tokens whose policy term has a gradient."""
        selected = self.weights if self.policy is None else self.weights * self.policy
        return selected > 0

    def to(self, device: torch.device) -> TokenWeights:
        return TokenWeights(self.weights.to(device), None if self.policy is None else self.policy.to(device))

    def select(self, rows: slice | torch.Tensor, width: int | None = None) -> TokenWeights:
        """Some rows (a micro-batch's, or an index), cut to a completion width."""
        policy = None if self.policy is None else self.policy[rows, :width]
        return TokenWeights(self.weights[rows, :width], policy)


@dataclass(frozen=True)
class Objective:
    """The objective's options (see ``TrainConfig`` for each one's meaning and source)."""

    advantage: str = "group"
    scale_rewards: str = "group"
    loss_type: str = "grpo"
    max_len: int = 0
    importance_sampling: str = "token"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    dual_clip: float | None = None
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_in_reward: bool = False
    ref_update_every: int = 0
    overlong: str = "none"
    overlong_buffer: int = 0
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    num_iterations: int = 1
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0
    rollout_correction_low: float | None = None
    skip_zero_advantage: bool = True

    @classmethod
    def from_config(cls, config: Config) -> Objective:
        tr = config.train
        return cls(
            advantage=tr.advantage, scale_rewards=tr.scale_rewards, loss_type=tr.loss_type,
            max_len=config.rollout.max_new_tokens, importance_sampling=tr.importance_sampling, epsilon=tr.epsilon,
            epsilon_high=tr.epsilon_high, dual_clip=tr.dual_clip, beta=tr.beta, kl_estimator=tr.kl_estimator,
            kl_in_reward=tr.kl_in_reward, ref_update_every=tr.ref_update_every, overlong=tr.overlong,
            overlong_buffer=tr.overlong_buffer, entropy_coef=tr.entropy_coef,
            top_entropy_quantile=tr.top_entropy_quantile, num_iterations=tr.num_iterations,
            rollout_correction=tr.rollout_correction, rollout_correction_cap=tr.rollout_correction_cap,
            rollout_correction_low=tr.rollout_correction_low, skip_zero_advantage=tr.skip_zero_advantage,
        )

    # ---------------------------------------------------------------- what a step needs

    @property
    def needs_reference(self) -> bool:
        return self.beta > 0

    @property
    def needs_entropy(self) -> bool:
        """The sampling policy's entropies pick the top-entropy tokens."""
        return self.top_entropy_quantile < 1

    @property
    def needs_old_logprobs(self) -> bool:
        """Several passes over a batch need its sampling log-probs for the ratio; the KL in the reward needs them too."""
        return self.num_iterations > 1 or self.kl_in_reward or self.needs_entropy

    @property
    def needs_engine_logprobs(self) -> bool:
        """The rollout correction weighs each token by the trainer's probability of it over the engine's."""
        return self.rollout_correction != "none"

    @property
    def entropy_grad(self) -> bool:
        return self.entropy_coef != 0

    @property
    def kl_in_loss(self) -> bool:
        return self.beta > 0 and not self.kl_in_reward

    @property
    def leaves_out_zero_advantage(self) -> bool:
        """The update leaves out completions of advantage 0 (``train.skip_zero_advantage``). Without a KL term in the
        loss or an entropy bonus, a completion's loss is its advantage times the (clipped, corrected, masked) ratio,
        so one of advantage 0 has no gradient."""
        return self.skip_zero_advantage and not self.kl_in_loss and not self.entropy_grad

    def has_gradient(self, advantages: torch.Tensor) -> torch.Tensor:
        """The completions [N] whose loss can have a gradient."""
        return advantages != 0 if self.leaves_out_zero_advantage else torch.ones_like(advantages, dtype=torch.bool)

    def refreshes_reference(self, step: int) -> bool:
        """The reference becomes the policy at the end of ``step`` (``ref_update_every``)."""
        return bool(self.ref_update_every) and step % self.ref_update_every == 0

    def loss_inputs(self, frozen: FrozenPass, stale: bool = False) -> FrozenPass:
        """The frozen tensors the loss reads: old log-probs for a ratio that can move (several passes, or a ``stale``
        batch, sampled by older weights), the reference's for a KL term, and the engine's, whenever recorded, for the
        gap to them (logged) and its correction."""
        return FrozenPass(
            old=frozen.old if self.num_iterations > 1 or stale else None, ref=frozen.ref if self.kl_in_loss else None,
            engine=frozen.engine,
        )

    # ---------------------------------------------------------------- rewards and advantages

    def shape_rewards(
        self, rewards: torch.Tensor, completion_mask: torch.Tensor, frozen: FrozenPass
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Rewards [P, G] after DAPO's soft overlong punishment and the KL folded into the reward, with their stats."""
        stats: dict[str, Any] = {}
        mask = completion_mask.float()
        if self.overlong == "soft":
            penalty = overlong_penalty(mask.sum(dim=1), self.max_len, self.overlong_buffer)
            rewards = rewards + penalty.view_as(rewards)
            stats.update({"overlong/penalized": int((penalty < 0).sum()), "overlong/penalty": float(penalty.mean())})
        if self.kl_in_reward:
            kl = kl_divergence(frozen.old, frozen.ref, self.kl_estimator)
            rewards = kl_penalised_rewards(rewards, kl, mask, self.beta)
            stats["kl"] = TokenMean(float((kl * mask).sum()), float(mask.sum()))
        return rewards, stats

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Shaped rewards [P, G] -> one advantage per completion [P * G]."""
        return compute_advantages(rewards, self.advantage, self.scale_rewards).flatten()

    # ---------------------------------------------------------------- which tokens train

    def aggregate(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """The loss type's per-token weights over ``loss_mask`` (the whole batch: see ``token_weights``)."""
        return token_weights(loss_mask, self.loss_type, self.max_len)

    def weigh(
        self,
        completion_mask: torch.Tensor,
        truncated: torch.Tensor,
        entropy: torch.Tensor | None,
        aggregate: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> TokenWeights:
        """The batch's token weights, once per batch so that the micro-batches add up. ``aggregate`` replaces
        ``self.aggregate`` where the divisors must count every process's tokens."""
        loss_mask = completion_mask.float()
        if self.overlong == "mask":  # DAPO's overlong filtering: truncated completions are left out of the loss
            loss_mask = loss_mask * ~truncated.unsqueeze(1)
        weights = (aggregate or self.aggregate)(loss_mask)
        if not self.needs_entropy:
            return TokenWeights(weights)
        return TokenWeights(weights, high_entropy_mask(entropy, loss_mask, self.top_entropy_quantile))

    def batch_metrics(self, weights: TokenWeights, completion_mask: torch.Tensor, truncated: torch.Tensor) -> dict[str, Any]:
        """The share of tokens that trained and the completions overlong masking left out, where they can differ."""
        out: dict[str, Any] = {}
        if self.overlong == "mask" or self.needs_entropy:
            out["trained_token_fraction"] = TokenMean(float(weights.trained.sum()), float(completion_mask.sum()))
        if self.overlong == "mask":
            out["overlong/masked"] = int(truncated.sum())
        return out

    # ---------------------------------------------------------------- the loss

    def loss(
        self,
        logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        frozen: FrozenPass,
        entropy: torch.Tensor,
        policy_mask: torch.Tensor | None = None,
        fresh: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-token loss of a micro-batch and its per-token stats. ``frozen`` holds the micro-batch's columns of
        ``loss_inputs``; without old log-probs the batch was sampled from this very policy, so the ratio is exactly 1.

        ``fresh``: ``logprobs`` are at the weights that sampled the batch (the first pass over it), so their gap to
        the engine's is the engine/trainer mismatch, measured without a pass of its own. The rollout correction
        divides the trainer's probabilities at those weights (the old log-probs, or these while they are the same)
        by the engine's."""
        old = frozen.old if frozen.old is not None else logprobs.detach()
        stats: dict[str, torch.Tensor] = {}
        if fresh and frozen.engine is not None:
            stats["logprob_gap"] = (logprobs.detach() - frozen.engine).abs()
        weights = None
        if self.needs_engine_logprobs:
            if frozen.engine is None:
                raise ValueError("train.rollout_correction needs the log-probs the engine recorded (rollout.engine 'fast')")
            weights, acted = rollout_correction_weights(
                old, frozen.engine, self.rollout_correction, self.rollout_correction_cap, self.rollout_correction_low
            )
            stats["is_weight"] = weights
            stats["is_truncated" if self.rollout_correction == "tis" else "is_masked"] = acted
        loss, loss_stats = policy_loss(
            logprobs,
            old,
            advantages,
            mask,
            importance_sampling=self.importance_sampling,
            epsilon_low=self.epsilon,
            epsilon_high=self.epsilon_high,
            dual_clip=self.dual_clip,
            beta=self.beta if self.kl_in_loss else 0.0,
            ref_logprobs=frozen.ref,
            kl_estimator=self.kl_estimator,
            entropy=entropy,
            entropy_coef=self.entropy_coef,
            policy_mask=policy_mask,
            rollout_weights=weights,
        )
        return loss, {**loss_stats, **stats}

    @staticmethod
    def token_metrics(
        stats: dict[str, torch.Tensor], entropy: torch.Tensor, mask: torch.Tensor, trained: torch.Tensor
    ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(name, per-token values, the tokens they average over) for the logged token means: clip fractions over
        the tokens whose policy term trains, the rest over every token of ``mask`` (the policy's, observations left
        out)."""
        out = [(name.replace("clipped", "clip_fraction"), stats[name], trained) for name in CLIP_STATS if name in stats]
        out += [("ratio", stats["ratio"], mask), ("entropy", entropy.detach(), mask)]
        if "kl" in stats:
            out.append(("kl", stats["kl"], mask))
        out += [(logged, stats[name], mask) for name, logged in ROLLOUT_STATS.items() if name in stats]
        return out
