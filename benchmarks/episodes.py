"""Completion tokens per second of multi-turn episodes against single-turn completions, same model, same engine.

    python benchmarks/episodes.py --model 360m --prompts 16 --group 8 --turns 4 --turn-tokens 64   # a GPU
    python benchmarks/episodes.py --model tiny --prompts 2 --group 4 --turns 3 --turn-tokens 16     # the CPU

Both sides generate P x G completions of T x K policy tokens with the fast engine on a random-init model of
benchmarks.workload's shapes. The single-turn side samples T x K tokens in one call. The episode side runs T turns of
exactly K tokens through ``rlreason.rollout.episodes.run_episodes``, and after each turn but the last the
environment appends an observation of --observation-tokens tokens; the tokens/s figure counts policy tokens only, as
the single-turn side does. A random-init model never writes a tool call, so each turn is forced to K tokens
(end-of-sequence suppressed) and its last token is read as the end of the message.

Printed: the time of each side, where the episode side's time goes (prefill, decode, the host), and, separately, the
Python tool's cost per turn: the sandbox running one short program for every row at once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import workload  # noqa: E402
from rlreason.rollout.engine import Rollout, SamplingParams  # noqa: E402
from rlreason.rollout.episodes import EpisodeLimits, run_episodes  # noqa: E402
from rlreason.rollout.fast import FastEngine  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ForcedTurns:
    """The engine, each call forced to exactly its max_new_tokens tokens, the last read as the end of the message;
    it adds up the engine's prefill and decode seconds and the context tokens it was given."""

    def __init__(self, engine: FastEngine):
        self.engine, self.eos_ids = engine, engine.eos_ids
        self.prefill_s = self.decode_s = 0.0
        self.calls = self.context_tokens = 0

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams, seeds: list[int] | None = None) -> Rollout:
        forced = SamplingParams(sampling.max_new_tokens, sampling.temperature, min_new_tokens=sampling.max_new_tokens)
        out = self.engine.generate(prompt_ids, n, forced, seeds)
        stats = self.engine.last_stats
        self.prefill_s += stats["prefill_s"]
        self.decode_s += stats["decode_s"]
        self.calls += 1
        self.context_tokens += sum(map(len, prompt_ids))
        out.completion_ids[:, -1] = self.eos_ids[0]
        return out


class FixedObservation:
    """An environment answering every turn with the same text of a given token length."""

    stop = ()

    def __init__(self, text: str):
        self.text = text

    def reset(self, row: dict[str, Any]) -> list[dict[str, str]]:
        return row["prompt"]

    def step(self, state: dict[str, Any], text: str) -> tuple[str, bool]:
        return self.text, False


def observation_text(tokenizer: Any, tokens: int) -> str:
    """Text of exactly ``tokens`` tokens (a digit repeated, as a tool's output might be)."""
    text = " 7" * tokens
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) > tokens:
        text = text[:-2]
    return text


def timed(fn: Any, repeats: int, warmup: int) -> tuple[float, Any]:
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def tool_cost(rows: int, repeats: int) -> float:
    """Seconds for the Python tool to run one short program for each of ``rows`` episodes at once."""
    from tasks.environments import get_environment

    env = get_environment("python_tool")
    states = [{"row": {}, "turn": 1, "turns": []} for _ in range(rows)]
    texts = ["<think>Let me compute.\n```python\nprint(123 * 456)\n```\n"] * rows
    seconds, answers = timed(lambda: env.step_batch(states, texts), repeats, 1)
    if not all("56088" in a[0]["content"] for a in answers):
        raise RuntimeError(f"the Python tool did not answer: {answers[0]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["default", *workload.SHAPES])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--turn-tokens", type=int, default=64)
    parser.add_argument("--observation-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the default model's)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from rlreason.models import load_tokenizer

        tokenizer = load_tokenizer("default")
    from rlreason.data import encode_prompts

    P, G, T, K = args.prompts, args.group, args.turns, args.turn_tokens
    rows = workload.rows(P)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = workload.build_model(args.model, Path(tmp) / "model", tokenizer, dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to("cuda" if cuda else "cpu")
    engine = FastEngine(model, tokenizer)
    seeds = list(range(P * G))
    prompts = encode_prompts(tokenizer, rows)
    single = SamplingParams(T * K, min_new_tokens=T * K)
    single_s, _ = timed(lambda: engine.generate(prompts, G, single, seeds), args.repeats, 1)

    forced = ForcedTurns(engine)
    env = FixedObservation(observation_text(tokenizer, args.observation_tokens))
    limits = EpisodeLimits(T, T * (K + args.observation_tokens))
    episode = lambda: run_episodes(forced, tokenizer, env, rows, G, SamplingParams(K), limits, seeds)  # noqa: E731
    episode()  # warm-up, not counted
    forced.prefill_s = forced.decode_s = 0.0
    forced.calls = forced.context_tokens = 0
    episode_s, rollout = timed(episode, args.repeats, 0)
    generated = int(rollout.loss_mask.sum())
    if generated != P * G * T * K:
        raise RuntimeError(f"expected {P * G * T * K} policy tokens, got {generated}")
    prefill, decode = forced.prefill_s / args.repeats, forced.decode_s / args.repeats
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.model}  P={P} G={G}  {T} turns x {K} tokens, {args.observation_tokens}-token observations  {dtype}  on {device}")
    print("| side | s | policy tok/s | engine calls | prefill (s) | decode (s) | host (s) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| single turn | {single_s:.3f} | {P * G * T * K / single_s:.0f} | 1 | - | - | - |")
    print(f"| episodes | {episode_s:.3f} | {generated / episode_s:.0f} | {forced.calls // args.repeats} | {prefill:.3f} | "
          f"{decode:.3f} | {episode_s - prefill - decode:.3f} |")
    print(f"ratio: episodes run at {single_s / episode_s:.2f}x the single-turn tokens/s; the episode side prefilled "
          f"{forced.context_tokens // args.repeats} context tokens over its turns")
    seconds = tool_cost(P * G, args.repeats)
    print(f"python_tool: {seconds:.3f} s for one program in each of {P * G} episodes (one turn's tool calls)")


if __name__ == "__main__":
    main()
