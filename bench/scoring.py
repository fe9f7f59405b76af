"""Scoring services with micro-batching on vs. off, measured side by side in one run.

    python bench/scoring.py [--size tiny|small] [--callers 64] [--seconds 8] [--torch-threads N]
                            [--client-procs 2] [--services reward reference]

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

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def make_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    from rlhf.models.tiny import synthetic_corpus

    lines = [line for line in synthetic_corpus() if 20 <= len(line) <= 120]
    rng = random.Random(seed)
    return [(rng.choice(lines), " " + rng.choice(lines)) for _ in range(n)]


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
                await call([items[i % len(items)]])
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


def bench_one(service: str, model_dir: Path, items: list, batching: bool, args, workdir: Path) -> Run:
    from rlhf.procs import start_service

    max_batch = args.callers if batching else 1
    log = workdir / f"{service}-{'on' if batching else 'off'}.log"
    env = dict(os.environ)
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)  # torch's intra-op threads in the service
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
               mean_batch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    pairs = make_pairs(512, args.seed)
    tok = load_tokenizer(dirs["reference"])
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
