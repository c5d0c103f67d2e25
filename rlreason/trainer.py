"""The GRPO loop, the only stateful piece of rlreason.

One step: take P prompts -> sample G completions each -> score them -> group-relative advantages ->
``num_iterations`` optimizer steps on the clipped surrogate (+ optional k3 KL to a frozen reference) ->
log every completion and the step's metrics -> checkpoint.

Left out on purpose (see the README): value networks, reward models, and any advantage or loss not
selected by config; each stage is a pure function in its own module and is tested alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from rlreason import sft
from rlreason.advantages import group_advantages
from rlreason.config import Config, save_config
from rlreason.data import PromptStream, encode_prompts
from rlreason.evaluate import evaluate
from rlreason.logprobs import completion_logprobs
from rlreason.losses import clipped_surrogate, grpo_token_weights, masked_mean
from rlreason.models import load_model, load_tokenizer
from rlreason.rollout import HFEngine, Rollout, SamplingParams
from rlreason.runlog import COMPLETIONS, EVALS, METRICS, RunLog, read_jsonl, truncate_after
from rlreason.scoring import resolve_rewards, score
from tasks.registry import load_task

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_NAME = re.compile(r"step-(\d+)")


def bf16_available() -> bool:
    """bf16 autocast pays off on GPUs that support it and on CPUs with native bf16 instructions."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint; ``.tmp`` directories of interrupted saves never match."""
    candidates = [p for p in (run_dir / CHECKPOINT_DIR).glob("step-*") if _CHECKPOINT_NAME.fullmatch(p.name)]
    return max(candidates, key=lambda p: int(p.name.split("-")[1]), default=None)


