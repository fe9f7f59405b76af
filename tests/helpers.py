"""Helpers for tests: settings for loopback servers, running apps, teacher-forced references."""

from __future__ import annotations

import contextlib
import os

ADMIN_TOKEN = "test-admin-token"
# The Redis server the suite uses (each suite picks its own database on it). RLHF_TEST_REDIS points
# a second copy of the suite at another server, so two can run side by side (a load test).
TEST_REDIS = os.environ.get("RLHF_TEST_REDIS", "redis://127.0.0.1:6379").rstrip("/")
# A small vLLM CPU engine for tests: short context, 1 GiB of KV cache, no compilation.
VLLM_SETTINGS = dict(
    backend="vllm",
    vllm_max_model_len=512,
    vllm_kv_cache_space_gb=1.0,
    vllm_enforce_eager=True,
    vllm_max_num_seqs=64,
)


def make_settings(**overrides):
    """Settings for an in-process server on a free loopback port, metrics off unless asked."""
    from rlhf.config import Settings

    base = dict(host="127.0.0.1", port=0, metrics_port=None, admin_token=ADMIN_TOKEN)
    base.update(overrides)
    return Settings(**base)


@contextlib.asynccontextmanager
async def running(app):
    """Start a ServiceApp, yield it, always stop it."""
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace=0.5)


