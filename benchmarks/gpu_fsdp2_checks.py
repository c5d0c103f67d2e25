"""On one CUDA GPU: the fast engine and checkpoints under FSDP2. Run through accelerate:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 1 --mixed_precision no \\
        benchmarks/gpu_fsdp2_checks.py

A tiny random-init llama is built locally (tests/conftest.py's char tokenizer and config, copied here so no pytest
is needed; nothing is downloaded).
Prints one PASS/FAIL line per check and exits 1 on any FAIL:
  1. under FSDP2 (DTensor parameters) the fast engine draws exactly the tokens of the fast engine on an unsharded
     copy of the same weights, for fixed seeds (greedy and sampled), and keeps no weight copy after a generate;
  2. `rlreason train` under FSDP2, 2 steps straight vs 1 step + a fresh process resuming from its checkpoint:
     the same step-2 reward, loss, grad_norm (and completions) and the same final weights;
  3. the checkpoints load with plain AutoModelForCausalLM.from_pretrained and hold the trained weights: in this
     process, one optimizer step on the sharded model, save_checkpoint, and the saved tensors equal the gathered
     live ones; the runs' final checkpoints differ from the initial weights; `rlreason export` loads too;
  4. the resumed run's sharded checkpoint is refused by an unsharded launch with one line (exit 2).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

FAILED: list[str] = []

# tests/conftest.py's tokenizer and tiny llama (conftest imports pytest, which the GPU image may lack)
SPECIAL = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(directory: Path):
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL + list(dict.fromkeys(string.printable)))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|end|>", pad_token="<|end|>", unk_token="<unk>",
        additional_special_tokens=SPECIAL[1:4],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_config(vocab_size: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=eos_id, pad_token_id=eos_id,
        bos_token_id=eos_id, tie_word_embeddings=True,
    )


def sevens(completions: list[str], samples: list[dict]) -> list[float]:
    """The runs' reward (conftest's): the share of '7' characters in the completion."""
    return [c.count("7") / len(c) if c else 0.0 for c in completions]


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILED.append(name)


def build_model(directory: Path) -> Path:
    """conftest's tiny llama (2 layers, hidden 64, tied embeddings), its weights scaled up so the distributions are
    sharp enough for EOS to appear (compaction runs)."""
    tokenizer = build_char_tokenizer(directory)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(len(tokenizer), tokenizer.eos_token_id))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    model.save_pretrained(directory)
    return directory


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


# ---------------------------------------------------------------- 1 and 3a: in this process

def check_engine_and_save(model_dir: Path, work: Path) -> None:
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from rlreason.rollout.engine import SamplingParams
    from rlreason.rollout.fast import FastEngine
    from rlreason.rollout.fast_weights import is_sharded
    from rlreason.training.checkpoint import Checkpointed, full_weights, save_checkpoint

    accelerator = Accelerator()
    report("launched under FSDP2", accelerator.distributed_type.name == "FSDP", str(accelerator.distributed_type))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    report("model parameters are DTensors", is_sharded(accelerator.unwrap_model(model)))

    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("12+7=", "Hello, wor", "abc", "What is 3*4?")]
    for kernels in ("torch", "triton"):
        try:
            sharded_engine = FastEngine(accelerator.unwrap_model(model), tokenizer, kernels=kernels)
            plain_engine = FastEngine(plain, tokenizer, kernels=kernels)
        except Exception as exc:  # noqa: BLE001 - reported, the other checks still run
            report(f"engine {kernels}: built", False, repr(exc))
            continue
        report(f"engine {kernels}: frees its copies between calls", sharded_engine.weights.layers is None)
        for name, sampling in [
            ("greedy", SamplingParams(max_new_tokens=32, greedy=True)),
            ("sampled", SamplingParams(max_new_tokens=32, temperature=1.0)),
            ("top-k/top-p", SamplingParams(max_new_tokens=32, temperature=0.7, top_k=20, top_p=0.9)),
        ]:
            seeds = list(range(100, 100 + 4 * len(prompts)))
            for call in range(2):  # the second call gathers again into freshly allocated copies
                a = sharded_engine.generate(prompts, 4, sampling, seeds)
                b = plain_engine.generate(prompts, 4, sampling, seeds)
                same = torch.equal(a.completion_ids, b.completion_ids)
                lp = float((a.logprobs - b.logprobs).abs().max()) if a.logprobs.shape == b.logprobs.shape else float("inf")
                report(
                    f"engine {kernels} {name} call {call + 1}: FSDP2 tokens == unsharded tokens",
                    same and lp < 1e-5,
                    f"{a.completion_mask.sum().item():.0f} tokens, log-prob max diff {lp:.2e}",
                )
        report(f"engine {kernels}: no copy kept after generate", sharded_engine.weights.layers is None)
        del sharded_engine, plain_engine

    # 3a: one optimizer step on the sharded model, then its checkpoint against the gathered live weights
    model.train()
    ids = torch.tensor([prompts[0] * 4], device=accelerator.device)
    loss = model(input_ids=ids, labels=ids).loss
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    live = full_weights(accelerator, model)
    parts = Checkpointed(accelerator, model, tokenizer, optimizer, scheduler)
    checkpoint = save_checkpoint(work / "inproc", 1, 0, parts, keep_last=1)
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    d, moved = max_diff(loaded, live), max_diff(loaded, initial)
    report("checkpoint (in process) == gathered live weights", d == 0.0 and moved > 0, f"max diff {d:.2e}, moved {moved:.2e}")
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    moments = state["optimizer"].get("state", {})
    whole = all(type(v["exp_avg"]) is torch.Tensor and v["exp_avg"].shape == live[k].shape for k, v in moments.items())
    report("checkpoint optimizer state is full (moments whole, by parameter name)",
           state.get("sharded") is True and len(moments) > 0 and whole, f"{len(moments)} entries")
    accelerator.wait_for_everyone()
    accelerator.free_memory()


# ---------------------------------------------------------------- 2, 3b, 4: `rlreason train` in fresh processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without what accelerate launch set for it, so a child launches on its own."""
    drop = ("ACCELERATE_", "FSDP_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_",
            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def train(config: Path, run_dir: Path, steps: int, resume: bool = False, launcher: str = "fsdp2") -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / f"configs/accelerate/{launcher}.yaml"),
        "--num_processes", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
        "-m", "rlreason.train", str(config), f"run.output_dir={run_dir}", f"train.steps={steps}",
    ] + (["--resume"] if resume else [])
    done = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    if done.returncode != 0 and launcher == "fsdp2":
        print(f"--- {' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}", flush=True)
    return done