def prepare_run_dir(config: Config, resume: bool) -> Path:
    """Create the run directory; refuse to write over a finished or running run unless asked."""
    run_dir = Path(config.run.output_dir)
    holds_run = (run_dir / METRICS).exists() or (run_dir / CHECKPOINT_DIR).exists()
    if holds_run and not resume and not config.run.overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it or set run.overwrite=true to replace it"
        )
    if holds_run and config.run.overwrite and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        self.config = config
        tr = config.train
        use_bf16 = tr.bf16 == "true" or (tr.bf16 == "auto" and bf16_available())
        self.accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no")
        self.is_main = self.accelerator.is_main_process
        self.run_dir = prepare_run_dir(config, resume) if self.is_main else Path(config.run.output_dir)
        self.accelerator.wait_for_everyone()
        set_seed(tr.seed)

        mc = config.model
        self.tokenizer = load_tokenizer(mc.name, mc.cache_dir, mc.revision)
        model = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision)
        if tr.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=tr.learning_rate, betas=tuple(tr.adam_betas), weight_decay=tr.weight_decay
        )
        # Not prepared by accelerate: its wrapper steps once per process, which would shorten warm-up.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (tr.warmup_steps + 1)))
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.reference = None
        if tr.beta > 0:
            self.reference = load_model(mc.name, mc.cache_dir, mc.dtype, mc.revision).to(self.accelerator.device)
            self.reference.eval().requires_grad_(False)

        self.rewards = resolve_rewards(config.rewards)
        tc = config.task
        self.train_data = load_task(tc.name, "train", tc.train_size, tr.seed, **tc.options)
        self.eval_data = load_task(tc.name, "eval", tc.eval_size, tr.seed, **tc.options)
        self.engine = HFEngine(self.accelerator.unwrap_model(self.model), self.tokenizer)
        self.sampling = SamplingParams(
            config.rollout.max_new_tokens, config.rollout.temperature, config.rollout.top_p, config.rollout.top_k
        )
        self.stream = PromptStream(len(self.train_data), tr.seed)
        self.step = 0
        self.runlog = RunLog(self.run_dir, self.is_main, config.run.report_to, config.to_dict())
        if self.is_main:
            save_config(config, self.run_dir / "config.yaml")
        self.resumed_from = self._resume() if resume else None

    # ---------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        """Cold start (optional), evaluate, GRPO for ``train.steps``, evaluate; returns the summary."""
        cfg = self.config
        if self.resumed_from is None:
            if cfg.run.eval_before:
                self.evaluate("base")
            if cfg.sft.data and cfg.sft.steps > 0:
                self.run_sft()
                self.evaluate("sft")
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="grpo", disable=not (cfg.run.progress and self.is_main))
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if cfg.run.eval_every and self.step % cfg.run.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate("grpo")
            if cfg.run.save_every and self.step % cfg.run.save_every == 0:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.evaluate("final")
        self.runlog.close()
        return self.summary()

    def run_sft(self) -> list[float]:
        """The cold start: supervised steps on ``sft.data`` before any RL."""
        cfg = self.config
        conversations = sft.load_chat_jsonl(cfg.sft.data)
        return sft.run_sft(self.model, self.tokenizer, conversations, cfg.sft, self.accelerator, cfg.train.seed, cfg.run.progress and self.is_main)

    def train_step(self) -> dict[str, Any]:
        cfg, tr = self.config, self.config.train
        P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
        t0 = time.perf_counter()
        rows = [self.train_data[i] for i in self.stream.take(P)]
        rollout = self.engine.generate(encode_prompts(self.tokenizer, rows), G, self.sampling)
        t_generate = time.perf_counter()

        samples = [row for row in rows for _ in range(G)]
        scores = score(rollout.texts, samples, self.rewards)
        rewards = torch.tensor(scores.total, dtype=torch.float32).view(P, G)
        advantages = group_advantages(rewards, scale=tr.scale_rewards).flatten()
        t_score = time.perf_counter()

        stats = self.optimize(rollout, advantages)
        t_end = time.perf_counter()
        self.step += 1

        lengths = rollout.completion_mask.sum(dim=1).float()
        first = scores.columns[:, 0]
        metrics = {
            "step": self.step,
            "reward": float(scores.total.mean()),
            "reward_std": float(scores.total.std()),
            **{f"rewards/{name}": value for name, value in scores.means().items()},
            "accuracy": float(np.nanmean(first)) if not np.isnan(first).all() else 0.0,
            "zero_std_groups": float((rewards.std(dim=1) == 0).float().mean()),
            "completion_length": float(lengths.mean()),
            "completion_length_max": float(lengths.max()),
            "truncated_fraction": float(rollout.truncated.float().mean()),
            **stats,
            "lr": self.scheduler.get_last_lr()[0],
            "reward_failures": sum(scores.failures.values()),
            "time_generate": t_generate - t0,
            "time_score": t_score - t_generate,
            "time_optimize": t_end - t_score,
            "time_step": t_end - t0,
            "tokens_per_s": rollout.num_completion_tokens / (t_end - t0),
        }
        self.runlog.metrics(metrics)
        self.runlog.completions(
            [
                {
                    "step": self.step,
                    "prompt": sample["prompt"][-1]["content"],
                    "answer": sample.get("answer"),
                    "completion": text,
                    "rewards": dict(zip(scores.names, column.tolist(), strict=True)),
                    "total": float(total),
                    "advantage": float(advantage),
                    "length": int(length),
                    "truncated": bool(truncated),
                }
                for sample, text, column, total, advantage, length, truncated in zip(
                    samples, rollout.texts, scores.columns, scores.total, advantages.tolist(), lengths.tolist(), rollout.truncated.tolist(), strict=True
                )
            ]
        )
        return metrics

    def optimize(self, rollout: Rollout, advantages: torch.Tensor) -> dict[str, float]:
        """``num_iterations`` optimizer steps over the batch, each accumulating gradients over micro-batches."""
        tr = self.config.train
        temperature = self.config.rollout.temperature
        weights = grpo_token_weights(rollout.completion_mask.float())
        micro_batches = [slice(s, s + tr.micro_batch_size) for s in range(0, len(advantages), tr.micro_batch_size)]
        old = self._frozen_logprobs(self.model, rollout, micro_batches) if tr.num_iterations > 1 else None
        ref = self._frozen_logprobs(self.reference, rollout, micro_batches) if self.reference is not None else None
        totals: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "ratio": [], "entropy": [], "kl": [], "grad_norm": []}
        self.model.train()
        for _ in range(tr.num_iterations):
            for i, mb in enumerate(micro_batches):
                batch = self._micro_batch(rollout, mb)
                sync = i == len(micro_batches) - 1
                with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model):
                    logprobs, entropy = completion_logprobs(self.model, *batch, temperature=temperature)
                    width = logprobs.shape[1]
                    old_lp = old[mb][:, :width].to(logprobs.device) if old is not None else logprobs.detach()
                    ref_lp = ref[mb][:, :width].to(logprobs.device) if ref is not None else None
                    per_token, stats = clipped_surrogate(logprobs, old_lp, advantages[mb].to(logprobs.device), tr.epsilon, tr.beta, ref_lp)
                    loss = (per_token * weights[mb][:, :width].to(logprobs.device)).sum()
                    self.accelerator.backward(loss)
                mask = batch[3].float()
                totals["loss"].append(loss.item())
                totals["clip_fraction"].append(float(masked_mean(stats["clipped"].float(), mask)))
                totals["ratio"].append(float(masked_mean(stats["ratio"], mask)))
                totals["entropy"].append(float(masked_mean(entropy, mask)))
                if "kl" in stats:
                    totals["kl"].append(float(masked_mean(stats["kl"], mask)))
            if tr.max_grad_norm > 0:
                totals["grad_norm"].append(float(self.accelerator.clip_grad_norm_(self.model.parameters(), tr.max_grad_norm)))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        out = {k: float(np.mean(v)) for k, v in totals.items() if v}
        out["loss"] = float(np.sum(totals["loss"])) / tr.num_iterations
        return out

    def _micro_batch(self, rollout: Rollout, rows: slice) -> tuple[torch.Tensor, ...]:
        """The rows' tensors on the device, with columns that are padding in every row cut away."""
        prompt_mask, completion_mask = rollout.prompt_mask[rows], rollout.completion_mask[rows]
        first = int((prompt_mask.sum(dim=0) > 0).nonzero()[0])
        width = max(int(completion_mask.sum(dim=1).max()), 1)
        device = self.accelerator.device
        return (
            rollout.prompt_ids[rows, first:].to(device),
            prompt_mask[:, first:].to(device),
            rollout.completion_ids[rows, :width].to(device),
            completion_mask[:, :width].to(device),
        )

    @torch.no_grad()
    def _frozen_logprobs(self, model: Any, rollout: Rollout, micro_batches: list[slice]) -> torch.Tensor:
        """Log-probs of the batch under a model that is not being updated now (old policy or reference)."""
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
        for mb in micro_batches:
            logprobs, _ = completion_logprobs(model, *self._micro_batch(rollout, mb), temperature=self.config.rollout.temperature)
            out[mb, : logprobs.shape[1]] = logprobs.float().cpu()
        return out

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, stage: str) -> dict[str, Any]:
        """Greedy accuracy on the held-out split; logged to evals.jsonl with its samples."""
        run = self.config.run
        max_new = run.eval_max_new_tokens or self.config.rollout.max_new_tokens
        result = evaluate(self.engine, self.tokenizer, self.eval_data, self.rewards, max_new, run.eval_batch_size)
        self.runlog.evaluation({"step": self.step, "stage": stage, **result})
        if self.is_main:
            tqdm.write(f"[eval {stage} @ step {self.step}] held-out accuracy {result['accuracy']:.3f} on {result['num_prompts']} prompts")
        return result

    def summary(self) -> dict[str, Any]:
        """Held-out accuracy at each evaluated stage, written to summary.json."""
        evals = read_jsonl(self.run_dir / EVALS)
        summary = {"steps": self.step, "accuracy": {f"{e['stage']}@{e['step']}": e["accuracy"] for e in evals}}
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` under a temporary name and rename it, so a partial one is never resumed."""
        final = self.run_dir / CHECKPOINT_DIR / f"step-{self.step:06d}"
        partial = final.with_name(final.name + ".tmp")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(partial / "model")
            self.tokenizer.save_pretrained(partial / "model")
            torch.save(
                {
                    "step": self.step,
                    "position": self.stream.position,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                },
                partial / "trainer_state.pt",
            )
        self.accelerator.wait_for_everyone()
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, partial / f"rng-{self.accelerator.process_index}.pt")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            kept = sorted((p for p in final.parent.glob("step-*") if _CHECKPOINT_NAME.fullmatch(p.name)), key=lambda p: p.name)
            for old in kept[: -self.config.run.keep_last]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _resume(self) -> Path | None:
        """Restore model, optimizer, scheduler, data position and RNG from the latest complete checkpoint."""
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is None:
            log.warning("--resume: no checkpoint in %s, starting from scratch", self.run_dir)
            return None
        weights = AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict()
        self.accelerator.unwrap_model(self.model).load_state_dict(weights)
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.stream.position = state["step"], state["position"]
        rng = torch.load(checkpoint / f"rng-{self.accelerator.process_index}.pt", weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            for name in (METRICS, COMPLETIONS, EVALS):
                truncate_after(self.run_dir / name, self.step)
        return checkpoint