def teacher_forced_logprobs(model, prompt_ids, completion_ids) -> list[float]:
    """log π(completion[i] | prompt, completion[:i]) from one full forward pass, no cache."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt_ids) - 1 :].tolist()


def status_of(fn, *args, **kwargs):
    """Call fn and return the grpc.StatusCode of the RpcError it raises (None when it succeeds)."""
    from rlhf_client import RpcError

    try:
        fn(*args, **kwargs)
    except RpcError as err:
        return err.code, err.details
    return None, ""


class ThreadedApp:
    """Runs a ServiceApp on its own event loop in a background thread.

    Sync tests (and sync clients) block the thread they run on, so a server that shares their
    event loop could never answer; this one keeps serving whatever the test thread does.
    """

    def __init__(self, app):
        import asyncio
        import threading

        self.app = app
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-server")
        self._thread.start()

    def call(self, coro, timeout: float = 300):
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self):
        self.call(self.app.start())
        return self

    def __exit__(self, *exc):
        try:
            self.call(self.app.stop(grace=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def metrics_port(self) -> int | None:
        return self.app.metrics_port

    @property
    def http_port(self) -> int | None:
        return self.app.http_port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"


# ------------------------------------------------------------------------------------------------
# Sampling distributions (naive float64 references) and a chi-square goodness-of-fit test
# ------------------------------------------------------------------------------------------------

# (temperature, top_k, top_p) settings the frequency tests draw single tokens with. The tiny
# random models' next-token logits are nearly flat (std ≈ 0.23 over 1232 tokens), so the
# temperatures are a tenth of the usual ones: logits / 0.1 here are distributed like a trained
# model's logits / 1 (a few dozen likely tokens), where temperature, top-k and top-p all matter.
SAMPLING_SETTINGS = [
    (1.0, 0, 1.0),  # the raw model: every token kept
    (0.1, 0, 1.0),
    (0.05, 0, 1.0),
    (0.15, 10, 1.0),
    (0.1, 0, 0.8),
    (0.07, 20, 0.9),
]
P_VALUE_MIN = 1e-4


def sampling_distribution(logits, temperature: float, top_k: int, top_p: float):
    """The distribution a sampler must draw from, computed the naive way in float64.

    softmax(logits / T); keep the top_k most likely tokens (0 = all); of those (renormalised),
    keep the smallest set of most likely tokens whose mass reaches top_p, i.e. token r (by
    descending probability) is kept while the mass ranked above it is < top_p (vLLM's rule:
    drop the ascending-sorted tail whose cumulative mass is ≤ 1 − top_p; the transformers
    engine's: drop a token once the mass above it is ≥ top_p). Returns probabilities `(V,)`,
    zero outside the kept set.
    """
    import torch

    scaled = logits.double() / temperature
    order = scaled.argsort(descending=True)
    keep = torch.zeros_like(scaled, dtype=torch.bool)
    keep[order[: top_k if 0 < top_k < scaled.numel() else scaled.numel()]] = True
    probs = torch.softmax(scaled.masked_fill(~keep, float("-inf")), dim=-1)
    if top_p < 1.0:
        sorted_probs = probs[order]
        mass_above = sorted_probs.cumsum(0) - sorted_probs
        probs[order[mass_above >= top_p]] = 0.0
        probs = probs / probs.sum()
    return probs


def chi_square_p_value(counts, probs, min_expected: float = 5.0) -> tuple[float, float, int]:
    """(p-value, chi², degrees of freedom) of observed token `counts` `(V,)` against `probs`.

    Tokens are binned by descending expected count, each bin growing until it expects at least
    `min_expected` draws (the last, short one joins the bin before it). Tokens with probability
    0 are not binned: the caller checks that none was drawn. The survival function of the
    chi-square distribution is the regularised upper incomplete gamma Q(dof/2, chi²/2).
    """
    import torch

    counts = torch.as_tensor(counts, dtype=torch.float64)
    expected = probs.double() * counts.sum()
    observed_bins: list[float] = []
    expected_bins: list[float] = []
    obs = exp = 0.0
    for t in expected.argsort(descending=True).tolist():
        if expected[t] == 0:
            break
        obs += float(counts[t])
        exp += float(expected[t])
        if exp >= min_expected:
            observed_bins.append(obs)
            expected_bins.append(exp)
            obs = exp = 0.0
    if exp > 0:
        if observed_bins:
            observed_bins[-1] += obs
            expected_bins[-1] += exp
        else:
            observed_bins, expected_bins = [obs], [exp]
    o = torch.tensor(observed_bins, dtype=torch.float64)
    e = torch.tensor(expected_bins, dtype=torch.float64)
    chi2 = float(((o - e) ** 2 / e).sum())
    dof = len(observed_bins) - 1
    if dof == 0:  # one bin (a single kept token): nothing to test beyond the kept set
        return 1.0, chi2, 0
    p = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                      torch.tensor(chi2 / 2, dtype=torch.float64)))
    return p, chi2, dof


def next_token_logits(model, prompt_ids):
    """The model's logits `(V,)` for the token after `prompt_ids` (one forward pass, float64)."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([list(prompt_ids)])).logits[0, -1].double()


# ------------------------------------------------------------------------------------------------
# reset_token backtracking, checked the same way on every backend
# ------------------------------------------------------------------------------------------------


def _text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def backtracking_case(client, tok, prompt: str, seed: int, max_new_tokens: int = 32):
    """A seeded sample of `prompt` (temperature 1) and a reset token that makes a case of it.

    The reset token is a token of the sample (one that is a token of its own text) at index
    `last` (its last occurrence), with at least 4 tokens before and 6 after it, such that a stop
    string spanning it exists: the 2 characters before it, its text and the 2 characters after
    it occur in the whole text but neither in the text up to the reset token nor in the kept
    text. Returns (sample, reset token text, last, spanning stop string) or None.
    """
    from rlhf_client import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed, return_logprobs=True)
    base = client.generate([prompt], params).completions[0]
    ids = base.token_ids
    if len(ids) < max_new_tokens:  # ended early (eos): too short a case
        return None
    for k in range(4, len(ids) - 6):
        t = ids[k]
        if tok.encode(_text(tok, [t]), add_special_tokens=False) != [t] or t in ids[k + 1:]:
            continue
        pre, kept = _text(tok, ids[:k]), _text(tok, ids[k + 1:])
        stop = pre[-2:] + _text(tok, [t]) + kept[:2]
        if len(stop) < 4 or stop not in _text(tok, ids) or stop in _text(tok, ids[: k + 1]) or stop in kept:
            continue
        return base, _text(tok, [t]), k, stop
    return None


def _same(a, b, tol: float) -> bool:
    """Two completions equal but for float rounding of their log-probs."""
    def close(x, y):
        return len(x) == len(y) and all(abs(u - v) < tol for u, v in zip(x, y))

    return (
        (a.prompt_index, a.sample_index, a.text, a.token_ids, a.finish_reason, a.prompt_token_ids,
         a.trajectory_token_ids)
        == (b.prompt_index, b.sample_index, b.text, b.token_ids, b.finish_reason, b.prompt_token_ids,
            b.trajectory_token_ids)
        and close(a.logprobs, b.logprobs) and close(a.trajectory_logprobs, b.trajectory_logprobs)
    )


