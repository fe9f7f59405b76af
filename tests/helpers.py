"""Helpers for tests: settings for loopback servers, running apps, teacher-forced references."""

from __future__ import annotations

import contextlib

ADMIN_TOKEN = "test-admin-token"
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
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"
