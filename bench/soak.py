"""Soak: the whole stack under mixed traffic, hot-swaps and training for minutes; does anything
fail, leak memory or leak file descriptors?

    python bench/soak.py [--minutes 5] [--interval 15] [--clients 2] [--swap-every 20]
                         [--warmup 0.2] [--redis-url URL] [--json docs/img/soak.json]
                         [--png docs/img/soak.png]

The demo's stack (`rlhf.demo._stack`): tiny policy, reward and reference models made on the spot,
the three services as child processes on loopback (the policy follows a model name in the
registry), a Celery trainer worker. Redis is a private `redis-server` on a free port (nothing else
touches it, so its used_memory is ours alone) unless `--redis-url` names one. A second policy
version (another seed) is published, and during the soak:

- `--clients` threads per RPC keep calling Generate (8 tokens), Score and LogProbs (closed loop,
  60 s deadline each); every failure is counted by its status code;
- every `--swap-every` seconds the next version of the rotation (the two published ones, then
  also every version the DPO jobs publish) is activated in the registry, and the time until the
  policy service answers with it is measured (a swap not seen within 120 s counts as failed);
- DPO jobs run back to back: 64 fresh preference pairs pushed to a stream, a job submitted with
  `TrainingClient` (reference log-probs from the ReferenceService, `activate=False`: the swapper
  is the only one activating), its status followed until it ends.

Every `--interval` seconds it records per RPC the requests, p50/p99 latency and errors by status;
the RSS and open descriptors (/proc/PID/fd) of each service, the worker (its process tree) and
redis-server; Redis used_memory; the machine's load. At the end: a table, the verdicts against
the targets — zero errors; RSS growth < 10 % from the end of the warm-up (the first `--warmup`
share of the run) to the end, per service; descriptors flat (end ≤ end of warm-up + 3) — a JSON of
the series and a PNG. Exit status 1 when a target is missed. Ctrl-C / SIGTERM stop everything
started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

from swap import _publish  # bench/ is the script's directory: on sys.path

RPCS = ("Generate", "Score", "LogProbs")
SERVICES = ("policy", "reward", "reference")
PAIRS_PER_JOB = 64
SWAP_TIMEOUT_S = 120
FD_SLACK = 3
RSS_LIMIT = 0.10


@contextlib.contextmanager
def private_redis(work: Path):
    """A redis-server of our own on a free loopback port (no persistence); its URL."""
    import redis

    from rlhf.procs import free_port, stop_process

    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work), "--logfile", str(work / "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {proc.returncode}; see {work / 'redis.log'}")
            with contextlib.suppress(redis.RedisError), redis.Redis(port=port, socket_timeout=1) as c:
                if c.ping():
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not answer in 30 s")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        stop_process(proc)


class Recorder:
    """What the traffic threads, the swapper and the trainer loop report; drained per interval."""

    def __init__(self):
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.err: Counter = Counter()  # (rpc, status)
        self.first_errors: list[str] = []
        self.events: list[dict] = []  # swaps and jobs, with their times

    def ok(self, rpc: str, seconds: float) -> None:
        with self.lock:
            self.lat[rpc].append(seconds)

    def fail(self, rpc: str, status: str, text: str) -> None:
        with self.lock:
            self.err[(rpc, status)] += 1
            if len(self.first_errors) < 10:
                self.first_errors.append(f"{rpc}: {text}")

    def event(self, **ev) -> None:
        with self.lock:
            self.events.append(ev)

    def drain(self) -> tuple[dict[str, list[float]], Counter]:
        with self.lock:
            lat, err = self.lat, self.err
            self.lat, self.err = defaultdict(list), Counter()
        return lat, err


def _traffic(rpc: str, target: str, rec: Recorder, stop: threading.Event, seed: int, samples: list) -> None:
    """One client thread: calls `rpc` back to back until `stop`."""
    import random

    from rlhf_client import PolicyClient, ReferenceClient, RewardClient, RpcError, SamplingParams

    r = random.Random(seed)
    client_cls = {"Generate": PolicyClient, "Score": RewardClient, "LogProbs": ReferenceClient}[rpc]
    with client_cls(target, timeout=60) as c:
        while not stop.is_set():
            picks = r.sample(samples, 2)
            t0 = time.perf_counter()
            try:
                if rpc == "Generate":
                    c.generate([p for p, *_ in picks], SamplingParams(max_new_tokens=8, seed=r.randrange(1 << 30)))
                elif rpc == "Score":
                    c.score([(p, text or " ") for p, text, *_ in picks])
                else:
                    c.logprobs([(pids, cids) for *_, pids, cids in picks])
            except RpcError as exc:
                rec.fail(rpc, exc.code.name, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - counted and reported, never hidden
                rec.fail(rpc, type(exc).__name__, str(exc))
                continue
            rec.ok(rpc, time.perf_counter() - t0)


def _swapper(st, registry, rotation: list[str], every: float, rec: Recorder, stop: threading.Event, t0: float):
    """Activates the next version of `rotation` every `every` s; times until the service answers with it."""
    from rlhf_client import PolicyClient

    k = 1
    with PolicyClient(st.policy.target, timeout=30) as probe:
        while not stop.wait(every):
            version = rotation[k % len(rotation)]
            k += 1
            t_act = time.perf_counter()
            registry.activate(st.model_name, version)
            ok = False
            while not stop.is_set() and time.perf_counter() - t_act < SWAP_TIMEOUT_S:
                with contextlib.suppress(Exception):  # a probe error is the traffic's to count
                    if probe.get_model().model.version == version:
                        ok = True
                        break
                time.sleep(0.05)
            if stop.is_set() and not ok:
                return
            rec.event(kind="swap", t=time.monotonic() - t0, version=version, ok=ok,
                      seconds=time.perf_counter() - t_act)


def _trainer(st, rotation: list[str], rec: Recorder, stop: threading.Event, t0: float):
    """DPO jobs back to back on fresh pairs; each published version joins the swap rotation."""
    from rlhf.demo import synthetic_pairs
    from rlhf_client import QueueProducer, TrainingClient

    producer = QueueProducer.from_url(st.redis_url)
    training = TrainingClient(st.redis_url)
    n = 0
    while not stop.is_set():
        n += 1
        stream = f"rlhf:soak:{st.run_id}:pairs:{n}"
        for p in synthetic_pairs(PAIRS_PER_JOB, seed=n):
            producer.push_pair(stream=stream, source="soak", **p)
        t_sub = time.monotonic() - t0
        job_id = training.submit_dpo(
            model_name=st.model_name, source={"type": "stream", "stream": stream, "group": f"soak-{n}"},
            reference={"source": "service", "target": st.reference.target}, beta=0.1,
            learning_rate=1e-4, batch_size=16, max_length=64, epochs=1, activate=False)
        while True:
            r = training.status(job_id)
            if r.done:
                break
            if stop.wait(1.0):
                with contextlib.suppress(Exception):
                    training.cancel(job_id)
                rec.event(kind="job", start=t_sub, end=time.monotonic() - t0, status="cancelled at the end",
                          version=None, job=job_id)
                return
        rec.event(kind="job", start=t_sub, end=time.monotonic() - t0, status=r.status, version=r.version,
                  job=job_id, error=r.error)
        if r.status == "succeeded" and r.version:
            rotation.append(r.version)


def _tree(pid: int) -> list:
    import psutil

    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def _proc_stats(pids: dict[str, int]) -> dict[str, dict]:
    """RSS (MB, summed over the process tree) and open descriptors of each named process."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            procs = _tree(pid)
            out[name] = {"rss_mb": sum(p.memory_info().rss for p in procs) / 2**20,
                         "fds": sum(len(os.listdir(f"/proc/{p.pid}/fd")) for p in procs),
                         "procs": len(procs)}
        except (psutil.Error, OSError):
            out[name] = {"rss_mb": None, "fds": None, "procs": 0}
    return out


