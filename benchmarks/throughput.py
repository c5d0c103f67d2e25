"""GRPO step throughput of rlreason against TRL's GRPOTrainer: same model, prompts, settings, process.

    python benchmarks/throughput.py --model 360m --prompts 16 --group 8 --max-new-tokens 256      # a GPU
    python benchmarks/throughput.py --model default --prompts 4 --group 8 --max-new-tokens 96     # the CPU

Both sides get the same random-init model (or the default model), the same prompts (two-number sums in the R1 chat
format), the same reward (benchmarks.workload.digit_share), P prompts x G completions per optimizer step, one pass
over the batch (num_iterations 1), no KL (beta 0), the same micro-batch size, the same precision and no gradient
checkpointing. Every completion runs through the update on both sides (rlreason's train.skip_zero_advantage off),
and is forced to exactly --max-new-tokens tokens (end-of-sequence suppressed: ``min_new_tokens`` on both sides),
so completion tokens per second compare like for like.

A step is timed whole: on the rlreason side ``Trainer.train_step`` (sample, score, advantages, optimize, logging);
on the TRL side one optimizer step of ``GRPOTrainer.train`` (generation, scoring, forward/backward of every
micro-batch, optimizer, logging), from one ``on_step_end`` to the next. The first --warmup steps of each side are
not counted. Peak memory over the timed steps: torch's ``max_memory_allocated`` and ``max_memory_reserved`` (with
CUDA graphs only the reserved figure counts what the graphs replay into).

With ``--lora R`` both sides train LoRA adapters (rank R, alpha 2R, no dropout, on every attention and MLP
projection) on the frozen model instead of all its weights: rlreason's ``model.lora``, TRL's ``peft_config``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
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


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def peak_reserved_gb() -> float:
    """What the caching allocator held at most: with CUDA graphs the memory a graph replays into was allocated
    when it was recorded, so only this bound counts it."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else float("nan")


