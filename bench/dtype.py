"""Decode speed per weights dtype on the `small` policy, against the machine's matmul limit
for that dtype, measured in the same run.

    python bench/dtype.py [--size small] [--dtypes float32,bfloat16] [--batch 64]
                          [--prompt-tokens 24] [--steps 32] [--seconds 20] [--threads 2]
                          [--matmul 2048] [--profile] [--cache engine|dynamic]
                          [--model-dir DIR]

For each dtype, in this process, one after the other:
  decode   the policy loaded through the services' loading path (`load_causal_lm` with the
           dtype `RLHF_DTYPE` would give it), `--batch` rows of `--prompt-tokens` prompt
           tokens prefilled, then one token per row per step with the engine's KV cache (`--cache`) — the same
           forward the hf engine runs (`attention_mask`, `position_ids` from the mask,
           `logits_to_keep=1`, logits upcast to fp32, log-softmax, argmax). Only the steps are
           timed; a dtype stops after `--steps` steps or `--seconds`, whichever comes first
           (bf16 on a CPU without bf16 matrix instructions is slow).
           tokens/s = rows × steps ÷ seconds.
           FLOP/s = tokens/s × FLOPs of one decode token: 2 × the weights of every linear
           layer it runs (projections, MLP, LM head) + 4 × layers × heads × head_dim × context
           (attention scores and values; context averaged over the timed steps).
  limit    the machine's matmul rate for the dtype, two ways: the best of `F.linear` on
           square matrices 512², 1024², … `--matmul`² (a size is skipped when one call would
           take over ~20 s: bf16 without bf16 instructions), and the matmuls of one decode step
           themselves — (batch × in) @ (in × out) for every linear layer and the LM head, on
           random data, back to back (what the step could reach with zero overhead around its
           matmuls). Each is repeated for a few seconds after one warm-up.
Ratios printed: decode tokens/s of each dtype ÷ fp32's (target for bf16: ≥ 1.6×), decode
FLOP/s ÷ the square-matmul limit of the same dtype (target: ≥ 0.5), and ÷ the step's own
matmul shapes (1.0 = nothing but matmuls; the rest of a step is attention, KV-cache copies,
norms, activations, the fp32 sampling tail and Python).

`--profile`: a torch.profiler breakdown of a few decode steps per dtype (matmuls, attention,
concatenations — KV-cache append, rotary — norms/activations, the sampling tail, the rest):
where a step's time goes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def _cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "?"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in flags) or "none of avx2/avx512/amx"


def matmul_rate(torch, dtype, m: int, k: int, n: int, seconds: float = 3.0) -> tuple[float, float]:
    """(GFLOP/s, seconds of one call) of `F.linear` (m×k)·(n×k)ᵀ in `dtype` — the layout a
    linear layer multiplies in (it matters: torch's bf16 fallback kernel is ~7× slower on
    (m×k)@(k×n)) —: one warm-up, then repeats for ~`seconds` (a call slower than `seconds / 2`
    is measured once, by its warm-up)."""
    mm = torch.nn.functional.linear
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(n, k).to(dtype)
    t = time.perf_counter()
    mm(a, b)  # warm-up (and a first estimate of the time)
    once = time.perf_counter() - t
    if once > seconds / 2:  # a slow kernel (bf16 without bf16 instructions): one call is enough
        return 2.0 * m * k * n / once / 1e9, once
    reps = max(1, min(200, int(seconds / max(once, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        mm(a, b)
    dt = (time.perf_counter() - t) / reps
    return 2.0 * m * k * n / dt / 1e9, dt


def square_limit(torch, dtype, largest: int, budget_s: float = 20.0) -> tuple[float, int]:
    """Best GFLOP/s of square matmuls 512², 1024², … up to `largest`², skipping a size whose
    predicted call time (8× the previous one) exceeds `budget_s`; (rate, side it came from)."""
    best, side, n = 0.0, 0, 512
    while n <= largest:
        rate, once = matmul_rate(torch, dtype, n, n, n)
        if rate > best:
            best, side = rate, n
        if once * 8 > budget_s:
            break
        n *= 2
    return best, side


def model_matmul_rate(torch, dtype, model, batch: int, seconds: float = 3.0) -> float:
    """GFLOP/s of the matmuls one decode step runs — (batch × in) @ (in × out) for every linear
    layer and the LM head, `F.linear` (no bias) on random data of the dtype, back to back."""
    shapes = [(m.in_features, m.out_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]
    xs = {k: torch.randn(batch, k).to(dtype) for k, _ in shapes}
    ws = [torch.randn(n, k).to(dtype) for k, n in shapes]
    flops = sum(2.0 * batch * k * n for k, n in shapes)

    def one_step():
        for (k, _), w in zip(shapes, ws):
            torch.nn.functional.linear(xs[k], w)

    t = time.perf_counter()
    one_step()
    once = time.perf_counter() - t
    reps = max(1, min(100, int(seconds / max(once, 1e-6))))
    t = time.perf_counter()
    for _ in range(reps):
        one_step()
    return flops * reps / (time.perf_counter() - t) / 1e9


def decode_flops_per_token(model, context: float) -> float:
    """2 × weights of the linear layers one decode token runs + attention over `context`."""
    import torch

    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if model.get_output_embeddings() is not None and not any(
        model.get_output_embeddings() is m for m in model.modules() if isinstance(m, torch.nn.Linear)
    ):
        linear += model.get_output_embeddings().weight.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context
    return 2.0 * linear + attention


class Decoder:
    """The hf engine's decode step on a left-padded batch (same model call, same fp32 tail)."""

    def __init__(self, model, prompts: list[list[int]], pad_id: int, cache: str = "engine"):
        import torch
        from transformers.cache_utils import DynamicCache

        from rlhf.policy.engines.kv_cache import new_cache

        self.torch = torch
        self.model = model
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        self.attn = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            self.attn[i, width - len(p):] = 1
        # the engine's cache (appends in place) or transformers' own (concatenates every step)
        self.cache = new_cache(model.config) if cache == "engine" else DynamicCache(config=model.config)
        positions = (self.attn.cumsum(-1) - 1).clamp_(min=0)
        self.next = self._pick(self._forward(ids, positions))

    def _forward(self, ids, positions):
        out = self.model(input_ids=ids, attention_mask=self.attn, position_ids=positions,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _pick(self, logits):
        logprobs = self.torch.log_softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        logprobs.gather(1, tokens[:, None])
        return tokens

    def step(self) -> None:
        torch = self.torch
        self.attn = torch.cat([self.attn, torch.ones((self.attn.shape[0], 1), dtype=self.attn.dtype)], -1)
        positions = self.attn.sum(-1, keepdim=True) - 1
        self.next = self._pick(self._forward(self.next[:, None], positions))

    @property
    def context(self) -> int:
        return int(self.attn.shape[1])


_CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                "mkldnn", "aten::_mkl", "onednn")),
    ("attention", ("scaled_dot_product", "_flash_attention", "aten::_softmax_backward",
                   "attention")),
    ("cat (KV-cache append, rotary rotate_half)", ("aten::cat",)),
    ("norm / activation / rope", ("aten::pow", "aten::rsqrt", "aten::mean", "aten::silu",
                                  "aten::mul", "aten::add", "aten::neg", "aten::sin",
                                  "aten::cos", "aten::to", "aten::_to_copy", "aten::copy_")),
    ("fp32 tail (log-softmax, argmax)", ("aten::_log_softmax", "aten::argmax", "aten::gather",
                                         "aten::log_softmax")),
)


