"""Golden probes: what a fresh load of a version answers to fixed inputs, kept in its manifest.

A service that swaps to a version replays the probes on the weights it loaded and switches only
when the answers match: in-place weight reloads have been seen to fail silently (outputs change,
no error), so a swap is trusted only after this check.

- policy: greedy token ids for fixed prompts, with the teacher-forced log-probs of those tokens;
  fp32 engines must reproduce the ids exactly, lower-precision engines (bf16 on GPU) are checked
  on the log-probs within a tolerance suited to their dtype (see `TOLERANCE`).
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


def compute_probes(kind: str, model_dir: str | Path) -> dict[str, Any]:
    """Load `model_dir` fresh (fp32, CPU, the safe loading path) and record its probes."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.models.reward_head import sequence_rewards

    tok = load_tokenizer(model_dir)
    with torch.inference_mode():
        if kind == "reward":
            model = load_reward_model(model_dir)
            items = [(_encode(tok, p), _encode(tok, r)) for p, r in PROBE_PAIRS]
            ids = [torch.tensor([p + r]) for p, r in items]
            scores = [float(sequence_rewards(model, x, torch.ones_like(x))[0]) for x in ids]
            return {"kind": kind, "items": [[p, r] for p, r in items], "scores": scores}
        model = load_causal_lm(model_dir)
        eos = {i for i in (model.generation_config.eos_token_id, tok.eos_token_id) if isinstance(i, int)}
        if kind == "reference":
            items = [(_encode(tok, p), _encode(tok, r)) for p, r in PROBE_PAIRS]
            return {"kind": kind, "items": [[p, r] for p, r in items],
                    "logprobs": [_teacher_forced(model, p, r) for p, r in items]}
        prompts = [_encode(tok, p) for p in PROBE_PROMPTS]
        greedy = [_naive_greedy(model, p, PROBE_NEW_TOKENS, eos) for p in prompts]
        return {"kind": "policy", "prompts": prompts, "greedy": greedy, "max_new_tokens": PROBE_NEW_TOKENS,
                "logprobs": [_teacher_forced(model, p, g) for p, g in zip(prompts, greedy)]}


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


async def check_probes(probes: dict[str, Any], run: ProbeRunner, dtype: str = "float32") -> None:
    """Replay `probes` through `run` (bound to the candidate weights); raise ProbeMismatch."""
    if not probes:
        return
    tol = TOLERANCE.get(dtype, 5e-2)
    exact = dtype == "float32"
    kind = probes.get("kind")
    if kind == "policy":
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
