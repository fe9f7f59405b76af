"""Scoring services with micro-batching on vs. off, measured side by side in one run.

    python bench/scoring.py [--workload batching|dpo] [--size tiny|small] [--callers 64]
                            [--seconds 8] [--torch-threads N] [--client-procs 2]
                            [--services reward reference]

Workload `batching` (the default):

For each service (`rlhf serve reward` / `rlhf serve reference`, each in its own process, gRPC on
loopback) and each mode, `--callers` concurrent callers each send one item per request, back to
back, for `--seconds` (after a short warm-up; the callers are spread over `--client-procs`
client processes so that the clients are not what limits the batching server):
  batching on   --max-batch-size = callers (default wait and token budget from Settings)
  batching off  --max-batch-size 1 (every request is its own forward pass)
Items: a (prompt, response) pair of lines from the tiny models' synthetic corpus — text for the
reward service, the same pairs as token ids for the reference service.
Reported: requests/s, p50 and p99 latency per request (client side), mean items per forward
(from the service's rlhf_batch_size histogram), and the on/off ratios.
Targets (scoring issue): throughput on ≥ 5× off, p99 on ≤ p99 off; exit status 1 when missed.

Workload `dpo` (issue 19, shared prompts scored once): every request is one preference pair — a
prompt and two completions, token ids, about 3 prompt tokens for 1 completion token (prompts
`--prompt-tokens` ± 25 %, each completion a third of its prompt ± 25 %, cut from the tiny models'
corpus) — `Score` with the two (prompt, completion) items for the reward service, `LogProbs`
with the two items for the reference service. Both modes batch (`--max-batch-size` = 2 ×
callers); they differ only in the service's `RLHF_SHARE_PROMPTS`:
  today    false: every item computed from scratch (the per-item path)
  shared   true: a prompt shared by items of a batch computed once (prefix KV reuse)
`--rounds N` runs today and shared N times in turn (load that comes and goes on a shared machine
then hits both alike). Reported: items/s, p50 / p99 per request, items per forward, and
shared/today of the mean items/s (target ≥ 1.5×), with each round's ratio; exit status 1 when
missed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Run:
    service: str
    batching: bool
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    mean_batch: float
    mode: str = ""  # dpo workload: "today" or "shared"
    items_per_request: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def items_per_s(self) -> float:
        return self.rps * self.items_per_request


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    from rlhf.models.tiny import synthetic_corpus

    lines = [line for line in synthetic_corpus() if 20 <= len(line) <= 120]
    rng = random.Random(seed)
    return [(rng.choice(lines), " " + rng.choice(lines)) for _ in range(n)]


def make_dpo_requests(tok, n: int, prompt_tokens: int, seed: int) -> list[list[tuple[list[int], list[int]]]]:
    """`n` requests, each one pair [(prompt, chosen), (prompt, rejected)] of token ids cut from the
    corpus: prompts of `prompt_tokens` ± 25 %, each completion a third of its prompt ± 25 %."""
    from rlhf.models.tiny import synthetic_corpus

    stream = [t for line in synthetic_corpus() for t in tok.encode(" " + line, add_special_tokens=False,
                                                                    verbose=False)]
    rng = random.Random(seed)

    def cut(k: int) -> list[int]:
        at = rng.randrange(0, len(stream) - k)
        return stream[at : at + k]

    out = []
    for _ in range(n):
        p = rng.randint(round(prompt_tokens * 0.75), round(prompt_tokens * 1.25))
        prompt = cut(p)
        out.append([(prompt, cut(max(1, round(p / 3 * rng.uniform(0.75, 1.25))))) for _ in range(2)])
    return out


def metrics_port(log_path: Path) -> int:
    m = re.search(r"listening on \S+ \(metrics (\d+)\)", log_path.read_text())
    if not m:
        raise RuntimeError(f"no metrics port in {log_path}")
    return int(m.group(1))


def batch_stats(port: int, service: str) -> tuple[float, float]:
    """(sum, count) of the service's rlhf_batch_size histogram."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(name: str) -> float:
        m = re.search(rf'{name}{{service="{service}"}} ([0-9.e+]+)', text)
        return float(m.group(1)) if m else 0.0

    return value("rlhf_batch_size_sum"), value("rlhf_batch_size_count")


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


async def drive(service: str, target: str, items: list, callers: range, stride: int,
                window: tuple[float, float]) -> tuple[list[float], float]:
    """Callers `k in callers` loop one-item requests (item k, k + stride, ...) until the window
    (wall-clock times) ends; latencies (s) of the requests that started in it, and when the last
    of them ended."""
    from rlhf_client import AsyncReferenceClient, AsyncRewardClient

    cls = AsyncRewardClient if service == "reward" else AsyncReferenceClient
    latencies: list[float] = []
    async with cls(target, timeout=120) as client:
        call = client.score if service == "reward" else client.logprobs

        async def caller(k: int) -> None:
            i = k
            while True:
                t0 = time.time()
                if t0 >= window[1]:
                    return
                item = items[i % len(items)]
                await call(item if isinstance(item, list) else [item])  # a list: one request's items
                t1 = time.time()
                if t0 >= window[0]:
                    latencies.append(t1 - t0)
                i += stride

        await asyncio.gather(*(caller(k) for k in callers))
    return latencies, time.time()


