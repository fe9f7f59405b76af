"""Hot-swap cost: time from "version activated" to the first response from the new version, what
each phase of the swap costs, and request latency p99 during swaps vs. without, per policy
backend and per checkpoint kind (tied / untied embeddings).

    python bench/swap.py [--backend hf|vllm|all] [--size tiny|small] [--tie untied|tied|both]
                         [--swaps 6] [--clients 16]

Each service runs in its own process, following a model name in the registry (Redis at
127.0.0.1:6379). Two store versions (other seeds) are swapped back and forth while 16 clients
keep generating 8 greedy tokens; a quiet phase of the same length gives the no-swap latencies.
The breakdown comes from the service's own log line per swap (`rlhf.serving.swap`): event (the
registry event's delivery), verify (checksum time not hidden behind the load; the whole hashing
time in brackets), load, warm-up, probes, drain (vLLM in place: the gate waiting for the calls
in flight), switch (the rest: tokenizer check, the assignment) — medians over the swaps.
"activate → first new" is measured by the bench: from `registry.activate` to the first response
that names the new version (a request polled every 5 ms), so it also holds the wait for a batch
slot on a busy server.
"""

from __future__ import annotations

import argparse
import os
import re
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


_SWAP_LINE = re.compile(r"swap \S+ -> \S+ in [0-9.]+s: (.*)$")
PHASES = ("event", "verify", "load", "warm-up", "probes", "drain", "switch")


def _phases(log_text: str) -> list[dict[str, float]]:
    """The per-phase seconds of every successful swap the service logged."""
    out = []
    for line in log_text.splitlines():
        m = _SWAP_LINE.search(line)
        if m:
            out.append({k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())})
    return out


def bench_backend(backend: str, tied: bool, size: str, swaps: int, clients: int, work: Path,
                  baseline: Path | None = None) -> dict:
    """One row; `baseline`: a source tree (`git archive`) whose service code runs instead."""
    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import start_service
    from rlhf_client import PolicyClient, SamplingParams
    from rlhf_client.registry import Registry

    registry = Registry.from_url(REDIS_URL)
    tag = f"{backend}-{size}-{'tied' if tied else 'untied'}-{'base' if baseline else 'tree'}"
    name = f"bench-swap-{tag}-{uuid.uuid4().hex[:6]}"
    dirs = [make_tiny_model("policy", work / f"{tag}-src{s}", size=size, seed=s, tie_embeddings=tied) for s in (0, 1)]
    versions = [_publish(work / "store", registry, name, d) for d in dirs]
    registry.activate(name, versions[0])
    args = ["--model-name", name, "--store", str(work / "store"), "--redis-url", REDIS_URL,
            "--metrics-port", "0", "--backend", backend]
    if backend == "vllm":
        args += ["--max-model-len", "512", "--enforce-eager", "--kv-cache-space-gb", "1"]
    log_path = work / f"{tag}.log"
    env = None
    if baseline is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(baseline / "services"), str(baseline / "clients"), os.environ.get("PYTHONPATH", "")]))
    svc = start_service("policy", args, log_path, env=env, ready_timeout=600)
    swap_times: list[float] = []
    try:
        with PolicyClient(svc.target) as probe:
            one = SamplingParams(temperature=0.0, max_new_tokens=1)  # the answer names its version

            def swapping():
                for k in range(swaps):
                    version = versions[(k + 1) % 2]
                    t0 = time.perf_counter()
                    registry.activate(name, version)
                    while probe.generate(["hi"], one).model.version != version:
                        time.sleep(POLL_S)
                    swap_times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            during = _load_phase(svc.target, clients, 0, on_tick=swapping)
            quiet = _load_phase(svc.target, clients, time.perf_counter() - t0)
    finally:
        svc.stop()
    logged = _phases(log_path.read_text())
    if len(logged) < swaps and baseline is None:
        raise RuntimeError(f"{tag}: the service logged {len(logged)} swaps of {swaps} (log: {log_path})")
    in_place = "new engine" not in log_path.read_text() if backend == "vllm" else None

    def p99(xs):
        return statistics.quantiles(xs, n=100)[98]

    def med(key):
        xs = [p.get(key, 0.0) for p in logged]
        return statistics.median(xs) if xs else None

    return dict(backend=backend, tied=tied, size=size, in_place=in_place, baseline=baseline is not None,
                swap_median=statistics.median(swap_times), swap_max=max(swap_times),
                phases={k: med(k) for k in (*PHASES, "verify-total")},
                p99_quiet=p99(quiet), p99_swaps=p99(during), n_quiet=len(quiet), n_swaps=len(during))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["hf", "vllm", "all"], default="hf")
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--tie", choices=["untied", "tied", "both"], default="both")
    ap.add_argument("--swaps", type=int, default=6)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--baseline", type=Path, default=None,
                    help="a source tree (e.g. `git archive HEAD | tar -x -C DIR`): each row also runs "
                         "with its service code, interleaved, for a side-by-side ratio")
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    backends = ["hf", "vllm"] if args.backend == "all" else [args.backend]
    ties = {"untied": [False], "tied": [True], "both": [False, True]}[args.tie]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for b in backends:
            for tied in ties:
                for base in ([args.baseline.resolve()] if args.baseline else []) + [None]:
                    what = f"{b} ({'tied' if tied else 'untied'}{', baseline' if base else ''})"
                    with Console().status(f"{what}: swapping under load…"):
                        rows.append(bench_backend(b, tied, args.size, args.swaps, args.clients, Path(tmp), base))
    table = Table(title=f"hot-swap, {args.size} policy, {args.clients} clients, {args.swaps} swaps "
                        "(phases: medians, ms)")
    for col in ("code", "backend", "embeddings", "activate → first new (median / max)", *PHASES, "p99 quiet",
                "p99 during swaps", "ratio", "requests quiet / swapping"):
        table.add_column(col, justify="right")
    for r in rows:
        ph = r["phases"]
        how = "" if r["in_place"] is None else (" (in place)" if r["in_place"] else " (new engine)")
        cells = ["—" if ph[k] is None else f"{ph[k] * 1e3:.0f}" for k in PHASES]
        if ph["verify"] is not None:
            cells[1] = f"{ph['verify'] * 1e3:.0f} ({ph['verify-total'] * 1e3:.0f})"
        table.add_row("baseline" if r["baseline"] else "this tree", r["backend"] + how, "tied" if r["tied"] else "untied",
                      f"{r['swap_median']:.3f}s / {r['swap_max']:.3f}s", *cells,
                      f"{r['p99_quiet'] * 1e3:.0f} ms", f"{r['p99_swaps'] * 1e3:.0f} ms",
                      f"{r['p99_swaps'] / r['p99_quiet']:.2f}×", f"{r['n_quiet']} / {r['n_swaps']}")
    Console(width=220).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