def _pct(xs: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(xs, q)) * 1e3 if xs else None


def soak(args, work: Path, console) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from rlhf.demo import _stack, synthetic_pairs
    from rlhf.models.tiny import make_tiny_model
    from rlhf_client import PolicyClient, SamplingParams
    from rlhf_client.redis_conn import connect
    from rlhf_client.registry import Registry

    with contextlib.ExitStack() as stack:
        if args.redis_url:
            redis_url, redis_pid = args.redis_url, None
        else:
            redis_url, redis_pid = stack.enter_context(private_redis(work))
        console.print(f"Redis: {redis_url}" + (" (a private redis-server)" if redis_pid else ""))
        st = stack.enter_context(_stack(console, work, label="soak", redis_url=redis_url,
                                        make_reward=lambda src: make_tiny_model("reward", src / "reward", seed=0)))
        registry = Registry.from_url(redis_url)
        rotation = [registry.active(st.model_name)]
        rotation.append(_publish(st.store_dir, registry, st.model_name,
                                 make_tiny_model("policy", st.work / "src" / "policy-b", seed=1)))
        prompts = [p["prompt"] for p in synthetic_pairs(32, seed=3)]
        with PolicyClient(st.policy.target) as pc:
            res = pc.generate(prompts, SamplingParams(max_new_tokens=8, seed=1))
        samples = [(prompts[c.prompt_index], c.text, list(c.prompt_token_ids), list(c.token_ids) or [0])
                   for c in res.completions]
        pids = {"policy": st.policy.proc.pid, "reward": st.reward.proc.pid,
                "reference": st.reference.proc.pid, "worker": st.procs["worker"].pid}
        if redis_pid:
            pids["redis"] = redis_pid
        rconn = connect(redis_url)
        rec, stop = Recorder(), threading.Event()
        t0 = time.monotonic()
        targets = {"Generate": st.policy.target, "Score": st.reward.target, "LogProbs": st.reference.target}
        threads = [threading.Thread(target=_traffic, args=(rpc, targets[rpc], rec, stop, 100 * i + j, samples),
                                    daemon=True, name=f"{rpc}-{j}")
                   for i, rpc in enumerate(RPCS) for j in range(args.clients)]
        threads.append(threading.Thread(target=_swapper, daemon=True, name="swapper",
                                        args=(st, registry, rotation, args.swap_every, rec, stop, t0)))
        if not args.no_training:
            threads.append(threading.Thread(target=_trainer, daemon=True, name="trainer",
                                            args=(st, rotation, rec, stop, t0)))
        series: list[dict] = []
        duration = args.minutes * 60
        for t in threads:
            t.start()
        try:
            with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                          TextColumn(f"of {duration:.0f} s"), TextColumn("{task.fields[info]}"), console=console) as bar:
                task = bar.add_task("soak", total=duration, info="")
                next_sample = args.interval
                totals: Counter = Counter()
                while True:
                    now = time.monotonic() - t0
                    st.check_alive()
                    for svc in st.services:
                        if svc.proc.poll() is not None:
                            raise RuntimeError(f"{svc.log_path.stem} exited ({svc.proc.returncode}); see {svc.log_path}")
                    if now >= next_sample or now >= duration:  # and one at the very end
                        lat, err = rec.drain()
                        row = {"t": round(now, 1), "load": os.getloadavg()[0],
                               "rpc": {rpc: {"n": len(lat[rpc]), "p50_ms": _pct(lat[rpc], 50),
                                             "p99_ms": _pct(lat[rpc], 99)} for rpc in RPCS},
                               "errors": {f"{rpc}/{code}": n for (rpc, code), n in err.items()},
                               "procs": _proc_stats(pids),
                               "redis_used_mb": rconn.info("memory")["used_memory"] / 2**20}
                        series.append(row)
                        totals.update({rpc: row["rpc"][rpc]["n"] for rpc in RPCS})
                        totals["errors"] += sum(err.values())
                        next_sample += args.interval
                        with rec.lock:
                            swaps = sum(e["kind"] == "swap" for e in rec.events)
                            jobs = sum(e["kind"] == "job" for e in rec.events)
                        bar.update(task, info=f"{sum(totals[r] for r in RPCS)} requests, {totals['errors']} errors, "
                                              f"{swaps} swaps, {jobs} jobs done, policy RSS "
                                              f"{row['procs']['policy']['rss_mb']:.0f} MB")
                    bar.update(task, completed=min(now, duration))
                    if now >= duration:
                        break
                    time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=90)
    return {"series": series, "events": rec.events, "first_errors": rec.first_errors,
            "pids": list(pids), "model": st.model_name}


