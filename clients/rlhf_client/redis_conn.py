"""Every Redis client the platform makes, with its connection behaviour stated, not inherited.

redis-py changed its defaults under us: 8.x speaks RESP3 and gives every socket a 5-second read
timeout with ten retries, where 5.x–7.x spoke RESP2 and waited without limit. A client made with
the library's defaults therefore behaves differently by release: a blocking read
(`XREADGROUP BLOCK`, a pub/sub listener) longer than 5 s raises `TimeoutError` on 8.x, and a
starved process can see a plain command time out. So the platform never calls
`redis.Redis.from_url` itself; it calls `connect` (or `connect_async`), which pins:

- `protocol=2` (RESP2): the reply shapes every caller was written against, on every release;
- `socket_connect_timeout` 5 s: a Redis that is down is noticed at once;
- `socket_timeout` 30 s for commands; `None` (wait) for clients that block on purpose
  (pub/sub listeners): pass `blocking=True`;
- keepalive and a health check, so a connection cut while idle is replaced before use;
- a short retry (3 tries, 50 ms … 1 s backoff) on connection errors and time-outs.

Blocking stream reads must also keep each `BLOCK` below the read timeout: see `MAX_BLOCK_MS`.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

#: Read timeout of a command client (seconds).
COMMAND_TIMEOUT_S = 30.0
#: Connect timeout (seconds).
CONNECT_TIMEOUT_S = 5.0
#: The longest `BLOCK` one blocking command may ask for on a command client (ms): well below
#: the read timeout, so a long wait is a loop of short ones.
MAX_BLOCK_MS = 5_000


def _options(blocking: bool, socket_timeout: float | None) -> dict[str, Any]:
    timeout = None if blocking else (COMMAND_TIMEOUT_S if socket_timeout is None else socket_timeout)
    return dict(
        protocol=2,
        socket_timeout=timeout,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3,
                    supported_errors=(redis.ConnectionError, redis.TimeoutError)),
    )


def check_url(url: str) -> str:
    """`url` when it is a Redis URL; `ValueError` saying what one looks like otherwise."""
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"not a Redis URL: {url!r} (expected redis://HOST:PORT/DB, "
                         "rediss://… or unix://PATH)")
    return url


def connect(url: str, *, decode_responses: bool = False, blocking: bool = False,
            socket_timeout: float | None = None) -> redis.Redis:
    """A sync client for `url` (see the module docstring for what it pins)."""
    return redis.Redis.from_url(check_url(url), decode_responses=decode_responses,
                                **_options(blocking, socket_timeout))


def connect_async(url: str, *, decode_responses: bool = False, blocking: bool = False,
                  socket_timeout: float | None = None):
    """An asyncio client for `url`, pinned like `connect`."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry

    opts = _options(blocking, socket_timeout)
    opts["retry"] = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3,
                               supported_errors=(redis.ConnectionError, redis.TimeoutError))
    return aredis.Redis.from_url(check_url(url), decode_responses=decode_responses, **opts)