def check_backtracking(client, tok, model, prompts, seeds=range(1, 40), cases: int = 3, tol: float = 1e-4):
    """Backtracking on `client`'s backend, checked against teacher-forced forwards of `model`.

    For `cases` seeded samples with a reset token in their middle:
    - the trajectory is the sample as drawn without a reset token (ids and log-probs), and its
      log-probs equal a teacher-forced forward of prompt + trajectory;
    - the kept part is what follows the reset token, and its log-probs equal a teacher-forced
      forward of prompt + kept part (they differ from the sampled ones: the context changed);
    - the stream assembles to the unary completion exactly (kept part, trajectory, log-probs);
    - stop strings are matched on the kept text: one spanning the reset token (whole text only)
      stops nothing; one inside the kept text stops there.
    Returns the largest differences seen: {"trajectory": …, "kept": …, "kept_vs_sampled": …}.
    """
    from rlhf_client import FinishReason, SamplingParams, assemble_stream

    worst = {"trajectory": 0.0, "kept": 0.0, "kept_vs_sampled": float("inf")}
    found = 0
    for seed in seeds:
        prompt = prompts[seed % len(prompts)]
        case = backtracking_case(client, tok, prompt, seed)
        if case is None:
            continue
        base, reset, last, spanning = case
        ids = base.token_ids
        kept_ids = ids[last + 1:]
        params = SamplingParams(temperature=1.0, max_new_tokens=len(ids), seed=seed, return_logprobs=True,
                                reset_token=reset)
        c = client.generate([prompt], params).completions[0]
        assert c.reset and c.trajectory_token_ids == ids and c.token_ids == kept_ids
        assert c.text == _text(tok, kept_ids) and c.finish_reason == base.finish_reason
        assert len(c.trajectory_logprobs) == len(ids) and len(c.logprobs) == len(kept_ids)
        assert max(abs(a - b) for a, b in zip(c.trajectory_logprobs, base.logprobs)) < tol
        want_traj = teacher_forced_logprobs(model, c.prompt_token_ids, ids)
        want_kept = teacher_forced_logprobs(model, c.prompt_token_ids, kept_ids)
        traj_diff = max(abs(a - b) for a, b in zip(c.trajectory_logprobs, want_traj))
        kept_diff = max(abs(a - b) for a, b in zip(c.logprobs, want_kept))
        sampled_diff = max(abs(a - b) for a, b in zip(c.trajectory_logprobs[last + 1:], want_kept))
        assert traj_diff < tol and kept_diff < tol, (traj_diff, kept_diff)
        assert sampled_diff > 10 * tol  # the discarded text did change the kept tokens' context
        worst["trajectory"] = max(worst["trajectory"], traj_diff)
        worst["kept"] = max(worst["kept"], kept_diff)
        worst["kept_vs_sampled"] = min(worst["kept_vs_sampled"], sampled_diff)

        streamed = assemble_stream(client.generate_stream([prompt], params))
        assert streamed == [c]

        # a stop string across the reset token is in the whole text only: nothing stops
        spans = client.generate([prompt], SamplingParams(
            temperature=1.0, max_new_tokens=len(ids), seed=seed, return_logprobs=True, reset_token=reset,
            stop=(spanning,))).completions[0]
        assert _same(spans, c, tol), spanning
        # a stop string of the kept text stops at the token that completes it there
        kept_text = _text(tok, kept_ids)
        stop = next((kept_text[i:i + 3] for i in range(len(kept_text) - 3)
                     if kept_text[i:i + 3].strip() and kept_text[i:i + 3] not in _text(tok, ids[: last + 1])
                     and "\ufffd" not in kept_text[i:i + 3]), None)
        if stop is not None:
            m = next(m for m in range(1, len(kept_ids) + 1) if stop in _text(tok, kept_ids[:m]))
            stopped = client.generate([prompt], SamplingParams(
                temperature=1.0, max_new_tokens=len(ids), seed=seed, return_logprobs=True, reset_token=reset,
                stop=(stop,))).completions[0]
            assert stopped.finish_reason == FinishReason.STOP, stop
            assert stopped.token_ids == kept_ids[:m] and stopped.trajectory_token_ids == ids[: last + 1 + m]
            assert stopped.text == kept_text[: kept_text.find(stop)]
            assert max(abs(a - b) for a, b in zip(stopped.logprobs, want_kept[:m])) < tol
        found += 1
        if found == cases:
            return worst
    raise AssertionError(f"only {found} backtracking cases found")