def verdicts(result: dict, warmup: float) -> tuple[list[tuple[str, bool, str]], dict]:
    """(target, met, detail) rows; and per process the figures behind them."""
    series = result["series"]
    k = max(1, round(len(series) * warmup))  # the samples of the warm-up; the last one is the baseline
    base, end, after = series[k - 1], series[-1], series[k - 1:]
    errors: Counter = Counter()
    for row in series:
        errors.update(row["errors"])
    swaps = [e for e in result["events"] if e["kind"] == "swap"]
    jobs = [e for e in result["events"] if e["kind"] == "job"]
    figures = {}
    for name in result["pids"]:
        b, e = base["procs"][name], end["procs"][name]
        rss = [r["procs"][name]["rss_mb"] for r in after if r["procs"][name]["rss_mb"] is not None]
        fds = [r["procs"][name]["fds"] for r in after if r["procs"][name]["fds"] is not None]
        figures[name] = {"rss_base": b["rss_mb"], "rss_end": e["rss_mb"], "rss_max": max(rss),
                         "growth": e["rss_mb"] / b["rss_mb"] - 1, "fd_base": b["fds"], "fd_end": e["fds"],
                         "fd_min": min(fds), "fd_max": max(fds)}
    rows = [("zero RPC errors", not errors,
             ", ".join(f"{k}: {n}" for k, n in sorted(errors.items())) or "none")]
    rows.append(("every swap seen, every job succeeded",
                 all(s["ok"] for s in swaps) and all(j["status"] in ("succeeded", "cancelled at the end") for j in jobs),
                 f"{sum(s['ok'] for s in swaps)}/{len(swaps)} swaps, "
                 f"{sum(j['status'] == 'succeeded' for j in jobs)}/{len(jobs)} jobs succeeded"))
    for name in SERVICES:
        f = figures[name]
        rows.append((f"{name}: RSS growth < {RSS_LIMIT:.0%} after warm-up", f["growth"] < RSS_LIMIT,
                     f"{f['rss_base']:.0f} → {f['rss_end']:.0f} MB ({f['growth']:+.1%}), max {f['rss_max']:.0f}"))
    for name in SERVICES:
        f = figures[name]
        rows.append((f"{name}: descriptors flat (end ≤ warm-up + {FD_SLACK})", f["fd_end"] <= f["fd_base"] + FD_SLACK,
                     f"{f['fd_base']} → {f['fd_end']} (range {f['fd_min']}–{f['fd_max']})"))
    for name in result["pids"]:
        if name not in SERVICES:  # no target: the worker trains, Redis holds the streams
            f = figures[name]
            rows.append((f"{name}: RSS and descriptors (no target)", None,
                         f"{f['rss_base']:.0f} → {f['rss_end']:.0f} MB ({f['growth']:+.1%}), max {f['rss_max']:.0f}; "
                         f"fds {f['fd_base']} → {f['fd_end']} (range {f['fd_min']}–{f['fd_max']})"))
    return rows, figures


