"""The OpenAI-compatible HTTP API vs. the gRPC API of ONE policy service, measured side by side.

    python bench/http_vs_grpc.py [--backend hf|vllm] [--size small] [--requests 256]
                                 [--concurrency 64] [--max-tokens 32] [--rounds 3]
                                 [--paths grpc,openai,aiohttp]

One `rlhf serve policy --http-port <free>` in its own process (a tiny policy made on the spot,
auth on: every request carries the bearer token), one workload for every path: `--requests`
requests of one prompt each (lines of the tiny models' synthetic corpus), at most
`--concurrency` in flight, `max_tokens` new tokens, temperature 1, request i seeded with i.

Paths:
  grpc      `AsyncPolicyClient.generate` (rlhf_client, grpc.aio)
  openai    `openai.AsyncOpenAI(base_url=.../v1).completions.create` (the SDK applications use)
  aiohttp   a bare `POST /v1/completions` with aiohttp (what the HTTP front itself costs, without
            the SDK's parsing on these same cores)

Every path is set up first, then the rounds interleave (one warm-up round each, then `--rounds`
timed rounds: grpc, openai, aiohttp, again), so load from elsewhere on the machine hits every
path alike. Tokens are what the server says it generated (gRPC: the token ids; HTTP:
usage.completion_tokens). Latency is per request, client side, from sending it to its last byte.
Target: every HTTP path ≥ 0.9× the gRPC path's tokens/s (medians of the rounds).
Results go to .cache/bench/http_vs_grpc-<backend>-<size>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

PATHS = ("grpc", "openai", "aiohttp")
TARGET = 0.9
# Engine settings for the vLLM backend (CPU build: small KV cache, eager mode), as in
# bench/generation_vllm.py.
VLLM_ARGS = ["--max-model-len", "512", "--kv-cache-space-gb", "1", "--enforce-eager", "--max-num-seqs", "256"]


def prompts_for(n: int, seed: int = 0) -> list[str]:
    from rlhf.models.tiny import synthetic_corpus

    corpus = [line for line in synthetic_corpus() if 20 <= len(line) <= 80]
    rng = random.Random(seed)
    return [rng.choice(corpus) for _ in range(n)]


@dataclass
class Round:
    path: str
    seconds: float
    tokens: int
    latencies: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


# ------------------------------------------------------------------------------------------------
# one request through each path: returns the number of new tokens
# ------------------------------------------------------------------------------------------------


class GrpcPath:
    name = "grpc"

    def __init__(self, target: str, token: str):
        from rlhf_client import AsyncPolicyClient

        self.client = AsyncPolicyClient(target, token=token, timeout=600)

    async def start(self) -> None:
        await self.client.get_model()

    async def one(self, prompt: str, max_tokens: int, seed: int) -> int:
        from rlhf_client import SamplingParams

        params = SamplingParams(temperature=1.0, max_new_tokens=max_tokens, seed=seed)
        result = await self.client.generate([prompt], params)
        return len(result.completions[0].token_ids)

    async def close(self) -> None:
        await self.client.close()


class OpenAIPath:
    name = "openai"

    def __init__(self, base_url: str, token: str, concurrency: int):
        import httpx
        import openai

        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=600,
                                         http_client=openai.DefaultAsyncHttpxClient(limits=limits))
        self.model = None

    async def start(self) -> None:
        self.model = (await self.client.models.list()).data[0].id

    async def one(self, prompt: str, max_tokens: int, seed: int) -> int:
        resp = await self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                                    temperature=1.0, seed=seed)
        return resp.usage.completion_tokens

    async def close(self) -> None:
        await self.client.close()


class AiohttpPath:
    name = "aiohttp"

    def __init__(self, base_url: str, token: str, concurrency: int):
        self.url = base_url + "/completions"
        self.models_url = base_url + "/models"
        self.headers = {"Authorization": f"Bearer {token}"}
        self.concurrency = concurrency
        self.session = None
        self.model = None
        self.versions: set[str] = set()

    async def start(self) -> None:
        import aiohttp

        self.session = aiohttp.ClientSession(
            headers=self.headers, connector=aiohttp.TCPConnector(limit=self.concurrency),
            timeout=aiohttp.ClientTimeout(total=600))
        async with self.session.get(self.models_url) as r:
            r.raise_for_status()
            self.model = (await r.json())["data"][0]["id"]

    async def one(self, prompt: str, max_tokens: int, seed: int) -> int:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed}
        async with self.session.post(self.url, json=body) as r:
            payload = await r.json()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {payload}")
            self.versions.add(r.headers.get("X-Model-Version", ""))
        return payload["usage"]["completion_tokens"]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


# ------------------------------------------------------------------------------------------------
# rounds
# ------------------------------------------------------------------------------------------------


async def run_round(path, prompts: list[str], max_tokens: int, concurrency: int, progress=None) -> Round:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    task = progress.add_task(f"{path.name}", total=len(prompts)) if progress is not None else None

    async def one(i: int, prompt: str) -> int:
        async with sem:
            t0 = time.perf_counter()
            n = await path.one(prompt, max_tokens, seed=i)
            latencies.append(time.perf_counter() - t0)
        if progress is not None:
            progress.advance(task)
        return n

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.remove_task(task)
    assert all(0 <= n <= max_tokens for n in tokens), f"{path.name}: token counts {sorted(set(tokens))}"
    return Round(path.name, elapsed, sum(tokens), latencies)


async def wait_http_ready(url: str, timeout: float = 120) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{url} not 200 after {timeout}s")


async def bench(http_base: str, grpc_target: str, token: str, args, console) -> dict[str, list[Round]]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    await wait_http_ready(http_base.removesuffix("/v1") + "/health")
    makers = {
        "grpc": lambda: GrpcPath(grpc_target, token),
        "openai": lambda: OpenAIPath(http_base, token, args.concurrency),
        "aiohttp": lambda: AiohttpPath(http_base, token, args.concurrency),
    }
    paths = [makers[p]() for p in args.paths]
    for path in paths:
        await path.start()
    prompts = prompts_for(args.requests)
    rounds: dict[str, list[Round]] = {p.name: [] for p in paths}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            for r in range(args.rounds + 1):
                # alternate who goes first, so neither path always follows the other
                order = paths if r % 2 == 0 else paths[::-1]
                for path in order:
                    res = await run_round(path, prompts, args.max_tokens, args.concurrency, progress)
                    if r > 0:  # round 0 is the warm-up
                        rounds[path.name].append(res)
                        progress.console.log(f"round {r} {path.name}: {res.seconds:.2f} s, {res.tokens_per_s:.0f} tok/s")
                    else:
                        progress.console.log(f"warm-up {path.name}: {res.seconds:.2f} s")
        aio = next((p for p in paths if isinstance(p, AiohttpPath)), None)
        if aio is not None:
            assert aio.versions and "" not in aio.versions, f"X-Model-Version missing: {aio.versions}"
    finally:
        for p in paths:
            await p.close()
    return rounds


def summary(rounds: list[Round]) -> dict:
    lat = sorted(x for r in rounds for x in r.latencies)
    tps = [r.tokens_per_s for r in rounds]
    return dict(
        rounds_s=[round(r.seconds, 3) for r in rounds],
        rounds_tokens_per_s=[round(x, 1) for x in tps],
        tokens=rounds[0].tokens if rounds else 0,
        tokens_per_s_median=statistics.median(tps),
        tokens_per_s_best=max(tps),
        latency_mean_s=statistics.fmean(lat),
        latency_p50_s=statistics.median(lat),
        latency_p95_s=statistics.quantiles(lat, n=100)[94],
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per path (after one warm-up)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {','.join(PATHS)}")
    ap.add_argument("--torch-threads", type=int, default=None, help="the service's torch intra-op threads")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default .cache/bench/...)")
    args = ap.parse_args(argv)
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    if not set(args.paths) <= set(PATHS) or "grpc" not in args.paths or len(args.paths) < 2:
        ap.error(f"--paths: grpc and at least one of openai, aiohttp (from {PATHS})")

    from rich.console import Console
    from rich.table import Table

    from rlhf.models.tiny import make_tiny_model
    from rlhf.procs import free_port, start_service

    console = Console()
    token = secrets.token_urlsafe(16)
    env = {**os.environ, "RLHF_AUTH_TOKEN": token}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model("policy", work / "policy", size=args.size, seed=0)
        http_port = free_port()
        svc_args = ["--model", str(model_dir), "--http-port", str(http_port), "--metrics-port", "0",
                    "--backend", args.backend]
        if args.backend == "hf":
            svc_args += ["--max-batch-size", str(args.concurrency)]
        else:
            svc_args += VLLM_ARGS
        if args.torch_threads:
            svc_args += ["--torch-threads", str(args.torch_threads)]
        with console.status(f"starting rlhf serve policy --backend {args.backend} --http-port {http_port}…"):
            svc = start_service("policy", svc_args, work / "policy.log", env=env, ready_timeout=600)
        try:
            rounds = asyncio.run(bench(f"http://127.0.0.1:{http_port}/v1", svc.target, token, args, console))
        finally:
            svc.stop()

    results = {p: summary(rs) for p, rs in rounds.items()}
    grpc_tps = results["grpc"]["tokens_per_s_median"]
    for p, r in results.items():
        r["ratio_vs_grpc"] = r["tokens_per_s_median"] / grpc_tps

    title = (f"HTTP vs gRPC, one {args.backend} policy service ({args.size}), {args.requests} requests, "
             f"{args.concurrency} concurrent, max_tokens {args.max_tokens}, {args.rounds} rounds")
    table = Table(title=title)
    for col in ("path", "tokens/s (median / best)", "latency mean", "p50", "p95", "÷ gRPC"):
        table.add_column(col, justify="right")
    for p, r in results.items():
        table.add_row(p, f"{r['tokens_per_s_median']:.0f} / {r['tokens_per_s_best']:.0f}",
                      f"{r['latency_mean_s'] * 1e3:.0f} ms", f"{r['latency_p50_s'] * 1e3:.0f} ms",
                      f"{r['latency_p95_s'] * 1e3:.0f} ms", f"{r['ratio_vs_grpc']:.2f}×")
    console.print(table)
    for p, r in results.items():
        if p != "grpc":
            met = r["ratio_vs_grpc"] >= TARGET
            console.print(f"{p} ÷ grpc: {r['ratio_vs_grpc']:.2f}× (target ≥ {TARGET}×: {'met' if met else 'NOT met'})")

    out = args.out or Path(".cache/bench") / f"http_vs_grpc-{args.backend}-{args.size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(json.dumps(dict(
        bench="http_vs_grpc", when=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        load_average=os.getloadavg(), cpus=os.cpu_count(), config=config, results=results,
        rounds={p: [asdict(r) | {"latencies": None} for r in rs] for p, rs in rounds.items()},
    ), indent=2, default=str))
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