def profile_steps(decoder: Decoder, steps: int) -> list[tuple[str, float]]:
    """Self CPU time per category over `steps` decode steps, as fractions of the total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            decoder.step()
    totals: dict[str, float] = {}
    top: list[tuple[float, str]] = []
    all_self = 0.0
    for ev in prof.key_averages():
        t = ev.self_cpu_time_total
        all_self += t
        top.append((t, ev.key))
        for name, keys in _CATEGORIES:
            if any(k in ev.key for k in keys):
                totals[name] = totals.get(name, 0.0) + t
                break
        else:
            totals["other (python, views, dispatch)"] = totals.get("other (python, views, dispatch)", 0.0) + t
    top.sort(reverse=True)
    print("    top ops (self CPU): " + ", ".join(f"{k} {t / all_self:.0%}" for t, k in top[:8]))
    return sorted(((k, v / all_self) for k, v in totals.items()), key=lambda kv: -kv[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small"])
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0, help="most timed decode seconds per dtype")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (decode and matmul alike; 1: see the docs)")
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square matmul")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="a causal LM checkpoint directory (Hugging Face layout, safetensors) to "
                    "measure instead of the tiny `--size` model")
    ap.add_argument("--cache", default="engine", choices=["engine", "dynamic"],
                    help="KV cache: the hf engine's (rlhf.policy.engines.kv_cache, appends in "
                    "place) or transformers' DynamicCache (concatenates the cache every step)")
    args = ap.parse_args(argv)

    import torch

    from rlhf.models.loading import cpu_has_fast_bf16, load_causal_lm, resolve_dtype
    from rlhf.models.tiny import make_tiny_model

    torch.set_num_threads(args.threads)
    dtypes = args.dtypes.split(",")
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, flags: {_cpu_flags()}, "
          f"native bf16 matmul: {cpu_has_fast_bf16()}; load average {os.getloadavg()[0]:.2f}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        model_dir = args.model_dir or make_tiny_model("policy", Path(tmp) / "policy",
                                                      size=args.size, seed=0)
        for name in dtypes:
            model = load_causal_lm(model_dir, dtype=resolve_dtype(name, "cpu")).requires_grad_(False)
            cfg = model.config
            rng = random.Random(0)
            prompts = [[rng.randrange(3, cfg.vocab_size) for _ in range(args.prompt_tokens)]
                       for _ in range(args.batch)]
            with torch.inference_mode():
                dec = Decoder(model, prompts, pad_id=0, cache=args.cache)
                dec.step()  # warm-up step
                ctx0 = dec.context
                steps, t0 = 0, time.perf_counter()
                while steps < args.steps and (steps < 2 or time.perf_counter() - t0 < args.seconds):
                    dec.step()
                    steps += 1
                secs = time.perf_counter() - t0
                context = (ctx0 + dec.context) / 2
                tps = args.batch * steps / secs
                flops = tps * decode_flops_per_token(model, context)
                prof = profile_steps(dec, 3) if args.profile else None
            square, side = square_limit(torch, getattr(torch, name), args.matmul)
            shaped = model_matmul_rate(torch, getattr(torch, name), model, args.batch)
            rows.append(dict(dtype=name, steps=steps, secs=secs, tps=tps, gflops=flops / 1e9,
                             square=square, side=side, shaped=shaped, load=os.getloadavg()[0]))
            print(f"{name}: {steps} steps × {args.batch} rows in {secs:.2f} s → {tps:.1f} tokens/s, "
                  f"{flops / 1e9:.1f} GFLOP/s; best square matmul {square:.1f} GFLOP/s "
                  f"({side}²), the step's own matmul shapes {shaped:.1f} GFLOP/s; "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)
            if prof:
                print("    decode step time: " + ", ".join(f"{k} {v:.0%}" for k, v in prof))
            del model, dec

    base = next((r for r in rows if r["dtype"] == "float32"), rows[0])
    print()
    print("| dtype | decode tokens/s | ÷ fp32 | decode GFLOP/s | square matmul GFLOP/s (side) "
          "| decode ÷ square | the step's matmul shapes GFLOP/s | decode ÷ those |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['tps']:.1f} | {r['tps'] / base['tps']:.2f}× | {r['gflops']:.1f} "
              f"| {r['square']:.1f} ({r['side']}²) | {r['gflops'] / r['square']:.2f} "
              f"| {r['shaped']:.1f} | {r['gflops'] / r['shaped']:.2f} |")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