def plot(result: dict, warmup_t: float, path: Path) -> Path:
    from rlhf.plots import pyplot, save_figure

    series = result["series"]
    ts = [r["t"] / 60 for r in series]
    fig, (a, b, c) = pyplot().subplots(3, 1, figsize=(10, 10), sharex=True)
    colors = dict(zip((*RPCS, *result["pids"]), ("#2a7ab9", "#d1495b", "#66a182", "#2a7ab9", "#d1495b",
                                                   "#66a182", "#edae49", "#777777")))
    for rpc in RPCS:
        for q, style in (("p50_ms", "--"), ("p99_ms", "-")):
            a.plot(ts, [r["rpc"][rpc][q] for r in series], style, color=colors[rpc], label=f"{rpc} {q[:3]}")
    a.set_yscale("log")
    a.set_ylabel("latency (ms)")
    a.legend(fontsize=8, ncol=3)
    for name in result["pids"]:
        b.plot(ts, [r["procs"][name]["rss_mb"] for r in series], color=colors[name], label=name)
        c.plot(ts, [r["procs"][name]["fds"] for r in series], color=colors[name], label=name)
    b.set_ylabel("RSS (MB; worker: its process tree)")
    b.legend(fontsize=8, ncol=5)
    c.set_ylabel("open descriptors")
    c.legend(fontsize=8, ncol=5, loc="upper right")
    c.set_xlabel("minutes")
    for ax in (a, b, c):
        ax.axvspan(0, warmup_t / 60, color="#cccccc", alpha=0.4)
        for e in result["events"]:
            if e["kind"] == "job":
                ax.axvspan(e["start"] / 60, e["end"] / 60, color="#f2c14e", alpha=0.12)
            elif e["kind"] == "swap":
                ax.axvline(e["t"] / 60, color="#999999" if e["ok"] else "red", lw=0.5, alpha=0.6)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title="soak: grey = warm-up, yellow = DPO jobs, lines = hot-swaps")


