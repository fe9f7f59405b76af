"""Generation throughput: the policy service vs. in-process transformers, measured side by side.

    python bench/generation.py [--size small] [--requests 64] [--new-tokens 32]

Columns (same prompts, same number of new tokens per request: min_new_tokens = max_new_tokens):
  service      64 concurrent requests through `rlhf serve policy` (own process, gRPC, micro-batched)
  one-at-a-time  the same 64 generated one by one in-process with transformers' generate()
  static batch   the same 64 as one left-padded in-process batch with generate()
Targets (issue 2): service ≥ 10× one-at-a-time and ≥ 0.8× the static batch.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

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
