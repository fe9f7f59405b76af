"""DPO training step: ours vs. TRL's `DPOTrainer`, the same work, side by side in one run.

    python bench/dpo.py [--size small] [--batch-size 8] [--max-length 64] [--steps 16]
                        [--warmup 2] [--lr 1e-5] [--beta 0.1] [--threads 1]

Both sides get, fresh from the same directories:
  policy     a tiny-model `--size` Qwen2 (seed 0), fp32, no gradient checkpointing, no dropout
  reference  another `--size` checkpoint (seed 1), so the step-0 loss is not trivially log 2
  pairs      the same synthetic (prompt, chosen, rejected) texts, in the same order (TRL:
             `train_sampling_strategy="sequential"`), tokenized the same way (checked: every
             pair's prompt / chosen / rejected token ids are compared), no row longer than
             `--max-length`
  optimizer  torch AdamW (fused kernel, TRL's default `adamw_torch_fused`), same lr / betas /
             eps / weight decay, constant lr, clip norm 1.0,
             `--batch-size` pairs per step, no gradient accumulation
  reference  log-probs precomputed once per pair before training on both sides (TRL:
             `precompute_ref_log_probs=True`, its `ref_model` dropped after the precompute as it
             is never used again; ours: cached on each pair, the reference model freed)
  loss       sigmoid DPO, beta = `--beta`
  threads    `--threads` torch intra-op threads on both sides (default 1: on a small shared
             machine torch's default spins against other processes)
Each side runs in its own subprocess (peak RSS is its own). They set up concurrently, then run
in lockstep: one optimizer step of one side at a time, alternating which side goes first, so
both see the same background load and never compete with each other. A step is timed from just
before the forward pass to just after the optimizer step (TRL: `on_step_begin` → `on_step_end`,
which leaves its data loading outside the window; ours includes building the batch tensors).
pairs/s = timed pairs / the sum of the timed steps, after `--warmup` untimed steps. The step-0
loss (first batch, initial weights) of the two sides must agree within 1e-5.
Target: ours ≥ 1.0× TRL's pairs/s at ≤ TRL's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lockstep import Gate  # bench/ is the script's directory: on sys.path

LOSS_TOL = 1e-5


# ------------------------------------------------------------------------------------------------
# Shared set-up
# ------------------------------------------------------------------------------------------------


def make_pairs(n: int, seed: int, max_length: int) -> list[dict]:
    """Synthetic preference pairs from the tiny models' corpus that fit in `max_length` tokens."""
    from rlhf.models.tiny import make_tokenizer, synthetic_corpus

    tok = make_tokenizer()
    lines = [line for line in synthetic_corpus() if 20 <= len(line) <= 160]
    rng = random.Random(seed)
    out: list[dict] = []
    while len(out) < n:
        prompt = rng.choice(lines)
        chosen, rejected = " " + rng.choice(lines), " " + rng.choice(lines)
        longest = max(len(tok.encode(prompt + r, add_special_tokens=False)) + 1  # + eos
                      for r in (chosen, rejected))
        if longest <= max_length:
            out.append({"id": f"p{len(out)}", "prompt": prompt, "chosen": chosen,
                        "rejected": rejected})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------
# Workers (one per subprocess)
# ------------------------------------------------------------------------------------------------