def ceilings(dtype: torch.dtype) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, matmul FLOP/s), measured here: on a GPU in bf16, on the
    CPU in the dtype training computes in (``dtype``), with its threads."""
    if torch.cuda.is_available():
        from benchmarks.gpu_checks import ceilings as measure

        return measure()
    x, a, b = torch.randn(2**26), torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    y = torch.empty_like(x)

    def best_s(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    return 2 * x.numel() * 4 / best_s(lambda: y.copy_(x), 5), 2 * 2048**3 / best_s(lambda: a @ b, 5)


def train_flops(
    model_dir: Path, prompt_lengths: list[int], completion_length: int, group: int, shared_prompt: bool = False
) -> float:
    """FLOPs of one forward + backward over the batch: 6 x body parameters x tokens, the head on completion
    positions only, and causal attention (6 x layers x hidden x length^2 per sequence). ``shared_prompt``: each
    group's prompt once, as rlreason's train.shared_prompt computes it (a completion's attention is then its
    sequence's square less the prompt's)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    kv = (c.num_key_value_heads or c.num_attention_heads) * (c.hidden_size // c.num_attention_heads)
    per_layer = c.hidden_size * (c.hidden_size * 2 + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
    body = c.num_hidden_layers * per_layer
    head = c.vocab_size * c.hidden_size
    lengths = [p + completion_length for p in prompt_lengths for _ in range(group)]
    squares = sum(n * n for n in lengths)
    tokens = sum(lengths)
    if shared_prompt:
        squares -= (group - 1) * sum(p * p for p in prompt_lengths)
        tokens -= (group - 1) * sum(prompt_lengths)
    attention = 6 * c.num_hidden_layers * c.hidden_size * squares
    return 6 * body * tokens + 6 * head * completion_length * len(lengths) + attention


def decode_bytes(model_dir: Path, prompt_lengths: list[int], completion_length: int, group: int) -> float:
    """The fewest bytes generating the batch must read: every decode step reads the bf16 weights once and the KV
    cache it must (each prompt's once, each row's own tokens); over the copy bandwidth, generation's floor."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = c.num_key_value_heads or c.num_attention_heads
    layer = c.hidden_size * (c.num_attention_heads * head_dim * 2 + 2 * kv * head_dim) + 3 * c.hidden_size * c.intermediate_size
    heads = 1 if getattr(c, "tie_word_embeddings", False) else 2
    weight_bytes = 2 * (c.num_hidden_layers * layer + heads * c.vocab_size * c.hidden_size)
    kv_token_bytes = 2 * c.num_hidden_layers * kv * head_dim * 2
    rows = len(prompt_lengths) * group
    return sum(weight_bytes + kv_token_bytes * (sum(prompt_lengths) + rows * t) for t in range(completion_length))


def require_updates(side: str, bad: int, steps: int) -> None:
    """Refuse to time steps whose update was skipped or non-finite: such a step leaves out work (the optimizer)
    and is no training step."""
    if bad:
        raise RuntimeError(f"{side}: {bad} of {steps} steps had a non-finite loss or gradient norm; their times would not be a training step's")


# ------------------------------------------------------------------------------------------------ rlreason


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _register_bench_task(rows: list[dict[str, Any]]) -> None:
    """A task named throughput_bench serving ``rows``; built-in tasks are not imported (their deps may be absent)."""
    from datasets import Dataset

    import tasks.registry as registry

    registry._builtins_loaded = True  # the benchmark needs only its own task

    @registry.task("throughput_bench")
    def _build(split: str, size: int, seed: int = 0, **_: Any):
        return Dataset.from_list(rows[:size])


def run_rlreason(args: argparse.Namespace, model_dir: Path, rows: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    from rlreason.config import (
        Config,
        LoraConfig,
        ModelConfig,
        RewardConfig,
        RolloutConfig,
        RunConfig,
        TaskConfig,
        TrainConfig,
    )
    from rlreason.training.trainer import Trainer

    _register_bench_task(rows)
    P, G, L = args.prompts, args.group, args.max_new_tokens
    lora = LoraConfig(r=args.lora, alpha=2.0 * args.lora, dropout=0.0, target_modules=list(LORA_TARGETS)) if args.lora else None
    config = Config(
        model=ModelConfig(name=str(model_dir), dtype=args.dtype, lora=lora),
        task=TaskConfig(name="throughput_bench", train_size=len(rows), eval_size=P),
        rewards=[RewardConfig("benchmarks.workload:digit_share", 1.0)],
        rollout=RolloutConfig(prompts_per_step=P, group_size=G, max_new_tokens=L, temperature=1.0, engine=args.engine),
        train=TrainConfig(
            # async: one step more, so that every timed step trains while the next one's batch is sampled
            steps=args.warmup + args.steps + int(args.async_rollouts),
            async_rollouts=args.async_rollouts,
            learning_rate=1e-6,
            micro_batch_size=args.micro_batch,
            loss_type="grpo",
            bf16="true" if args.bf16 else "false",
            gradient_checkpointing=False,
            compile=args.compile,
            cuda_graphs=args.cuda_graphs,
            shared_prompt=args.shared_prompt,
            skip_zero_advantage=False,
            **({"packing": args.packing} if args.packing is not None else {}),
        ),
        run=RunConfig(output_dir=str(work / "rlreason-run"), overwrite=True, progress=False, eval_before=False),
    )
    trainer = Trainer(config)
    trainer.sampling.min_new_tokens = L  # every completion exactly L tokens, as on the TRL side
    times, parts, skipped = [], [], 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            reset_memory()
        sync()
        start = time.perf_counter()
        metrics = trainer.train_step()
        sync()
        skipped += int(metrics["skipped_updates"])
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
            parts.append(metrics)
    trainer.close()  # the batch in flight (async) sampled to the end, before the memory is read
    require_updates("rlreason", skipped, args.warmup + args.steps)
    tokens = [m["completion_length"] * P * G for m in parts]
    result = {
        "side": f"rlreason ({args.engine}{', async' if args.async_rollouts else ''})",
        "step_s": statistics.median(times),
        "tokens_per_step": statistics.median(tokens),
        "generate_s": statistics.median(m["time_generate"] for m in parts),
        "optimize_s": statistics.median(m["time_optimize"] for m in parts),
        "peak_gb": peak_memory_gb(),
        "reserved_gb": peak_reserved_gb(),
        "times": times,
    }
    engine_stats = getattr(trainer.engine, "last_stats", None)
    if engine_stats:
        result["engine"] = dict(engine_stats)
    if args.profile:  # after the timed steps' numbers are read: the profiled step would change them
        profile_step(trainer)
    del trainer
    reset_memory()
    return result


def profile_step(trainer: Any) -> None:
    """One more step under torch.profiler, its two phases apart (sampling and scoring; the rest of the step): the
    ops that take each phase's time, and how often the host waited on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    phases = {"sample": profile(activities=activities), "train": profile(activities=activities)}
    walls: dict[str, float] = {}
    sample_groups = trainer._sample_groups

    def sampled(*args: Any, **kwargs: Any) -> Any:  # the sampling profile ends, and the training one starts, here
        sync()
        walls["sample"] = time.perf_counter()
        phases["sample"].start()
        out = sample_groups(*args, **kwargs)
        sync()
        phases["sample"].stop()
        walls["train"] = time.perf_counter()
        walls["sample"] = walls["train"] - walls["sample"]
        phases["train"].start()
        return out

    trainer._sample_groups = sampled
    trainer.train_step()
    sync()
    phases["train"].stop()
    walls["train"] = time.perf_counter() - walls["train"]
    del trainer._sample_groups
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name, prof in phases.items():
        events = prof.key_averages()
        print(f"--- profile of the {name} phase: {walls[name] * 1e3:.0f} ms under the profiler", flush=True)
        print(events.table(sort_by=sort, row_limit=40, max_name_column_width=70), flush=True)
        waits = {e.key: e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync", "cudaMalloc", "cudaFree")}
        print(f"host waits and allocations: {waits}", flush=True)


# ------------------------------------------------------------------------------------------------ TRL


def run_trl(args: argparse.Namespace, model_dir: Path, rows: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    P, G, L = args.prompts, args.group, args.max_new_tokens
    steps = args.warmup + args.steps
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    config = GRPOConfig(
        output_dir=str(work / "trl-run"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=P * G // args.micro_batch,
        num_generations=G,
        max_completion_length=L,
        generation_kwargs={"min_new_tokens": L},  # every completion exactly L tokens, as on the rlreason side
        temperature=1.0,
        top_p=1.0,
        learning_rate=1e-6,
        beta=0.0,
        num_iterations=1,
        loss_type="grpo",
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args_, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())
            if len(self.ends) == args.warmup:  # peak memory over the timed steps only
                reset_memory()

    clock = Clock()
    peft_config = None
    if args.lora:
        import peft

        peft_config = peft.LoraConfig(
            r=args.lora, lora_alpha=2 * args.lora, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM"
        )
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows[: steps * P]])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=workload.digit_share,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
        peft_config=peft_config,
    )
    generate_times: list[float] = []
    inner = trainer._generate_single_turn

    def timed_generate(*a, **kw):
        sync()
        start = time.perf_counter()
        out = inner(*a, **kw)
        sync()
        generate_times.append(time.perf_counter() - start)
        return out

    trainer._generate_single_turn = timed_generate
    sync()
    start = time.perf_counter()
    trainer.train()
    ends = [start, *clock.ends]
    times = [b - a for a, b in zip(ends[:-1], ends[1:], strict=True)][args.warmup :]
    completion_lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    require_updates("TRL", sum(not math.isfinite(n) for n in norms), len(norms))
    result = {
        "side": "TRL " + __import__("trl").__version__,
        "step_s": statistics.median(times),
        "tokens_per_step": statistics.median(completion_lengths[args.warmup :]) * P * G,
        "generate_s": statistics.median(generate_times[args.warmup :]),
        "optimize_s": float("nan"),
        "peak_gb": peak_memory_gb(),
        "reserved_gb": peak_reserved_gb(),
        "times": times,
    }
    result["optimize_s"] = result["step_s"] - result["generate_s"]
    del trainer, model
    reset_memory()
    return result


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", choices=["default", *workload.SHAPES])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 16 on a GPU, 8 on the CPU")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    parser.add_argument("--engine", default="fast", help="rlreason's rollout.engine")
    parser.add_argument("--packing", default=None, help="rlreason's train.packing (default: the config default)")
    parser.add_argument("--compile", action="store_true", help="rlreason's train.compile (torch.compile the decoder stack)")
    parser.add_argument("--cuda-graphs", action="store_true", help="rlreason's train.cuda_graphs (with --compile: the passes replayed as CUDA graphs)")
    parser.add_argument("--bf16", nargs="?", const="true", default="false", choices=["true", "false", "auto"],
                        help="on the CPU: bf16 autocast on both sides; auto: where the CPU has bf16 instructions (default float32; GPUs: always)")
    parser.add_argument("--shared-prompt", action="store_true", help="rlreason's train.shared_prompt (each group's prompt computed once)")
    parser.add_argument("--head-chunk-mib", type=int, default=None, help="on a GPU: rlreason's head chunk, in MiB of float32 logits (default: logprobs.GPU_CHUNK_BYTES)")
    parser.add_argument("--profile", action="store_true", help="profile one more rlreason step and print where its time goes")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (alpha 2R) on every projection, both sides (default 0: full fine-tuning)")
    parser.add_argument("--sides", default="rlreason,trl",
                        help="any of rlreason, rlreason-async (train.async_rollouts: the next batch sampled while this one "
                        "trains, one step off-policy) and trl, each run in turn")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the default model's)")
    parser.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    args.dtype = "bfloat16" if cuda else "float32"
    from rlreason.models import bf16_available

    args.bf16 = cuda or args.bf16 == "true" or (args.bf16 == "auto" and bf16_available())
    args.micro_batch = args.micro_batch or (16 if cuda else 8)
    if args.head_chunk_mib:
        from rlreason.training import logprobs

        logprobs.GPU_CHUNK_BYTES = args.head_chunk_mib << 20
    if args.packing is not None and args.packing.lower() in ("true", "false"):
        args.packing = args.packing.lower() == "true"

    from transformers import AutoTokenizer

    if args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from rlreason.models import load_tokenizer

        tokenizer = load_tokenizer("default")
    from tasks.prompts import render

    rows = workload.rows(64 + (args.warmup + args.steps) * args.prompts)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = workload.build_model(args.model, work / "model", tokenizer, getattr(torch, args.dtype))
        prompt_lengths = [len(tokenizer(render(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]) for r in rows[: args.prompts]]
        flops = train_flops(model_dir, prompt_lengths, args.max_new_tokens, args.group)
        shared_flops = train_flops(model_dir, prompt_lengths, args.max_new_tokens, args.group, shared_prompt=True)
        read_bytes = decode_bytes(model_dir, prompt_lengths, args.max_new_tokens, args.group)
        for side in args.sides.split(","):
            torch.manual_seed(0)
            if side == "trl":
                results.append(run_trl(args, model_dir, rows, work))
            else:
                side_args = argparse.Namespace(**vars(args), async_rollouts=side == "rlreason-async")
                results.append(run_rlreason(side_args, model_dir, rows, work))
            r = results[-1]
            print(f"  {r['side']}: step {r['step_s']:.3f} s  ({', '.join(f'{t:.3f}' for t in r['times'])})", flush=True)
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    bandwidth, peak = ceilings(torch.bfloat16 if args.bf16 else torch.float32)
    print(f"\n{args.model}{f'  LoRA r={args.lora}' if args.lora else ''}  P={args.prompts} G={args.group} L={args.max_new_tokens}  micro-batch {args.micro_batch}  "
          f"{args.dtype}  on {device}")
    print("| side | step (s) | completion tok/s | generate (s) | train (s) | train MFU | peak mem (GiB) | peak reserved (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        r["tokens_per_s"] = r["tokens_per_step"] / r["step_s"]
        computed = shared_flops if args.shared_prompt and r["side"].startswith("rlreason") else flops
        r["train_mfu"] = computed / r["optimize_s"] / peak  # of the FLOPs this side computes
        print(f"| {r['side']} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['generate_s']:.2f} | "
              f"{r['optimize_s']:.2f} | {r['train_mfu']:.1%} | {r['peak_gb']:.2f} | {r['reserved_gb']:.2f} |")
    if any("async" in r["side"] for r in results):
        print("async: generate is the wait for the batch sampled beside the step before; train ran beside the next "
              "batch's sampling, and its MFU counts that time")
    for r in results:
        e = r.get("engine")
        if e and e.get("decode_steps"):
            per_step = e["decode_s"] / e["decode_steps"]
            floor = (e["weight_bytes"] + e["kv_bytes_per_step"]) / bandwidth
            r["decode"] = {"ms_per_step": per_step * 1e3, "floor_ms": floor * 1e3, "prefill_s": e["prefill_s"]}
            print(f"{r['side']}: decode {per_step * 1e3:.2f} ms/step ({e['rows']} rows), bandwidth floor {floor * 1e3:.3f} ms "
                  f"(weights {e['weight_bytes'] / 1e9:.2f} GB + KV {e['kv_bytes_per_step'] / 1e9:.2f} GB per step at "
                  f"{bandwidth / 1e9:.0f} GB/s): {per_step / floor:.1f}x the floor; prefill {e['prefill_s'] * 1e3:.0f} ms; "
                  f"graph capture {e.get('capture_s', 0) * 1e3:.0f} ms; kernels {e.get('kernels')}")
        elif "TRL" in r["side"]:
            print(f"{r['side']}: generate {r['generate_s'] / args.max_new_tokens * 1e3:.2f} ms per token position (prefill included)")
    matmul = "bf16" if args.bf16 else "float32"
    print(f"ceilings measured here: copy {bandwidth / 1e9:.1f} GB/s, {matmul} matmul {peak / 1e12:.2f} TFLOP/s; "
          f"train FLOPs per step {flops / 1e12:.2f} TFLOP"
          + (f" ({shared_flops / 1e12:.2f} as rlreason computes them, each group's prompt once)" if args.shared_prompt else ""))
    generation, training = read_bytes / bandwidth, flops / peak
    floor = generation + training
    print(f"\nfloor: generation {generation / args.max_new_tokens * 1e3:.3f} ms x {args.max_new_tokens} tokens + "
          f"training {flops / 1e12:.2f} TFLOP at {peak / 1e12:.2f} TFLOP/s = {floor:.3f} s/step"
          + (" (the floor's training counts every completion's prompt)" if args.shared_prompt else ""))
    print("| side | step (s) | floor (s) | step / floor | generate / its floor | train / its floor |")
    print("|---|---|---|---|---|---|")
    for r in results:
        r["floor"] = {"step_s": floor, "generate_s": generation, "train_s": training}
        print(f"| {r['side']} | {r['step_s']:.2f} | {floor:.2f} | {r['step_s'] / floor:.1f}x | "
              f"{r['generate_s'] / generation:.1f}x | {r['optimize_s'] / training:.1f}x |")
    trl = next((r for r in results if "TRL" in r["side"]), None)
    for r in results:
        if trl is not None and r is not trl:
            print(f"ratio ({r['side']} / TRL tokens per s): {r['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"args": {k: v for k, v in vars(args).items()}, "device": device, "results": results}) + "\n")


if __name__ == "__main__":
    main()
