"""Generation on vLLM: the policy service vs. vLLM's AsyncLLM in-process, and vLLM vs. transformers.

    python bench/generation_vllm.py [--size small] [--requests 64] [--min-new 8] [--max-new 128] [--reps 5]

One workload for every column: `--requests` concurrent requests, one prompt each, with mixed
output lengths drawn from [min-new, max-new] (each request's length is fixed with
min_new_tokens = max_new_tokens, so every path generates exactly the same number of tokens),
temperature 1.

Columns:
  vLLM service      `rlhf serve policy --backend vllm` in its own process; the requests sent
                    concurrently through `AsyncPolicyClient` (gRPC, one vLLM request per sample)
  AsyncLLM          the same token-id prompts and lengths submitted in this process straight to
                    vLLM's `AsyncLLM`, same engine arguments (final outputs only, no detokenizing:
                    the cheapest way to use it)
  HF service        `rlhf serve policy` (transformers backend, micro-batched) on the same workload
Targets (vLLM issue): vLLM service ≥ 0.9× AsyncLLM (gRPC and service overhead ≤ 10 %).

Every path is started first, then the rounds interleave (one warm-up round each, then `--reps`
timed rounds), so load from elsewhere on the machine hits every path alike; the table shows the
median and the best. `bench/generation.py` calls `bench_vllm()` for its vLLM column.
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

# Engine settings every vLLM path uses (CPU build: small KV cache, eager mode).
VLLM_FLAGS = {
    "vllm_max_model_len": 512,
    "vllm_kv_cache_space_gb": 1.0,
    "vllm_enforce_eager": True,
    "vllm_max_num_seqs": 256,
}


@dataclass
class Workload:
    prompts: list[str]
    lengths: list[int]  # new tokens of each request (min = max)
    prompt_ids: list[list[int]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)


def make_workload(n: int, lo: int, hi: int, seed: int = 0) -> Workload:
    from rlhf.models.tiny import synthetic_corpus

    corpus = [line for line in synthetic_corpus() if 20 <= len(line) <= 80]
    rng = random.Random(seed)
    prompts = [rng.choice(corpus) for _ in range(n)]
    lengths = [rng.randint(lo, hi) for _ in range(n)]
    return Workload(prompts, lengths)


def _cli_flags(flags: dict) -> list[str]:
    out = []
    for key, value in flags.items():
        name = "--" + key.removeprefix("vllm_").replace("_", "-")
        if value is True:
            out.append(name)
        else:
            out += [name, str(value)]
    return out


# ------------------------------------------------------------------------------------------------
# one timed round of each path
# ------------------------------------------------------------------------------------------------


async def service_round(client, work: Workload) -> float:
    """The workload through a policy service: every request at once, one prompt each."""
    from rlhf_client import SamplingParams

    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        client.generate([p], SamplingParams(temperature=1.0, min_new_tokens=n, max_new_tokens=n, seed=i))
        for i, (p, n) in enumerate(zip(work.prompts, work.lengths))
    ))
    elapsed = time.perf_counter() - t0
    got = [len(r.completions[0].token_ids) for r in results]
    assert got == work.lengths, "every request must generate exactly its length"
    return elapsed


async def async_llm_round(llm, work: Workload) -> float:
    """The same requests (token-id prompts) submitted straight to an in-process AsyncLLM."""
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind

    async def one(k: int, prompt: list[int], n: int) -> int:
        sp = SamplingParams(temperature=1.0, min_tokens=n, max_tokens=n, seed=k, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        final = None
        async for out in llm.generate(tokens_input(prompt), sp, f"bench-{time.monotonic_ns()}-{k}"):
            final = out
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    got = await asyncio.gather(*(one(k, p, n) for k, (p, n) in enumerate(zip(work.prompt_ids, work.lengths))))
    elapsed = time.perf_counter() - t0
    assert list(got) == work.lengths
    return elapsed


# ------------------------------------------------------------------------------------------------
# what the main bench calls
# ------------------------------------------------------------------------------------------------


PATHS = ("vllm-service", "async-llm", "hf-service")


def bench_vllm(model_dir: Path, work: Workload, workdir: Path, *, reps: int = 5,
               paths: tuple[str, ...] = PATHS) -> dict[str, list[float]]:
    """Seconds per timed round of each of `paths` ("vllm-service", "async-llm", "hf-service").

    Every path is started first (an idle vLLM engine uses about 1 % of a core), then the rounds
    interleave — vLLM service, AsyncLLM, HF service, again — so a load that comes and goes on
    the machine hits every path alike. One warm-up round each, then `reps` timed rounds.
    """
    from rlhf.config import Settings
    from rlhf.models.loading import load_tokenizer
    from rlhf.policy.engines.vllm import engine_args
    from rlhf.procs import start_service
    from rlhf_client import AsyncPolicyClient

    tok = load_tokenizer(model_dir)
    work.prompt_ids = [tok.encode(p, add_special_tokens=False) for p in work.prompts]
    common = ["--model", str(model_dir), "--metrics-port", "0"]
    services = {}
    try:
        if "vllm-service" in paths:
            services["vllm-service"] = start_service(
                "policy", common + ["--backend", "vllm", *_cli_flags(VLLM_FLAGS)],
                workdir / "policy-vllm.log", ready_timeout=600)
        if "hf-service" in paths:
            services["hf-service"] = start_service(
                "policy", common + ["--backend", "hf", "--max-batch-size", str(len(work.prompts))],
                workdir / "policy-hf.log", ready_timeout=600)

        async def run() -> dict[str, list[float]]:
            llm = None
            if "async-llm" in paths:
                from vllm.v1.engine.async_llm import AsyncLLM

                llm = AsyncLLM.from_engine_args(engine_args(Settings(metrics_port=None, **VLLM_FLAGS), model_dir))
            clients = {k: AsyncPolicyClient(s.target, timeout=900) for k, s in services.items()}
            rounds = {
                "vllm-service": lambda: service_round(clients["vllm-service"], work),
                "async-llm": lambda: async_llm_round(llm, work),
                "hf-service": lambda: service_round(clients["hf-service"], work),
            }
            out: dict[str, list[float]] = {k: [] for k in PATHS if k in paths}
            try:
                for rep in range(reps + 1):
                    for key in out:
                        secs = await rounds[key]()
                        if rep:  # round 0 is the warm-up
                            out[key].append(secs)
            finally:
                for c in clients.values():
                    await c.close()
                if llm is not None:
                    llm.shutdown()
            return out

        return asyncio.run(run())
    finally:
        for svc in services.values():
            svc.stop()


def table(results: dict[str, list[float]], work: Workload, title: str):
    from rich.table import Table

    names = {"vllm-service": "vLLM service (gRPC)", "async-llm": "AsyncLLM in-process",
             "hf-service": "HF service (gRPC)"}
    base = statistics.median(next(iter(results.values())))  # the first path measured
    t = Table(title=title)
    first = names[next(iter(results))]
    for col in ("path", "median s", "best s", "tokens/s (median)", f"{first} ÷ path"):
        t.add_column(col, justify="right")
    for key, secs in results.items():
        med = statistics.median(secs)
        t.add_row(names[key], f"{med:.2f}", f"{min(secs):.2f}", f"{work.tokens / med:.0f}", f"{med / base:.2f}×")
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--min-new", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {','.join(PATHS)}")
    args = ap.parse_args(argv)

    from rich.console import Console

    from rlhf.models.tiny import make_tiny_model

    console = Console(width=120)
    work = make_workload(args.requests, args.min_new, args.max_new)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("policy", Path(tmp) / "policy", size=args.size, seed=0)
        with console.status("starting the engines, then interleaved rounds…"):
            results = bench_vllm(model_dir, work, Path(tmp), reps=args.reps, paths=tuple(args.paths.split(",")))
    title = (f"generation on vLLM, {args.size} policy, {args.requests} concurrent requests × "
             f"{args.min_new}–{args.max_new} new tokens ({work.tokens} tokens)")
    console.print(table(results, work, title))
    for key, secs in results.items():
        console.print(f"  {key} rounds (s): " + " ".join(f"{x:.2f}" for x in secs))
    med = {k: statistics.median(v) for k, v in results.items()}
    if "vllm-service" in med and "async-llm" in med:
        ratio = med["async-llm"] / med["vllm-service"]
        console.print(f"vLLM service vs AsyncLLM in-process: {ratio:.2f}× (target ≥ 0.9×: "
                      f"{'met' if ratio >= 0.9 else 'NOT met'})")
    if "vllm-service" in med and "hf-service" in med:
        console.print(f"vLLM service vs HF service: {med['hf-service'] / med['vllm-service']:.2f}× faster")
    return 0


if __name__ == "__main__":  # vLLM starts its engine processes with spawn: keep this guard
    sys.exit(main())
