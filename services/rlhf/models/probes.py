"""Golden probes: what a fresh load of a version answers to fixed inputs, kept in its manifest.

A service that swaps to a version replays the probes on the weights it loaded and switches only
when the answers match: in-place weight reloads have been seen to fail silently (outputs change,
no error), so a swap is trusted only after this check.

- policy: greedy token ids for fixed prompts, with the teacher-forced log-probs of those tokens;
  fp32 engines must reproduce the ids exactly, lower-precision engines (bf16 on GPU) are checked
  on the log-probs within a tolerance suited to their dtype (see `TOLERANCE`). Engines whose
  runner is a `PolicyProbeRunner` are checked in one teacher-forced pass over prompt + golden
  ids (each golden id the argmax, exact ties accepted) instead of `max_new_tokens` greedy steps.
- reward: the scores of fixed (prompt, response) pairs.
- reference: the log-probs of fixed (prompt, completion) sequences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Awaitable, Callable

PROBE_PROMPTS = ("the cat sat on the", "a good dog", "one two three four", "please pass the red")
PROBE_PAIRS = (
    ("the cat sat on the", " mat"),
    ("is this good?", " yes, it is great"),
    ("is this good?", " no, it is bad"),
    ("please pass the", " red apple, thanks"),
)
PROBE_NEW_TOKENS = 8
# Largest |Δ log-prob| accepted per dtype; fp32 must also reproduce greedy ids exactly.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2, "auto": 5e-2}


class ProbeMismatch(Exception):
    """The loaded weights do not answer the probes as a fresh load of the version did."""


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def compute_probes(kind: str, model_dir: str | Path, *,
                   adapter_dir: str | Path | None = None) -> dict[str, Any]:
    """Load `model_dir` fresh (fp32, CPU, the safe loading path) and record its probes; with
    `adapter_dir`, those of `model_dir` + that LoRA adapter (`rlhf.models.adapters`)."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.models.reward_head import sequence_rewards

    tok = load_tokenizer(model_dir)
    with torch.inference_mode():
        if kind == "reward":
            model = _with_adapter(load_reward_model(model_dir), adapter_dir)
            items = [(_encode(tok, p), _encode(tok, r)) for p, r in PROBE_PAIRS]
            ids = [torch.tensor([p + r]) for p, r in items]
            scores = [float(sequence_rewards(model, x, torch.ones_like(x))[0]) for x in ids]
            return {"kind": kind, "items": [[p, r] for p, r in items], "scores": scores}
        model = _with_adapter(load_causal_lm(model_dir), adapter_dir)
        eos = {i for i in (model.generation_config.eos_token_id, tok.eos_token_id) if isinstance(i, int)}
        if kind == "reference":
            items = [(_encode(tok, p), _encode(tok, r)) for p, r in PROBE_PAIRS]
            return {"kind": kind, "items": [[p, r] for p, r in items],
                    "logprobs": [_teacher_forced(model, p, r) for p, r in items]}
        prompts = [_encode(tok, p) for p in PROBE_PROMPTS]
        greedy = [_naive_greedy(model, p, PROBE_NEW_TOKENS, eos) for p in prompts]
        return {"kind": "policy", "prompts": prompts, "greedy": greedy, "max_new_tokens": PROBE_NEW_TOKENS,
                "logprobs": [_teacher_forced(model, p, g) for p, g in zip(prompts, greedy)]}


def _with_adapter(model, adapter_dir):
    if adapter_dir is None:
        return model
    from rlhf.models.adapters import load_adapter_model

    return load_adapter_model(model, adapter_dir)


def _naive_greedy(model, prompt: list[int], max_new: int, eos: set[int]) -> list[int]:
    import torch

    ids = list(prompt)
    for _ in range(max_new):
        t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(t)
        if t in eos:
            break
    return ids[len(prompt):]


def _teacher_forced(model, prompt: list[int], completion: list[int]) -> list[float]:
    import torch

    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(prompt) - 1:].tolist()


# What a candidate (the newly loaded weights, not yet serving) is asked by `check_probes`:
#   policy:    greedy(prompts, max_new_tokens) -> [(token_ids, logprobs)]
#   reward:    score(items) -> [float]
#   reference: logprobs(items) -> [[float]]
ProbeRunner = Callable[..., Awaitable[Any]]
# An exact tie at an argmax: the golden token's log-prob within this of the best one counts as the
# argmax (greedy decoding may pick either of two equal logits); other dtypes: 2 × TOLERANCE.
TIE = {"float32": 1e-5}


