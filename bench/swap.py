"""Hot-swap cost: time from "version activated" to the first response from the new version, and
request latency p99 during swaps vs. without, per policy backend.

    python bench/swap.py [--backend hf|vllm|all] [--swaps 6] [--clients 16]

Each backend's service runs in its own process, following a model name in the registry (Redis at
127.0.0.1:6379). Two store versions of the tiny policy are swapped back and forth while 16
clients keep generating; a quiet phase of the same length gives the no-swap latencies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REDIS_URL = "redis://127.0.0.1:6379/0"
POLL_S = 0.005


def _publish(store: Path, registry, name: str, src: Path) -> str:
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore

    m = ModelStore(store).publish(name, src, kind="policy", probes=compute_probes("policy", src))
    registry.register(name, m.version)
    return m.version


def _load_phase(target: str, clients: int, seconds: float, on_tick=None) -> list[float]:
    from rlhf_client import PolicyClient, SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    latencies: list[float] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def worker():
        with PolicyClient(target, timeout=120) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    c.generate(["the cat sat on the"], params)
                except Exception as exc:  # noqa: BLE001 - counted, reported
                    errors.append(exc)
                    continue
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        if on_tick is not None:
            on_tick()
        else:
            time.sleep(seconds)  # the quiet phase: load only
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return latencies


def bench_backend(backend: str, swaps: int, clients: int, work: Path) -> dict:
    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import start_service
    from rlhf_client import PolicyClient
    from rlhf_client.registry import Registry

    registry = Registry.from_url(REDIS_URL)
    name = f"bench-swap-{backend}-{uuid.uuid4().hex[:6]}"
    dirs = [make_tiny_model("policy", work / f"{backend}-src{s}", seed=s, tie_embeddings=False) for s in (0, 1)]
    versions = [_publish(work / "store", registry, name, d) for d in dirs]
    registry.activate(name, versions[0])
    args = ["--model-name", name, "--store", str(work / "store"), "--redis-url", REDIS_URL,
            "--metrics-port", "0", "--backend", backend]
    if backend == "vllm":
        args += ["--max-model-len", "512", "--enforce-eager", "--kv-cache-space-gb", "1"]
    svc = start_service("policy", args, work / f"{backend}.log", ready_timeout=600)
    swap_times: list[float] = []
    try:
        with PolicyClient(svc.target) as probe:
            def swapping():
                for k in range(swaps):
                    version = versions[(k + 1) % 2]
                    t0 = time.perf_counter()
                    registry.activate(name, version)
                    while probe.generate(["hi"]).model.version != version:
                        time.sleep(POLL_S)
                    swap_times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            during = _load_phase(svc.target, clients, 0, on_tick=swapping)
            quiet = _load_phase(svc.target, clients, time.perf_counter() - t0)
    finally:
        svc.stop()

    def p99(xs):
        return statistics.quantiles(xs, n=100)[98]

    return dict(backend=backend, swap_median=statistics.median(swap_times), swap_max=max(swap_times),
                p99_quiet=p99(quiet), p99_swaps=p99(during), n_quiet=len(quiet), n_swaps=len(during))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["hf", "vllm", "all"], default="hf")
    ap.add_argument("--swaps", type=int, default=6)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    backends = ["hf", "vllm"] if args.backend == "all" else [args.backend]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in backends:
            with Console().status(f"{b}: swapping under load…"):
                rows.append(bench_backend(b, args.swaps, args.clients, Path(tmp)))
    table = Table(title=f"hot-swap, tiny policy, {args.clients} clients, {args.swaps} swaps")
    for col in ("backend", "activate → first new response (median / max)", "p99 quiet", "p99 during swaps",
                "ratio", "requests quiet / swapping"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["backend"], f"{r['swap_median']:.2f}s / {r['swap_max']:.2f}s", f"{r['p99_quiet'] * 1e3:.0f} ms",
                      f"{r['p99_swaps'] * 1e3:.0f} ms", f"{r['p99_swaps'] / r['p99_quiet']:.2f}×",
                      f"{r['n_quiet']} / {r['n_swaps']}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