def report(result: dict, args, console) -> bool:
    from rich.table import Table

    series = result["series"]
    if not series:
        console.print("[red]no interval was recorded[/]")
        return False
    rows, figures = verdicts(result, args.warmup)
    table = Table(title=f"soak: {len(series)} intervals of {args.interval:g} s")
    for col in ("t (s)", "load", *(f"{rpc} n / p50 / p99 ms" for rpc in RPCS), "errors",
                *(f"{n} RSS MB / fds" for n in result["pids"]), "Redis MB"):
        table.add_column(col, justify="right")

    def ms(x):
        return "—" if x is None else f"{x:.0f}"

    for r in series:
        table.add_row(f"{r['t']:.0f}", f"{r['load']:.1f}",
                      *(f"{r['rpc'][q]['n']} / {ms(r['rpc'][q]['p50_ms'])} / {ms(r['rpc'][q]['p99_ms'])}" for q in RPCS),
                      str(sum(r["errors"].values())),
                      *(f"{r['procs'][n]['rss_mb']:.0f} / {r['procs'][n]['fds']}" for n in result["pids"]),
                      f"{r['redis_used_mb']:.1f}")
    console.print(table)
    swaps = [e for e in result["events"] if e["kind"] == "swap" and e["ok"]]
    jobs = [e for e in result["events"] if e["kind"] == "job"]
    if swaps:
        secs = sorted(s["seconds"] for s in swaps)
        console.print(f"hot-swaps: {len(swaps)}, activate → served median {secs[len(secs) // 2]:.2f} s, max {secs[-1]:.2f} s")
    for j in jobs:
        console.print(f"DPO job {j['job'][:8]}: {j['status']} in {j['end'] - j['start']:.0f} s"
                      + (f" → {j['version']}" if j.get("version") else "") + (f" ({j['error']})" if j.get("error") else ""))
    for e in result["first_errors"]:
        console.print(f"[red]error:[/] {e}")
    v = Table(title=f"targets (warm-up: the first {args.warmup:.0%} of the run, {series[max(1, round(len(series) * args.warmup)) - 1]['t']:.0f} s)")
    for col in ("target", "met", "figures"):
        v.add_column(col)
    for what, ok, detail in rows:
        v.add_row(what, "—" if ok is None else "[green]yes[/]" if ok else "[red]NO[/]", detail)
    console.print(v)
    result["verdicts"] = [{"target": w, "met": ok, "detail": d} for w, ok, d in rows]
    result["figures"] = figures
    return all(ok is not False for _, ok, _ in rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--interval", type=float, default=15.0, help="seconds per recorded interval")
    ap.add_argument("--clients", type=int, default=2, help="client threads per RPC")
    ap.add_argument("--swap-every", type=float, default=20.0, help="seconds between hot-swaps")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the run left out of the RSS / fd targets")
    ap.add_argument("--no-training", action="store_true", help="no DPO jobs during the soak")
    ap.add_argument("--redis-url", default=None,
                    help="an existing Redis (a database nobody else uses) instead of a private redis-server")
    ap.add_argument("--json", type=Path, default=Path("docs/img/soak.json"))
    ap.add_argument("--png", type=Path, default=Path("docs/img/soak.png"))
    args = ap.parse_args(argv)
    from rich.console import Console

    console = Console(width=240)

    def on_term(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"soak-{uuid.uuid4().hex[:6]}-") as tmp:
        try:
            result = soak(args, Path(tmp), console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: everything started was stopped[/]")
            return 130
    ok = report(result, args, console)
    result.update(command=" ".join(["python", "bench/soak.py", *(sys.argv[1:] if argv is None else argv)]),
                  date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), load_before=load_before,
                  load_after=os.getloadavg(), cpus=os.cpu_count(), settings=vars(args) | {"json": str(args.json), "png": str(args.png)})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    png = plot(result, result["series"][max(1, round(len(result["series"]) * args.warmup)) - 1]["t"], args.png)
    console.print(f"[green]✓[/] series: {args.json}; plot: {png}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