def forced_top(model, device, prompts, completions) -> list[list[tuple[float, float]]]:
    """(log-prob, best log-prob) of each completion token after prompt + the completion before
    it (fp32 log-softmax): one teacher-forced forward per sequence — what `PolicyProbeRunner`'s
    `forced` returns on a transformers model (the policy's hf engine, the reference service)."""
    import torch

    out: list[list[tuple[float, float]]] = []
    with torch.inference_mode():
        for prompt, completion in zip(prompts, completions):
            if not prompt or not completion:
                out.append([])
                continue
            ids = torch.tensor([list(prompt) + list(completion)], device=device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            lps = torch.log_softmax(logits, dim=-1)
            got = lps.gather(-1, ids[0, len(prompt) :, None])[:, 0]
            out.append(list(zip(got.tolist(), lps.max(dim=-1).values.tolist())))
    return out


class PolicyProbeRunner:
    """A policy probe runner that can also verify in ONE teacher-forced pass.

    `greedy(prompts, max_new_tokens)` as above; `forced(prompts, completions)` -> for each
    sequence, for each completion token, (its log-prob, the position's best log-prob) given the
    prompt and the completion before it: one forward over prompt + golden tokens. When the
    golden token is the argmax at every position (exact ties accepted) greedy decoding on these
    weights yields exactly the golden ids (it stops where the fresh load stopped: at an eos id,
    which the tokenizer/config checksums pin, or at max_new_tokens) — the same proof as running
    the greedy steps, in one engine step instead of `max_new_tokens`."""

    def __init__(self, greedy: ProbeRunner, forced: ProbeRunner | None = None):
        self.greedy, self.forced = greedy, forced

    async def __call__(self, prompts, max_new_tokens: int):
        return await self.greedy(prompts, max_new_tokens)


async def check_probes(probes: dict[str, Any], run: ProbeRunner, dtype: str = "float32") -> None:
    """Replay `probes` through `run` (bound to the candidate weights); raise ProbeMismatch."""
    if not probes:
        return
    tol = TOLERANCE.get(dtype, 5e-2)
    exact = dtype == "float32"
    kind = probes.get("kind")
    if kind == "policy" and getattr(run, "forced", None) is not None:
        tie = TIE.get(dtype, 2 * tol)
        got = await run.forced(probes["prompts"], probes["greedy"])
        for k, (rows, want_ids, want_lps) in enumerate(zip(got, probes["greedy"], probes["logprobs"])):
            if len(rows) != len(want_ids):
                raise ProbeMismatch(
                    f"probe {k}: {len(rows)} teacher-forced positions for {len(want_ids)} ids")
            for i, (lp, best) in enumerate(rows if exact else rows[:1]):  # as the greedy check:
                if not (math.isfinite(lp) and lp >= best - tie):  # low precision: the first id
                    raise ProbeMismatch(f"probe {k}: greedy token {i} ({want_ids[i]}) is not the argmax on "
                                        f"these weights (log-prob {lp} vs best {best}): greedy ids differ")
            _close(f"probe {k} log-probs", [lp for lp, _ in rows], want_lps, tol)
    elif kind == "policy":
        got = await run(probes["prompts"], probes["max_new_tokens"])
        for k, ((ids, lps), want_ids, want_lps) in enumerate(zip(got, probes["greedy"], probes["logprobs"])):
            if exact and list(ids) != list(want_ids):
                raise ProbeMismatch(f"probe {k}: greedy ids {list(ids)} differ from the version's {want_ids}")
            same = _common_prefix(ids, want_ids)
            if not exact and same == 0 and want_ids:
                raise ProbeMismatch(f"probe {k}: first greedy token {ids[:1]} differs from {want_ids[:1]}")
            _close(f"probe {k} log-probs", lps[:same], want_lps[:same], tol)
    elif kind == "reward":
        _close("reward probe scores", await run(probes["items"]), probes["scores"], tol * 10)
    elif kind == "reference":
        got = await run(probes["items"])
        for k, (a, b) in enumerate(zip(got, probes["logprobs"])):
            _close(f"reference probe {k}", a, b, tol)
    else:
        raise ProbeMismatch(f"unknown probe kind {kind!r}")


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _close(what: str, got, want, tol: float) -> None:
    if len(got) != len(want):
        raise ProbeMismatch(f"{what}: {len(got)} values, the version recorded {len(want)}")
    for i, (a, b) in enumerate(zip(got, want)):
        if not (math.isfinite(a) and abs(a - b) <= tol):
            raise ProbeMismatch(f"{what}[{i}]: {a} vs recorded {b} (tolerance {tol})")
