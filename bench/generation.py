"""Generation throughput: the policy service vs. in-process generation, measured side by side.

    python bench/generation.py [--size small] [--requests 64] [--new-tokens 32]
    python bench/generation.py --workload mixed [--backend hf|vllm] [--requests 64] [--rate 16]
                               [--min-new 8] [--max-new 256] [--reps 2] [--threads N]

`--workload uniform` (issue 2; same prompts, same number of new tokens per request:
min_new_tokens = max_new_tokens, every request sent at once). Columns:
  service      64 concurrent requests through `rlhf serve policy` (own process, gRPC, micro-batched)
  one-at-a-time  the same 64 generated one by one in-process with transformers' generate()
  static batch   the same 64 as one left-padded in-process batch with generate()
Targets (issue 2): service ≥ 10× one-at-a-time and ≥ 0.8× the static batch.

`--workload mixed` (issue 19): requests arrive over time (Poisson, `--rate` per second, the
first at t = 0), each with its own max_new_tokens drawn uniformly from [min-new, max-new],
temperature 1, no min_new_tokens (EOS ends a sample early). Both columns replay the same
arrival schedule in real time:
  service       each request sent through `AsyncPolicyClient` at its arrival time to
                `rlhf serve policy --backend <backend>` (own process, gRPC); the engine decides
                how to batch (continuous batching on both backends).
  static batch  a static server in this process: whenever it is idle it takes every request
                that has arrived and not been served (all of them, no cap) as one batch, runs it
                with one generate() call to the longest member's max_new_tokens (transformers:
                `model.generate`, left-padded, sampling, stops early only when every row has hit
                EOS; vLLM: `AsyncLLM` with max_tokens = the longest member's for every row of the
                batch), and answers all of them when the call returns; requests that arrive
                meanwhile wait for the next batch. Each row's useful tokens are its own
                max_new_tokens, or fewer up to and including its EOS; the rest is discarded.
Metrics per column: tokens/s = useful new tokens ÷ (last answer − first arrival); mean latency =
mean of (answer − arrival). Rounds alternate service, static (one warm-up each first) and the
table shows medians. Target (issue 19): service ≥ 1.5× the static batch in tokens/s and in mean
latency, on both backends.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # generation_vllm, beside this file


def prompts_for(n: int, seed: int = 0) -> list[str]:
    from rlhf.models.tiny import synthetic_corpus

    corpus = [line for line in synthetic_corpus() if 20 <= len(line) <= 80]
    rng = random.Random(seed)
    return [rng.choice(corpus) for _ in range(n)]


def bench_service(model_dir: Path, prompts: list[str], new_tokens: int, workdir: Path) -> float:
    from rlhf.procs import start_service
    from rlhf_client import AsyncPolicyClient, SamplingParams

    svc = start_service("policy", ["--model", str(model_dir), "--metrics-port", "0",
                                   "--max-batch-size", str(len(prompts))], workdir / "policy.log")
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, seed=1)

    async def run() -> float:
        async with AsyncPolicyClient(svc.target, timeout=600) as c:
            await asyncio.gather(*(c.generate([p], params) for p in prompts[:8]))  # warm-up
            t0 = time.perf_counter()
            results = await asyncio.gather(*(c.generate([p], params) for p in prompts))
            elapsed = time.perf_counter() - t0
        assert sum(len(r.completions[0].token_ids) for r in results) == new_tokens * len(prompts)
        return elapsed

    try:
        return asyncio.run(run())
    finally:
        svc.stop()


def _hf_generate(model, tok, batch: list[str], new_tokens: int):
    import torch

    enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return out


def bench_in_process(model_dir: Path, prompts: list[str], new_tokens: int) -> tuple[float, float]:
    from rich.progress import track

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir)
    tok = load_tokenizer(model_dir)
    _hf_generate(model, tok, prompts[:2], new_tokens)  # warm-up
    t0 = time.perf_counter()
    for p in track(prompts, description="one at a time", transient=True):
        _hf_generate(model, tok, [p], new_tokens)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    _hf_generate(model, tok, prompts, new_tokens)
    static = time.perf_counter() - t0
    return one, static


# ------------------------------------------------------------------------------------------------
# mixed workload: Poisson arrivals, mixed max_new_tokens, EOS allowed (issue 19)
# ------------------------------------------------------------------------------------------------


@dataclass
class Mixed:
    prompts: list[str]
    max_new: list[int]  # each request's max_new_tokens
    arrivals: list[float]  # seconds after the first request (arrivals[0] == 0)
    prompt_ids: list[list[int]] = field(default_factory=list)


@dataclass
class Round:
    """One replay of the schedule: per request, its useful new tokens and its latency."""

    tokens: list[int]
    latencies: list[float]
    span: float  # first arrival → last answer

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / self.span

    @property
    def mean_latency(self) -> float:
        return statistics.fmean(self.latencies)


def make_mixed(n: int, lo: int, hi: int, rate: float, seed: int = 0) -> Mixed:
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(rate)
    return Mixed(prompts_for(n, seed), [rng.randint(lo, hi) for _ in range(n)], arrivals)


def _useful(ids: list[int], limit: int, eos: set[int]) -> int:
    """New tokens a request keeps: its own limit, or fewer up to and including its first EOS."""
    for k, t in enumerate(ids[:limit]):
        if t in eos:
            return k + 1
    return min(len(ids), limit)


def request_seed(rep_seed: int, i: int) -> int:
    """The seed request `i` of a round carries, in the service column and the static one alike."""
    return rep_seed * 100_003 + i


async def service_mixed(client, work: Mixed, seed: int) -> Round:
    """Each request sent at its arrival time; latency = answer − arrival."""
    from rlhf_client import SamplingParams

    t0 = time.perf_counter()

    async def one(i: int) -> tuple[int, float]:
        await asyncio.sleep(max(0.0, t0 + work.arrivals[i] - time.perf_counter()))
        params = SamplingParams(temperature=1.0, max_new_tokens=work.max_new[i], seed=request_seed(seed, i))
        r = await client.generate([work.prompts[i]], params)
        done = time.perf_counter()
        n = len(r.completions[0].token_ids)
        assert 1 <= n <= work.max_new[i]
        return n, done - (t0 + work.arrivals[i])

    got = await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
    span = time.perf_counter() - t0
    return Round([n for n, _ in got], [lat for _, lat in got], span)


async def static_mixed(run_batch, work: Mixed, eos: set[int], seed: int) -> Round:
    """The static server: when idle, take every request arrived so far, run them as one batch
    to the longest member's max_new_tokens, answer all at the end. `run_batch(indices, limit,
    seeds)` returns each row's new token ids; `seeds`: each row's request seed, as the service
    column sends it (vLLM: each row then samples the service's tokens up to its own limit, so
    both columns keep the same useful tokens; hf's generate() draws from one generator)."""
    n = len(work.prompts)
    tokens, latencies = [0] * n, [0.0] * n
    t0 = time.perf_counter()
    nxt = 0
    while nxt < n:
        wait = t0 + work.arrivals[nxt] - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        now = time.perf_counter() - t0
        batch = [j for j in range(nxt, n) if work.arrivals[j] <= now]
        nxt += len(batch)
        rows = await run_batch(batch, max(work.max_new[j] for j in batch),
                               [request_seed(seed, j) for j in batch])
        done = time.perf_counter() - t0
        for j, ids in zip(batch, rows):
            tokens[j] = _useful(ids, work.max_new[j], eos)
            latencies[j] = done - work.arrivals[j]
    return Round(tokens, latencies, time.perf_counter() - t0)


def _hf_static(model_dir: Path):
    """`run_batch` for the static server on transformers, and the eos ids."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    model = load_causal_lm(model_dir)
    tok = load_tokenizer(model_dir)
    eos = {int(model.generation_config.eos_token_id), int(tok.eos_token_id)}
    state = {"prompts": []}

    def generate(batch: list[str], limit: int) -> list[list[int]]:
        enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=limit, pad_token_id=tok.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:].tolist()

    async def run_batch(indices: list[int], limit: int, seeds=None) -> list[list[int]]:
        return generate([state["prompts"][j] for j in indices], limit)  # blocks, as a server's worker

    generate(["warm up", "the model"], 4)
    return run_batch, eos, state


async def _vllm_static(model_dir: Path):
    """`run_batch` on an in-process vLLM AsyncLLM (same engine arguments as the vLLM service)."""
    from generation_vllm import VLLM_FLAGS
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from rlhf.config import Settings
    from rlhf.policy.engines.vllm import engine_args
    from rlhf.policy.types import sample_seed

    llm = AsyncLLM.from_engine_args(engine_args(Settings(metrics_port=None, **VLLM_FLAGS), model_dir))
    state = {"prompt_ids": []}

    async def one(ids: list[int], limit: int, seed: int) -> list[int]:
        sp = SamplingParams(temperature=1.0, max_tokens=limit, seed=seed, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in llm.generate(tokens_input(ids), sp, f"static-{time.monotonic_ns()}-{seed}"):
            final = out
        return list(final.outputs[0].token_ids)

    async def run_batch(indices: list[int], limit: int, seeds: list[int]) -> list[list[int]]:
        # the service's per-sample seed of each request (rlhf.policy.types.sample_seed)
        return list(await asyncio.gather(*(one(state["prompt_ids"][j], limit, sample_seed(s, 0, 0))
                                           for j, s in zip(indices, seeds))))

    await one([1, 2, 3], 4, 0)
    return llm, run_batch, state


def bench_mixed(model_dir: Path, work: Mixed, workdir: Path, backend: str, reps: int,
                max_batch: int, threads: int | None = None) -> dict[str, list[Round]]:
    """Start the service, then alternate service and static rounds (one warm-up round each).
    `threads`: torch intra-op threads of the hf service and of this process's static server."""
    from rlhf.models.loading import load_tokenizer
    from rlhf.procs import start_service
    from rlhf_client import AsyncPolicyClient

    tok = load_tokenizer(model_dir)
    work.prompt_ids = [tok.encode(p, add_special_tokens=False) for p in work.prompts]
    flags = ["--model", str(model_dir), "--metrics-port", "0", "--backend", backend]
    if backend == "vllm":
        from generation_vllm import VLLM_FLAGS, _cli_flags

        flags += _cli_flags(VLLM_FLAGS)
    else:
        flags += ["--max-batch-size", str(max_batch)]
        if threads:
            flags += ["--torch-threads", str(threads)]
    svc = start_service("policy", flags, workdir / f"policy-{backend}.log", ready_timeout=600)

    async def run() -> dict[str, list[Round]]:
        llm = None
        if backend == "vllm":
            llm, run_batch, state = await _vllm_static(model_dir)
            state["prompt_ids"] = work.prompt_ids
            eos = {int(tok.eos_token_id)}
        else:
            if threads:
                import torch

                torch.set_num_threads(threads)
            run_batch, eos, state = _hf_static(model_dir)
            state["prompts"] = work.prompts
        out: dict[str, list[Round]] = {"service": [], "static": []}
        try:
            async with AsyncPolicyClient(svc.target, timeout=900) as client:
                warm = Mixed(work.prompts[:8], [8] * 8, [0.0] * 8)
                await service_mixed(client, warm, seed=0)
                await static_mixed(run_batch, warm, eos, seed=0)
                for rep in range(reps):
                    out["service"].append(await service_mixed(client, work, seed=rep + 1))
                    out["static"].append(await static_mixed(run_batch, work, eos, seed=rep + 1))
                    for key in out:  # progress, in case a long run is cut short
                        r = out[key][-1]
                        print(f"round {rep + 1} {key}: {r.tokens_per_s:.0f} tok/s, mean latency "
                              f"{r.mean_latency:.2f} s, span {r.span:.2f} s", file=sys.stderr, flush=True)
        finally:
            if llm is not None:
                llm.shutdown()
        return out

    try:
        return asyncio.run(run())
    finally:
        svc.stop()


def main_mixed(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from rlhf.models.tiny import make_tiny_model

    console = Console(width=120)
    work = make_mixed(args.requests, args.min_new, args.max_new, args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("policy", Path(tmp) / "policy", size=args.size, seed=0)
        with console.status(f"mixed workload on {args.backend}: alternating rounds…"):
            res = bench_mixed(model_dir, work, Path(tmp), args.backend, args.reps, args.requests,
                              args.threads)
    med = {k: (statistics.median(r.tokens_per_s for r in v), statistics.median(r.mean_latency for r in v),
               statistics.median(sum(r.tokens) for r in v), statistics.median(r.span for r in v))
           for k, v in res.items()}
    title = (f"mixed generation ({args.backend}), {args.size} policy, {args.requests} requests, Poisson "
             f"{args.rate}/s over {work.arrivals[-1]:.1f} s, max_new_tokens {args.min_new}–{args.max_new} "
             f"(Σ {sum(work.max_new)}), EOS allowed; medians of {args.reps} rounds")
    t = Table(title=title)
    for col in ("path", "useful tokens", "span s", "tokens/s", "mean latency s", "p50 / p90 latency s"):
        t.add_column(col, justify="right")
    names = {"service": f"service ({args.backend}, gRPC, continuous batching)",
             "static": "static batch in-process (arrival windows, to longest)"}
    for key, rounds in res.items():
        lat = sorted(x for r in rounds for x in r.latencies)
        tps, ml, toks, span = med[key]
        t.add_row(names[key], f"{toks:.0f}", f"{span:.2f}", f"{tps:.0f}", f"{ml:.2f}",
                  f"{lat[len(lat) // 2]:.2f} / {lat[int(len(lat) * 0.9)]:.2f}")
    console.print(t)
    for key, rounds in res.items():
        console.print(f"  {key} rounds: " + "; ".join(
            f"{r.tokens_per_s:.0f} tok/s, {r.mean_latency:.2f} s" for r in rounds))
    tput = med["service"][0] / med["static"][0]
    lat = med["static"][1] / med["service"][1]
    for what, ratio in (("tokens/s", tput), ("mean latency", lat)):
        console.print(f"service vs static batch, {what}: {ratio:.2f}× (target ≥ 1.5×: "
                      f"{'met' if ratio >= 1.5 else 'NOT met'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--workload", choices=["uniform", "mixed"], default="uniform")
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="mixed workload only")
    ap.add_argument("--rate", type=float, default=16.0, help="mixed: arrivals per second (Poisson)")
    ap.add_argument("--min-new", type=int, default=8, help="mixed: smallest max_new_tokens")
    ap.add_argument("--max-new", type=int, default=256, help="mixed: largest max_new_tokens")
    ap.add_argument("--reps", type=int, default=2, help="mixed: timed rounds per column")
    ap.add_argument("--threads", type=int, default=None,
                    help="mixed, hf: torch threads of the service and of the static server (default: torch's)")
    args = ap.parse_args(argv)
    if args.workload == "mixed":
        return main_mixed(args)

    from rich.console import Console
    from rich.table import Table

    from rlhf.models.tiny import make_tiny_model

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model("policy", work / "policy", size=args.size, seed=0)
        prompts = prompts_for(args.requests)
        tokens = args.requests * args.new_tokens
        with console.status("service: concurrent requests…"):
            service_s = bench_service(model_dir, prompts, args.new_tokens, work)
        with console.status("in-process transformers…"):
            one_s, static_s = bench_in_process(model_dir, prompts, args.new_tokens)
    table = Table(title=f"generation, {args.size} policy, {args.requests} requests × {args.new_tokens} new tokens")
    for col in ("path", "seconds", "tokens/s", "service ÷ path"):
        table.add_column(col, justify="right")
    for name, secs in (("service (gRPC, micro-batched)", service_s), ("one at a time, in-process", one_s),
                       ("static batch, in-process", static_s)):
        table.add_row(name, f"{secs:.2f}", f"{tokens / secs:.0f}", f"{secs / service_s:.2f}×")
    console.print(table)
    ok10 = one_s / service_s >= 10
    ok08 = static_s / service_s >= 0.8
    console.print(f"service vs one-at-a-time: {one_s / service_s:.1f}× (target ≥ 10×: {'met' if ok10 else 'NOT met'})")
    console.print(f"service vs static batch: {static_s / service_s:.2f}× (target ≥ 0.8×: {'met' if ok08 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