def run_ours(a: argparse.Namespace) -> dict:
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.trainer.dpo import (
        DPOLossConfig,
        LocalReference,
        attach_reference_logps,
        encode_pairs,
        make_optimizer,
        train_step,
    )

    torch.manual_seed(0)
    work = Path(a.work)
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    tok = load_tokenizer(work / "policy", padding_side="right")
    encoded, skipped = encode_pairs(tok, pairs, max_length=a.max_length)
    assert skipped == 0 and len(encoded) == len(pairs)

    t0 = time.perf_counter()
    ref = LocalReference(work / "reference", batch_items=2 * a.batch_size)
    attach_reference_logps(encoded, ref)
    ref.close()
    del ref
    precompute_s = time.perf_counter() - t0

    model = load_causal_lm(work / "policy")
    model.eval()
    opt = make_optimizer(model, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    cfg = DPOLossConfig("sigmoid", beta=a.beta)
    pad_id = tok.pad_token_id
    gate = Gate(a.cmd_fd, a.reply_fd)
    first_loss = None
    for step in range(a.warmup + a.steps):
        lo = (step * a.batch_size) % len(encoded)
        batch = encoded[lo : lo + a.batch_size]
        gate.begin()
        m = train_step(model, opt, [batch], cfg, pad_id=pad_id, max_grad_norm=1.0)
        gate.end()
        if first_loss is None:
            first_loss = m["loss"]
    return {
        "side": "ours",
        "first_loss": first_loss,
        "step_s": gate.times[a.warmup :],
        "precompute_s": precompute_s,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": [[list(p.prompt_ids), list(p.chosen_ids), list(p.rejected_ids)] for p in encoded],
        "ref": [[p.ref_chosen, p.ref_rejected] for p in encoded],
    }


def run_trl(a: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    work = Path(a.work)
    pairs = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    tok = load_tokenizer(work / "policy", padding_side="right")
    model = load_causal_lm(work / "policy")
    ref_model = load_causal_lm(work / "reference")

    gate = Gate(a.cmd_fd, a.reply_fd)

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gate.begin()

        def on_step_end(self, args, state, control, **kwargs):
            gate.end()

    losses: list[float] = []

    class Trainer(DPOTrainer):
        def compute_loss(self, *args, **kwargs):
            out = super().compute_loss(*args, **kwargs)
            loss = out[0] if isinstance(out, tuple) else out
            if not losses:
                losses.append(float(loss.detach()))
            return out

    total = a.warmup + a.steps
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = DPOConfig(
            output_dir=out_dir, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
            per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
            max_steps=total, logging_steps=total, seed=0, dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            learning_rate=a.lr, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
            weight_decay=a.weight_decay, optim="adamw_torch_fused", lr_scheduler_type="constant",
            warmup_steps=0, max_grad_norm=1.0,
            bf16=False, fp16=False, gradient_checkpointing=False,
            max_length=a.max_length, loss_type=["sigmoid"], beta=a.beta,
            precompute_ref_log_probs=True, precompute_ref_batch_size=a.batch_size,
        )
        t0 = time.perf_counter()
        trainer = Trainer(model=model, ref_model=ref_model, args=cfg, train_dataset=ds,
                          processing_class=tok, callbacks=[Clock()])
        precompute_s = time.perf_counter() - t0
        # Precomputed: the reference model is never used again; ours frees it too.
        trainer.ref_model = None
        del ref_model
        trainer.train()
        data = trainer.train_dataset
    return {
        "side": "trl",
        "first_loss": losses[0],
        "step_s": gate.times[a.warmup :],
        "precompute_s": precompute_s,
        "peak_rss_mb": peak_rss_mb(),
        "tokens": [[r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]] for r in data],
        "ref": [[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in data],
    }


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def start_worker(a: argparse.Namespace, side: str, out: Path, log: Path):
    """Start one side; returns (process, command pipe, reply pipe)."""
    cmd_r, cmd_w = os.pipe()
    rep_r, rep_w = os.pipe()
    argv = [sys.executable, __file__, "--worker", side, "--work", a.work, "--out", str(out),
            "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
            "--steps", str(a.steps), "--warmup", str(a.warmup), "--lr", str(a.lr),
            "--beta", str(a.beta), "--weight-decay", str(a.weight_decay),
            "--threads", str(a.threads),
            "--cmd-fd", str(cmd_r), "--reply-fd", str(rep_w)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen(argv, pass_fds=(cmd_r, rep_w), stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    os.close(cmd_r)
    os.close(rep_w)
    return proc, os.fdopen(cmd_w, "w", buffering=1), os.fdopen(rep_r, "r")


def lockstep(a: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Run both sides, one step at a time, alternating which side goes first."""
    sides = {}
    for side in ("ours", "trl"):
        sides[side] = start_worker(a, side, work / f"{side}.json", work / f"{side}.log")
    try:
        for step in range(a.warmup + a.steps):
            order = ("ours", "trl") if step % 2 == 0 else ("trl", "ours")
            for side in order:
                proc, cmd, reply = sides[side]
                line = reply.readline().strip()
                if line != "ready":
                    raise SystemExit(f"{side} worker failed before step {step}:\n"
                                     + (work / f"{side}.log").read_text()[-4000:])
                cmd.write("go\n")
                line = reply.readline().strip()
                if not line.startswith("done"):
                    raise SystemExit(f"{side} worker failed in step {step}:\n"
                                     + (work / f"{side}.log").read_text()[-4000:])
        results = {}
        for side, (proc, cmd, reply) in sides.items():
            if proc.wait(timeout=600) != 0:
                raise SystemExit(f"{side} worker exited {proc.returncode}:\n"
                                 + (work / f"{side}.log").read_text()[-4000:])
            results[side] = json.loads((work / f"{side}.json").read_text())
        return results
    finally:
        for proc, cmd, reply in sides.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both sides")
    ap.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--cmd-fd", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--reply-fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        result = (run_ours if a.worker == "ours" else run_trl)(a)
        Path(a.out).write_text(json.dumps(result))
        return

    from rlhf.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        make_tiny_model("policy", work / "policy", size=a.size, seed=0)
        make_tiny_model("policy", work / "reference", size=a.size, seed=1)
        n_pairs = a.batch_size * (a.warmup + a.steps)
        pairs = make_pairs(n_pairs, seed=7, max_length=a.max_length)
        (work / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        a.work = str(work)
        print(f"DPO step race: size={a.size} pairs={n_pairs} batch={a.batch_size} "
              f"max_length={a.max_length} warmup={a.warmup} timed steps={a.steps} lr={a.lr} "
              f"beta={a.beta} torch threads={a.threads}", flush=True)
        res = lockstep(a, work)

    ours, trl = res["ours"], res["trl"]
    if ours["tokens"] != trl["tokens"]:
        bad = next(i for i, (x, y) in enumerate(zip(ours["tokens"], trl["tokens"])) if x != y)
        raise SystemExit(f"FAIL: pair {bad} is tokenized differently: ours {ours['tokens'][bad]} "
                         f"TRL {trl['tokens'][bad]}")
    ref_diff = max(abs(x - y) for po, pt in zip(ours["ref"], trl["ref"]) for x, y in zip(po, pt))
    loss_diff = abs(ours["first_loss"] - trl["first_loss"])
    tput = {s: a.steps * a.batch_size / sum(r["step_s"]) for s, r in res.items()}
    med = {s: statistics.median(r["step_s"]) for s, r in res.items()}
    step_ratio = statistics.median(t / o for o, t in zip(ours["step_s"], trl["step_s"]))
    rss = {s: r["peak_rss_mb"] for s, r in res.items()}
    pre = {s: r["precompute_s"] for s, r in res.items()}

    print()
    print(f"| {'':30s} | {'ours':>10s} | {'TRL':>10s} | {'ours / TRL':>10s} |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    print(f"| {'pairs/s':30s} | {tput['ours']:10.2f} | {tput['trl']:10.2f} | "
          f"{tput['ours'] / tput['trl']:9.2f}x |")
    print(f"| {'median step, s':30s} | {med['ours']:10.3f} | {med['trl']:10.3f} | "
          f"{med['ours'] / med['trl']:9.2f}x |")
    print(f"| {'peak RSS, MB':30s} | {rss['ours']:10.1f} | {rss['trl']:10.1f} | "
          f"{rss['ours'] / rss['trl']:9.2f}x |")
    print(f"| {'set-up + ref precompute, s':30s} | {pre['ours']:10.2f} | {pre['trl']:10.2f} | "
          f"{pre['ours'] / pre['trl']:9.2f}x |")
    print(f"| {'step-0 loss':30s} | {ours['first_loss']:10.6f} | {trl['first_loss']:10.6f} | "
          f"{'':10s} |")
    print()
    print(f"median per-step speed-up (TRL step / our step, same step index): {step_ratio:.2f}x")
    print(f"tokenization: identical for all {len(ours['tokens'])} pairs; "
          f"reference log-probs max |ours - TRL| = {ref_diff:.2e}")
    ok = loss_diff <= LOSS_TOL
    print(f"step-0 loss |ours - TRL| = {loss_diff:.2e} (tolerance {LOSS_TOL:.0e}): "
          f"{'OK' if ok else 'FAIL'}")
    print(f"target >= 1.0x TRL pairs/s: {'met' if tput['ours'] >= tput['trl'] else 'NOT met'}; "
          f"peak memory <= TRL: {'met' if rss['ours'] <= rss['trl'] else 'NOT met'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
