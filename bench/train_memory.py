"""Peak memory of a DPO training step on the `small` policy per precision (issue 20): float32,
bf16-mixed and pure bfloat16, each with and without gradient checkpointing, side by side in one
run, and a LoRA adapter DPO step (fp32 base frozen, adapter trained: issue 20's item 2).

    python bench/train_memory.py [--size small] [--pairs 2] [--prompt-tokens 16]
                                 [--response-tokens 32] [--long-pairs 4]
                                 [--long-response-tokens 256] [--steps 2] [--threads 2]
                                 [--device cpu] [--lora-r 8] [--configs float32,float32+gc,...]

A configuration is `<dtype>[+gc][@long]`: `+gc` turns gradient checkpointing on; `@long` runs
it on the long workload (`--long-pairs` pairs of `--long-response-tokens` responses) instead
of the short one, for the rows where activations matter (on a CPU without bf16 matrix
instructions a bf16 step on the long workload would take tens of minutes, so by default only
float32 runs it); its ratio is against `float32@long`. `lora[+gc][@long]`: float32 weights
with a LoRA adapter (`--lora-r`, alpha 2r, every linear layer but the head: the job spec's
`lora` default targets) through `Precision(..., lora=...)`, as a job with `lora` trains: only
the adapter has gradients and AdamW state; its reference (the adapter off) is the same model.

Each configuration runs in a fresh subprocess (a process's high-water mark only grows, and
torch's caches outlive a step): it loads the policy through the trainer's own path
(`rlhf.trainer.precision.Precision.load_causal_lm`: the job's weights dtype, gradient
checkpointing), builds the job's AdamW (`precision.make_optimizer`) and runs `--steps` DPO
optimizer steps (`rlhf.trainer.dpo.train_step`: packed forward under the job's autocast, fused
fp32 head, backward, clipping, AdamW) on `--pairs` synthetic pairs of `--prompt-tokens` prompt
and two `--response-tokens` responses each. The reference log-probs are fixed numbers (a job's
local reference is loaded, used and freed before the policy, and holds one copy of the weights
without gradients: below the training peak).

Measured (CPU): the resident-set high-water mark of the training steps alone — `VmHWM` from
/proc/self/status, reset (`/proc/self/clear_refs` 5) after the model is loaded, so the
loading's transient copies do not count — and what it adds to the RSS of the process before
the model was loaded (imports, tokenizer: the same in every row). The subprocess runs with
MALLOC_MMAP_THRESHOLD_=131072 (glibc returns every freed block above 128 KiB to the system
at once; with its dynamic threshold, freed tensors would linger in the heap and count). Not
tracemalloc: it does not see torch's allocations. On CUDA: `torch.cuda.max_memory_allocated`
over the steps, and the same over the weights alone.

Ratios are of the training memory (peak − pre-load RSS; on CUDA the peak) against float32
without checkpointing on the same workload, from the same run. What to expect: Adam's state (2 × weights) and the
gradients (1 ×) dominate at short sequences — bf16-mixed keeps them fp32 (and autocast caches
a bf16 copy of the weights during a forward), so it saves only activation memory; pure bf16
halves all of it; checkpointing saves activation memory (it grows with tokens per step).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("float32", "float32+gc", "bf16-mixed", "bf16-mixed+gc", "bfloat16", "bfloat16+gc",
           "lora", "float32@long", "float32+gc@long", "lora@long")
#: Rows not measurable yet.
PENDING: dict[str, str] = {}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _words(r: random.Random, n: int) -> str:
    vocab = ("the a red blue green cat dog book song cake park game house apple banana cherry "
             "lemon grape tea milk bread soup very really today now here there yes please").split()
    return " ".join(r.choice(vocab) for _ in range(n))


def child(a: argparse.Namespace) -> dict:
    import torch

    from rlhf.models.loading import load_tokenizer
    from rlhf.trainer.dpo import DPOLossConfig, TokenizedPair, train_step
    from rlhf.trainer.precision import Precision, make_optimizer

    torch.set_num_threads(a.threads)
    dtype, _, gc = a.config.split("@")[0].partition("+")
    lora = None
    if dtype == "lora":  # fp32 base + adapter (the job spec's `lora` with r = --lora-r)
        dtype, lora = "float32", {"r": a.lora_r, "alpha": 2.0 * a.lora_r, "dropout": 0.0,
                                  "target_modules": "all-linear"}
    precision = Precision(dtype, gc == "gc", a.device, lora=lora)
    tok = load_tokenizer(a.model_dir, padding_side="right")
    r = random.Random(0)

    def ids(n: int) -> tuple[int, ...]:
        out = tok.encode(" " + _words(r, 2 * n), add_special_tokens=False)[:n]
        return tuple(out + [tok.eos_token_id] * (n - len(out)))

    pairs = []
    for i in range(a.pairs):
        pair = TokenizedPair(f"p{i}", ids(a.prompt_tokens), ids(a.response_tokens),
                             ids(a.response_tokens))
        pair.ref_chosen, pair.ref_rejected = -3.0 * a.response_tokens, -3.1 * a.response_tokens
        pairs.append(pair)
    cuda = torch.device(a.device).type == "cuda"
    before = _status_kib("VmRSS")
    model = precision.load_causal_lm(a.model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    weights_cuda = torch.cuda.memory_allocated() if cuda else 0
    opt = make_optimizer(model, lr=1e-5)
    loaded = _status_kib("VmRSS")
    reset = _reset_hwm()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cfg = DPOLossConfig(beta=0.1)
    times, losses = [], []
    for step in range(1, a.steps + 1):
        t = time.perf_counter()
        m = train_step(model, opt, [pairs], cfg, pad_id=tok.pad_token_id, max_grad_norm=1.0,
                       step=step, total=a.steps, precision=precision)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(m["loss"])
    out = {
        "config": a.config, "params": n_params, "trainable": n_trainable,
        "pre_load_rss_mib": before / 1024,
        "loaded_rss_mib": loaded / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "hwm_reset": reset, "step_s": min(times), "losses": losses,
        "tokens_per_step": sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)
                               for p in pairs),
    }
    if cuda:
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_weights_mib"] = weights_cuda / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--response-tokens", type=int, default=32)
    p.add_argument("--long-pairs", type=int, default=4)
    p.add_argument("--long-response-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=2, help="≥ 2: AdamW's state exists from step 2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--lora-r", type=int, default=8, help="the lora rows' adapter rank")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--timeout", type=float, default=1800, help="Seconds per configuration.")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        ns = argparse.Namespace(**json.loads(a.child))
        print("RESULT " + json.dumps(child(ns)), flush=True)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(REPO / "services"), str(REPO / "clients"),
                                          os.environ.get("PYTHONPATH", "")])}
    with tempfile.TemporaryDirectory(prefix="train-memory-") as tmp:
        model_dir = Path(tmp) / "policy"
        subprocess.run([sys.executable, "-c", "import sys; from rlhf.models.tiny import "
                        "make_tiny_model; make_tiny_model('policy', sys.argv[1], size=sys.argv[2])",
                        str(model_dir), a.size], check=True, env=env)
        rows = []
        for config in a.configs.split(","):
            if config in PENDING:
                rows.append({"config": config, "pending": PENDING[config]})
                continue
            long = config.endswith("@long")
            args = {"config": config, "model_dir": str(model_dir),
                    "pairs": a.long_pairs if long else a.pairs,
                    "prompt_tokens": a.prompt_tokens,
                    "response_tokens": a.long_response_tokens if long else a.response_tokens,
                    "steps": a.steps, "threads": a.threads, "device": a.device,
                    "lora_r": a.lora_r}
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)],
                                  capture_output=True, text=True, env=env, timeout=a.timeout)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{config} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(line[0][len("RESULT "):])
            row["wall_s"] = time.perf_counter() - t
            rows.append(row)
            print(f"  {config}: done in {row['wall_s']:.0f} s", file=sys.stderr, flush=True)
    _report(a, rows)


def _report(a, rows: list[dict]) -> None:
    from dtype import _cpu_flags  # bench/dtype.py, next to this script

    cuda = a.device.startswith("cuda")
    measured = [r for r in rows if "pending" not in r]
    key = "cuda_peak_mib" if cuda else None

    def train_mib(r: dict) -> float:
        return r[key] if cuda else r["peak_rss_mib"] - r["pre_load_rss_mib"]

    def base(config: str) -> float | None:
        want = "float32@long" if config.endswith("@long") else "float32"
        return next((train_mib(r) for r in measured if r["config"] == want), None)

    first = measured[0] if measured else {}
    longs = [r for r in measured if r["config"].endswith("@long")]
    print(f"DPO step memory, {a.size} policy ({first.get('params', 0) / 1e6:.1f} M parameters), "
          f"{a.pairs} pairs × ({a.prompt_tokens} prompt + 2 × {a.response_tokens} response "
          f"tokens) = {first.get('tokens_per_step', 0)} tokens per step"
          + (f" (@long: {a.long_pairs} pairs × ({a.prompt_tokens} + 2 × "
             f"{a.long_response_tokens}) = {longs[0]['tokens_per_step']} tokens)" if longs else "")
          + f", {a.steps} steps, {a.threads} threads, device {a.device}; CPU flags: "
          f"{_cpu_flags()}")
    if not cuda:
        print(f"pre-load RSS (imports, tokenizer) ≈ {first.get('pre_load_rss_mib', 0):.0f} MiB "
              "in every row; HWM reset after loading: "
              f"{all(r.get('hwm_reset') for r in measured)}")
    head = ("config", "peak MiB" if cuda else "peak RSS MiB",
            "train MiB" if not cuda else "weights MiB", "× fp32", "s/step", "loss step 1 → last")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        if "pending" in r:
            print(f"| {r['config']} | — | — | — | — | {r['pending']} |")
            continue
        mib = train_mib(r)
        ref = base(r["config"])
        ratio = f"{mib / ref:.2f}" if ref else "—"
        second = f"{r['cuda_weights_mib']:.0f}" if cuda else f"{mib:.0f}"
        peak = f"{r['cuda_peak_mib']:.0f}" if cuda else f"{r['peak_rss_mib']:.0f}"
        label = r["config"] + (f" ({r['trainable'] / 1e6:.2f} M trainable)"
                               if r.get("trainable", r["params"]) != r["params"] else "")
        print(f"| {label} | {peak} | {second} | {ratio} | {r['step_s']:.2f} | "
              f"{r['losses'][0]:.4f} → {r['losses'][-1]:.4f} |")


if __name__ == "__main__":
    main()
