"""The online loop, synchronous vs. overlapped: the same rounds, wall time and final held-out
reward side by side in one run.

    python bench/loop.py [--quick] [--size small] [--rounds 5] [--prompts 32] [--n 16]
                         [--max-new-tokens 16] [--epochs 2] [--lr 5e-4]
                         [--redis-url redis://127.0.0.1:6379/0] [--workdir DIR]

Set-up (not timed): the `--size` tiny Qwen2 policy (seed 0) and a tiny reward model trained on
the banana task (the demo's `_banana_reward_model`); `rlhf serve reward` on it and `rlhf serve
reference` on the policy, each its own process; per mode a model of its own (the policy
published as v0001, active) and `rlhf serve policy` following it. Every process runs torch
with one thread.

Each mode runs the same loop spec (`rlhf.trainer.jobs.LoopJob`, DPO rounds from the round's
starting version, best-vs-worst pairs labelled by the reward model, RPO's NLL term, the same
seeds) in this process through `jobs.execute` — the round's DPO job in-process, as the `rlhf
worker` runs it — once with `overlap: false` and once with `overlap: true` (round k+1's samples
drawn and labelled while round k trains: one round off-policy). Wall time: from the loop's start
to its end, round 0's baseline evaluation included (the same in both). Reported per mode: wall
time, the sum of each stage's time over the rounds (collect + label overlap training in the
second mode), the held-out mean reward per round (20 banana prompts the loop never trains on, 4
samples each at temperature 1, the same seed every round).

Target: overlapped ≤ 0.75× the synchronous wall time, final held-out reward within noise (the
spread of the held-out reward between rounds is the scale to read it on). Overlap hides round
k+1's collection (generation and labelling, in the policy and reward services' processes)
behind round k's training (in this process); round 1's collection, the evaluations and the
swaps stay on the critical path, so the gain grows with the rounds and is largest when
collection and training take about as long (the defaults: 16 samples of 16 tokens for 32
prompts, 2 epochs of DPO).

`--quick`: 16 prompts × 4 samples of 16 tokens, 2 rounds, the `tiny` policy: a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

from rich.console import Console

console = Console()


def _services(a: argparse.Namespace, work: Path, reward_dir: Path, policy_dir: Path):
    from rlhf.procs import start_service

    env = {**os.environ, "RLHF_TORCH_THREADS": "1", "RLHF_SWAP_POLL_S": "1"}
    common = ["--metrics-port", "0", "--redis-url", a.redis_url]
    reward = start_service("reward", ["--model", str(reward_dir), *common],
                           work / "logs" / "reward.log", env=env)
    reference = start_service("reference", ["--model", str(policy_dir), *common],
                              work / "logs" / "reference.log", env=env)
    return env, reward, reference


def _spec(a: argparse.Namespace, name: str, policy: str, reward: str, reference: str,
          overlap: bool) -> dict:
    from rlhf.demo import NAMES, NOUNS

    prompts = [f"{x} asked about the {y}:" for x in NAMES for y in NOUNS]
    held = prompts[3::5]
    train = [p for p in prompts if p not in held]
    return {
        "type": "iterate", "job_id": name, "model_name": name, "policy": policy,
        "reference": reference, "rounds": a.rounds, "overlap": overlap,
        "labeller": {"type": "reward", "target": reward},
        "prompts": {"texts": train}, "prompts_per_round": a.prompts,
        "held_out": {"prompts": {"texts": held}, "n": 4},
        "sampling": {"n": a.n, "max_new_tokens": a.max_new_tokens, "seed": 3},
        "pairs": {"builder": "best_vs_worst"},
        "train": {"learning_rate": a.lr, "beta": 0.1, "rpo_alpha": 1.0, "batch_size": 16,
                  "max_length": 32 + a.max_new_tokens, "epochs": a.epochs,
                  "eval_fraction": 0.0},
        "swap_timeout_s": 600, "rpc_timeout_s": 600,
    }


def run_mode(a: argparse.Namespace, work: Path, env: dict, policy_dir: Path, reward: str,
             reference: str, overlap: bool) -> dict:
    from rlhf_client.registry import Registry

    from rlhf.config import Settings
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.procs import start_service
    from rlhf.trainer.jobs import execute, parse_spec
    from rlhf.trainer.loop import read_loop, run_loop_job

    mode = "overlapped" if overlap else "synchronous"
    name = f"bench-loop-{mode[:4]}-{uuid.uuid4().hex[:6]}"
    store = work / "store"
    first = ModelStore(store).publish(name, policy_dir, kind="policy",
                                      probes=compute_probes("policy", policy_dir))
    registry = Registry.from_url(a.redis_url)
    registry.register(name, first.version, first.created)
    registry.activate(name, first.version)
    policy = start_service("policy", ["--model-name", name, "--store", str(store), "--metrics-port",
                                      "0", "--redis-url", a.redis_url],
                           work / "logs" / f"policy-{mode}.log", env=env)
    try:
        spec = parse_spec(_spec(a, name, policy.target, reward, reference, overlap))
        settings = Settings(redis_url=a.redis_url, store_dir=store, metrics_port=None,
                            torch_threads=1)
        with console.status(f"{mode}: {a.rounds} rounds…"):
            t0 = time.perf_counter()
            out = execute(spec, run_loop_job, settings=settings, worker="bench")
            wall = time.perf_counter() - t0
        if out.status != "succeeded":
            raise SystemExit(f"{mode} loop {out.status}: {out.error}")
        status = read_loop(registry.r, spec.job_id)
    finally:
        policy.stop()
    stages: dict[str, float] = {}
    for r in status.rounds[1:]:
        for k, v in r["seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
    scores = [r["held_out_score"] for r in status.rounds]
    console.print(f"{mode}: {wall:.1f} s; held-out reward {[round(s, 3) for s in scores]}")
    return {"mode": mode, "wall_s": wall, "stages_s": stages, "held_out": scores,
            "kl": [r.get("kl") for r in status.rounds], "loop_id": spec.job_id, "model": name}


def _cleanup(a: argparse.Namespace, rows: list[dict]) -> None:
    from rlhf_client.redis_conn import connect

    r = connect(a.redis_url)
    for row in rows:
        for pattern in (f"rlhf:loop:{row['loop_id']}*", f"rlhf:job:{row['loop_id']}*",
                        f"rlhf:model:{row['model']}:*"):
            keys = list(r.scan_iter(match=pattern, count=1000))
            if keys:
                r.delete(*keys)
        r.srem("rlhf:models", row["model"])
        r.zrem("rlhf:jobs", row["loop_id"], *[f"{row['loop_id']}-r{k}-dpo"
                                              for k in range(1, a.rounds + 1)])
    r.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per round")
    ap.add_argument("--n", type=int, default=16, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        a.size, a.rounds, a.prompts, a.n, a.max_new_tokens = "tiny", 2, 16, 4, 16
    import tempfile

    from rlhf.demo import _banana_reward_model
    from rlhf.models.tiny import make_tiny_model

    t_all = time.perf_counter()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    with console.status("making models…"):
        policy_dir = make_tiny_model("policy", work / "src" / "policy", size=a.size, seed=0)
        reward_dir = _banana_reward_model(work / "src", Console(quiet=True))
    env, reward, reference = _services(a, work, reward_dir, policy_dir)
    rows: list[dict] = []
    try:
        for overlap in (False, True):
            rows.append(run_mode(a, work, env, policy_dir, reward.target, reference.target,
                                 overlap))
    finally:
        reference.stop()
        reward.stop()
        _cleanup(a, rows)
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    sync, over = rows
    print()
    print(f"{a.rounds} rounds of DPO on the {a.size} policy: {a.prompts} prompts × {a.n} "
          f"samples of {a.max_new_tokens} tokens per round, {a.epochs} epochs; held-out: 20 "
          "prompts × 4 samples")
    print()
    stages = ["collect", "label", "train", "activate", "swap", "evaluate"]
    print("| mode | wall s | ÷ synchronous | " + " | ".join(f"{s} s" for s in stages)
          + " | held-out reward per round (round 0 = start) |")
    print("|---|---|---|" + "---|" * len(stages) + "---|")
    for row in rows:
        print(f"| {row['mode']} | {row['wall_s']:.1f} | {row['wall_s'] / sync['wall_s']:.2f}x | "
              + " | ".join(f"{row['stages_s'].get(s, 0.0):.1f}" for s in stages)
              + " | " + " → ".join(f"{x:.3f}" for x in row["held_out"]) + " |")
    spread = max(abs(b - c) for b, c in zip(sync["held_out"][1:], sync["held_out"][2:])) \
        if a.rounds > 1 else float("nan")
    print()
    print(f"overlapped / synchronous wall time: {over['wall_s'] / sync['wall_s']:.2f}x "
          f"(target ≤ 0.75x); final held-out reward {over['held_out'][-1]:.3f} vs "
          f"{sync['held_out'][-1]:.3f} (largest change between synchronous rounds ≥ 1: "
          f"{spread:.3f})")
    print(json.dumps(rows), file=sys.stderr)
    print(f"bench wall time {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