def check_resume(model_dir: Path, work: Path) -> None:
    import yaml

    config = work / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": str(model_dir)},
        "task": {"name": "arithmetic", "train_size": 64, "eval_size": 8},
        "rewards": [{"name": "benchmarks.gpu_fsdp2_checks:sevens"}],
        "rollout": {"engine": "fast", "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 16},
        "train": {"steps": 2, "learning_rate": 1e-3, "micro_batch_size": 8, "num_iterations": 2, "bf16": "false"},
        "sft": {"steps": 0},
        "run": {"save_every": 1, "keep_last": 2, "eval_before": False, "progress": False},
    }))
    straight, resumed = work / "straight", work / "resumed"
    ok = train(config, straight, 2).returncode == 0
    ok = ok and train(config, resumed, 1).returncode == 0
    ok = ok and train(config, resumed, 2, resume=True).returncode == 0
    report("runs: 2 steps straight; 1 step, then resumed to 2 in a fresh process", ok)
    if not ok:
        return
    rows = lambda run: {m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}  # noqa: E731
    a, b = rows(straight), rows(resumed)
    report("resumed log has steps 1 and 2", sorted(b) == [1, 2], str(sorted(b)))
    for key in ("reward", "loss", "grad_norm"):
        x, y = a[2].get(key), b.get(2, {}).get(key)
        close = x is not None and y is not None and abs(x - y) <= 1e-4 * max(1.0, abs(x))
        report(f"step 2 {key}: resumed == straight", close, f"{x} vs {y}")
    texts = lambda run: [r["completion"] for r in map(json.loads, (run / "completions.jsonl").read_text().splitlines()) if r["step"] == 2]  # noqa: E731
    report("step 2 completions: resumed == straight", texts(straight) == texts(resumed))

    # 3b: the final checkpoints load as plain models, hold trained weights, and agree
    final = lambda run: AutoModelForCausalLM.from_pretrained(run / "checkpoints" / "step-000002" / "model").state_dict()  # noqa: E731
    wa, wb = final(straight), final(resumed)
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    d, moved = max_diff(wa, wb), max_diff(wa, initial)
    report("step 2 weights: resumed == straight (plain from_pretrained)", d <= 1e-6, f"max diff {d:.2e}")
    report("step 2 weights moved from the initial ones", moved > 0, f"max diff {moved:.2e}")
    exported = work / "exported"
    done = subprocess.run([sys.executable, "-m", "rlreason", "export", str(straight), str(exported)], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        d = max_diff(AutoModelForCausalLM.from_pretrained(exported).state_dict(), wa)
        report("rlreason export loads with from_pretrained, same weights", d == 0.0, f"max diff {d:.2e}")
    else:
        report("rlreason export", False, done.stderr[-2000:])

    # 4: an unsharded launch refuses the sharded checkpoint in one line (rlreason exits 2; accelerate launch,
    # seeing its child fail, exits non-zero itself)
    done = train(config, resumed, 3, resume=True, launcher="single_gpu")
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("config error:")]
    report("unsharded resume of a sharded checkpoint refused in one line", done.returncode != 0 and len(lines) == 1
           and "sharded" in lines[0], lines[0] if lines else f"exit {done.returncode}: {done.stderr[-1000:]}")


def main() -> int:
    if not torch.cuda.is_available():
        print("FAIL needs a CUDA GPU")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        try:
            check_engine_and_save(model_dir, work)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            report("in-process checks", False, repr(exc))
        check_resume(model_dir, work)
    print(f"{'ALL PASS' if not FAILED else f'{len(FAILED)} FAILED: ' + '; '.join(FAILED)}", flush=True)
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