def drive_process(service: str, target: str, items: list, callers: range, stride: int,
                  window: tuple[float, float]) -> tuple[list[float], float]:
    """One client process's share of the callers (a process of its own: one Python client
    process cannot keep 64 callers' requests flowing as fast as a batching server answers)."""
    return asyncio.run(drive(service, target, items, callers, stride, window))


def run_callers(service: str, target: str, items: list, args) -> tuple[list[float], float]:
    """`args.callers` callers spread over `args.client_procs` processes; (latencies, seconds)."""
    from concurrent.futures import ProcessPoolExecutor

    procs = max(1, min(args.client_procs, args.callers))
    start = time.time() + 1.0 + args.warmup  # processes start within the first second
    window = (start, start + args.seconds)
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(drive_process, service, target, items, range(k, args.callers, procs),
                               args.callers, window) for k in range(procs)]
        parts = [f.result() for f in futures]
    latencies = [x for lat, _ in parts for x in lat]
    # requests that started in the window, over the time until the last of them ended
    return latencies, max(end for _, end in parts) - window[0]


def bench_one(service: str, model_dir: Path, items: list, batching: bool, args, workdir: Path,
              mode: str = "") -> Run:
    from rlhf.procs import start_service

    per_request = len(items[0]) if isinstance(items[0], list) else 1
    max_batch = args.callers * per_request if batching else 1
    log = workdir / f"{service}-{mode or ('on' if batching else 'off')}.log"
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)  # torch's intra-op threads in the service
    if mode:
        env["RLHF_SHARE_PROMPTS"] = "true" if mode == "shared" else "false"
    svc = start_service(service, ["--model", str(model_dir), "--metrics-port", "0",
                                  "--max-batch-size", str(max_batch)], log, env=env)
    try:
        port = metrics_port(log)  # the service logs its OS-picked metrics port at INFO
        sums0 = batch_stats(port, service)
        lat, elapsed = run_callers(service, svc.target, items, args)
        s1, c1 = batch_stats(port, service)
        mean_batch = (s1 - sums0[0]) / max(1.0, c1 - sums0[1])  # warm-up's batches included
    finally:
        svc.stop()
    lat.sort()
    return Run(service, batching, len(lat), elapsed, 1000 * percentile(lat, 0.5), 1000 * percentile(lat, 0.99),
               mean_batch, mode, per_request)


def forward_ratio(service: str, model_dir: Path, requests: list, args) -> tuple[float, float]:
    """One batch of `args.callers` pairs run in this process by the service's own batch function,
    today's path and the shared path in turn, `args.forward_reps` times each: the best seconds
    of each (the compute alone, without gRPC, callers or the batcher's timing)."""
    import torch

    from rlhf.config import Settings
    from rlhf.models.info import ModelRef

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    pairs = [item for r in requests[: args.callers] for item in r]
    ref = ModelRef(service, "bench")
    if service == "reward":
        import rlhf.reward.scorer as mod

        loaded = mod._load(model_dir, ref, Settings())
        batch = [mod._Item(loaded, tuple(p) + tuple(c), len(p)) for p, c in pairs]
        run = mod.score_batch
    else:
        import rlhf.reference.logprobs as mod

        loaded = mod._load(model_dir, ref, Settings())
        batch = [mod._Item(loaded, len(p), tuple(p) + tuple(c)) for p, c in pairs]
        run = mod.logprobs_batch
    best = {False: float("inf"), True: float("inf")}
    for _ in range(args.forward_reps):
        for share in (False, True):
            loaded.share_prompts = share
            t0 = time.perf_counter()
            run(batch)
            best[share] = min(best[share], time.perf_counter() - t0)
    return best[False], best[True]


def main_dpo(args, dirs: dict, tok) -> int:
    """Workload `dpo`: one pair per request, shared prompts off (today) vs on, side by side."""
    requests = make_dpo_requests(tok, 512, args.prompt_tokens, args.seed)
    p = [len(r[0][0]) for r in requests]
    c = [len(x[1]) for r in requests for x in r]
    print(f"# {args.size} models, {args.callers} callers × 1 pair per request ({args.client_procs} client "
          f"processes), {args.seconds:.0f} s per run; prompt {min(p)}–{max(p)} tokens (mean "
          f"{statistics.mean(p):.0f}), completions {min(c)}–{max(c)} (mean {statistics.mean(c):.0f}): "
          f"prompt:completion {statistics.mean(p) / statistics.mean(c):.2f}:1", file=sys.stderr)
    runs: list[Run] = []
    for service in args.services:
        for k in range(args.rounds):
            for mode in ("today", "shared"):
                run = bench_one(service, dirs[service], requests, True, args, workdir=args.workdir_path,
                                mode=mode)
                print(f"  {service:9s} {mode:6s} round {k + 1}: {run.items_per_s:8.1f} items/s  p50 "
                      f"{run.p50_ms:7.1f} ms  p99 {run.p99_ms:7.1f} ms  items/forward {run.mean_batch:5.1f}",
                      file=sys.stderr)
                runs.append(run)
    print("\n| service | prompts | requests | items/s | p50 ms | p99 ms | items/forward |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r.service} | {r.mode} | {r.requests} | {r.items_per_s:.1f} | {r.p50_ms:.1f} | "
              f"{r.p99_ms:.1f} | {r.mean_batch:.1f} |")
    if args.forward_reps:
        print(f"\nOne batch of {2 * args.callers} items ({args.callers} pairs) in-process, the service's batch "
              f"function, best of {args.forward_reps} (today and shared in turn):\n")
        print("| service | today s | shared s | today/shared |")
        print("|---|---|---|---|")
        for service in args.services:
            today_s, shared_s = forward_ratio(service, dirs[service], requests, args)
            print(f"| {service} | {today_s:.3f} | {shared_s:.3f} | {today_s / shared_s:.2f}× |")
    print("\n| service | items/s shared/today (target ≥ 1.5×) | each round | p99 shared/today |")
    print("|---|---|---|---|")
    ok = True
    for service in args.services:
        today = [r for r in runs if r.service == service and r.mode == "today"]
        shared = [r for r in runs if r.service == service and r.mode == "shared"]
        speed = statistics.mean(r.items_per_s for r in shared) / max(1e-9, statistics.mean(r.items_per_s for r in today))
        rounds = ", ".join(f"{b.items_per_s / max(1e-9, a.items_per_s):.2f}×" for a, b in zip(today, shared))
        tail = statistics.mean(r.p99_ms for r in shared) / max(1e-9, statistics.mean(r.p99_ms for r in today))
        ok &= speed >= 1.5
        print(f"| {service} | {speed:.2f}× | {rounds} | {tail:.2f} |")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["batching", "dpo"], default="batching",
                   help="batching: micro-batching on vs off; dpo: shared prompts off vs on")
    p.add_argument("--prompt-tokens", type=int, default=96, help="dpo: mean prompt length in tokens")
    p.add_argument("--rounds", type=int, default=1, help="dpo: today/shared runs in turn, per service")
    p.add_argument("--forward-reps", type=int, default=5,
                   help="dpo: also time one batch in-process, today/shared in turn, this many times (0: skip)")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny", help="tiny-model size")
    p.add_argument("--callers", type=int, default=64)
    p.add_argument("--seconds", type=float, default=8.0, help="measured window per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before the window")
    p.add_argument("--services", nargs="+", choices=["reward", "reference"], default=["reward", "reference"])
    p.add_argument("--client-procs", type=int, default=2, help="client processes the callers share")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--torch-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for the services (0: leave torch's default)")
    p.add_argument("--workdir", type=Path, default=None, help="models and service logs (default: a temp dir)")
    args = p.parse_args(argv)

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import make_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-scoring-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    dirs = {
        "reward": make_tiny_model("reward", workdir / f"reward-{args.size}", size=args.size, seed=args.seed),
        "reference": make_tiny_model("policy", workdir / f"reference-{args.size}", size=args.size, seed=args.seed),
    }
    tok = load_tokenizer(dirs["reference"])
    if args.workload == "dpo":
        args.workdir_path = workdir
        try:
            return main_dpo(args, dirs, tok)
        finally:
            if tmp:
                tmp.cleanup()
    pairs = make_pairs(512, args.seed)
    id_pairs = [(tok.encode(a, add_special_tokens=False), tok.encode(b, add_special_tokens=False)) for a, b in pairs]
    lengths = [len(a) + len(b) for a, b in id_pairs]
    print(f"# {args.size} models, {args.callers} callers × 1 item per request ({args.client_procs} client "
          f"processes), {args.seconds:.0f} s per run; "
          f"item length {min(lengths)}–{max(lengths)} tokens (mean {statistics.mean(lengths):.0f})",
          file=sys.stderr)

    runs: list[Run] = []
    for service in args.services:
        items = pairs if service == "reward" else id_pairs
        for batching in (True, False):
            run = bench_one(service, dirs[service], items, batching, args, workdir)
            print(f"  {service:9s} batching {'on ' if batching else 'off'}: {run.rps:8.1f} req/s  "
                  f"p50 {run.p50_ms:7.1f} ms  p99 {run.p99_ms:7.1f} ms  batch {run.mean_batch:5.1f}",
                  file=sys.stderr)
            runs.append(run)

    print("\n| service | batching | max batch | requests | req/s | p50 ms | p99 ms | items/forward |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r.service} | {'on' if r.batching else 'off'} | {args.callers if r.batching else 1} | "
              f"{r.requests} | {r.rps:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} |")
    print("\n| service | throughput on/off (target ≥ 5×) | p99 on/off (target ≤ 1) |")
    print("|---|---|---|")
    ok = True
    for service in args.services:
        on = next(r for r in runs if r.service == service and r.batching)
        off = next(r for r in runs if r.service == service and not r.batching)
        speed, tail = on.rps / off.rps, on.p99_ms / off.p99_ms
        ok &= speed >= 5 and tail <= 1
        print(f"| {service} | {speed:.1f}× | {tail:.2f} |")
    if tmp:
        tmp.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
