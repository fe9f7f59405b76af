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

URL forms (every `redis_url` setting, the client and the Celery broker take the same):

- `redis://[[USER]:PASSWORD@]HOST:PORT/DB`, `unix://PATH?db=N`;
- `rediss://[[USER]:PASSWORD@]HOST:PORT/DB?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required`: TLS.
  Query parameters (all optional): `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile` (client
  certificate), `ssl_cert_reqs` (`required`, the default; `optional`; `none`),
  `ssl_check_hostname` (`true`/`false`);
- `redis+sentinel://[[USER]:PASSWORD@]H1:26379,H2:26379/MASTER_NAME[/DB]` (`rediss+sentinel://`:
  TLS to the Sentinels and the primary, same `ssl_*` parameters): Sentinel discovery; the
  client talks to whichever server the Sentinels name primary of MASTER_NAME now, and follows
  a failover. The password is the primary's; `sentinel_password` (query) is the Sentinels' own,
  when they have one.

Any other query parameter is refused (`ValueError` naming it): the options above are pinned.
Passwords are secrets: print a URL only through `redact_url`.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

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


SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
#: TLS query parameters a `rediss://` URL may carry.
SSL_PARAMS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
_CERT_REQS = ("none", "optional", "required")
_EXPECTED = ("expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB?ssl_ca_certs=…, unix://PATH or "
             "redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER_NAME[/DB]")


def redact_url(url: str) -> str:
    """`url` without its password (redis://:***@host:6379/0): for messages and logs."""
    scheme, sep, rest = url.partition("://") if "://" in url else ("", "", url)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, hosts = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        netloc = f"{user}:***@{hosts}" if user else f"***@{hosts}"
    path = re.sub(r"(password=)[^&]*", r"\1***", path)  # sentinel_password, or a refused one
    return f"{scheme}{sep}{netloc}{slash}{path}"


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed `redis+sentinel://` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None
    ssl: bool
    ssl_options: dict = field(default_factory=dict)


def _bad(url: str, why: str) -> ValueError:
    return ValueError(f"not a Redis URL: {redact_url(url)!r}: {why} ({_EXPECTED})")


def _ssl_options(url: str, query: dict[str, list[str]], tls: bool, allowed: tuple[str, ...]) -> dict:
    out: dict[str, Any] = {}
    for key, values in query.items():
        if key not in allowed:
            raise _bad(url, f"unknown query parameter {key!r} (allowed: {', '.join(allowed)})")
        value = values[-1]
        if key.startswith("ssl_") and not tls:
            raise _bad(url, f"{key} needs TLS: write rediss://")
        if key == "ssl_cert_reqs" and value not in _CERT_REQS:
            raise _bad(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {value!r}")
        if key == "ssl_check_hostname":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise _bad(url, f"ssl_check_hostname must be true or false, not {value!r}")
            value = value.lower() in ("true", "1", "yes")
        if key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and not os.path.isfile(value):
            raise _bad(url, f"{key}: no file {value!r}")
        out[key] = value
    return out


def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query, keep_blank_values=True)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a `redis+sentinel://` (or `rediss+sentinel://`) URL; `ValueError` naming
    what is wrong."""
    scheme, _, rest = url.partition("://")
    rest = rest.split("?", 1)[0]
    netloc, _, path = rest.partition("/")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) or None)
    sentinels = []
    for hp in filter(None, netloc.split(",")):
        host, _, port = hp.rpartition(":")
        if not host or not port.isdigit():
            raise _bad(url, f"sentinel {hp!r} is not HOST:PORT")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise _bad(url, "no sentinel HOST:PORT")
    parts = [p for p in path.split("/") if p]
    if not parts or len(parts) > 2:
        raise _bad(url, "the path must be /MASTER_NAME or /MASTER_NAME/DB")
    if len(parts) == 2 and not parts[1].isdigit():
        raise _bad(url, f"database {parts[1]!r} is not a number")
    tls = scheme == "rediss+sentinel"
    opts = _ssl_options(url, _query(url), tls, SSL_PARAMS + ("sentinel_password",))
    sentinel_password = opts.pop("sentinel_password", None)
    return SentinelUrl(tuple(sentinels), unquote(parts[0]), int(parts[1]) if len(parts) == 2 else 0,
                       username, password, sentinel_password, tls, opts)


def check_url(url: str) -> str:
    """`url` when it is a Redis URL of a form above; `ValueError` saying what is wrong and what
    one looks like otherwise."""
    if not isinstance(url, str) or "://" not in url or url.split("://", 1)[0] not in SCHEMES:
        shown = redact_url(url) if isinstance(url, str) else url
        raise ValueError(f"not a Redis URL: {shown!r} ({_EXPECTED})")
    scheme = url.split("://", 1)[0]
    if scheme.endswith("+sentinel"):
        parse_sentinel_url(url)
    else:
        allowed = SSL_PARAMS + (("db",) if scheme == "unix" else ())
        _ssl_options(url, _query(url), scheme == "rediss", allowed)
    return url


def celery_broker(url: str) -> tuple[str, dict, dict | None]:
    """(broker_url, broker transport options, broker_use_ssl) for Celery/kombu from a URL of a
    form above: `rediss://` maps its `ssl_*` query to `broker_use_ssl` (kombu would otherwise
    connect without verifying the certificate); `redis+sentinel://` becomes kombu's
    `sentinel://:PW@H1:P1/DB;sentinel://:PW@H2:P2/DB` with `master_name` (and the Sentinels'
    password in `sentinel_kwargs`) in the transport options."""
    check_url(url)
    scheme = url.split("://", 1)[0]
    if scheme.endswith("+sentinel"):
        u = parse_sentinel_url(url)
        auth = ""
        if u.password:
            auth = f"{quote(u.username or '', safe='')}:{quote(u.password, safe='')}@"
        broker = ";".join(f"sentinel://{auth}{h}:{p}/{u.db}" for h, p in u.sentinels)
        options: dict[str, Any] = {"master_name": u.master_name}
        sentinel_kwargs: dict[str, Any] = {}
        if u.sentinel_password:
            sentinel_kwargs["password"] = u.sentinel_password
        ssl_opts = None
        if u.ssl:
            ssl_opts = _kombu_ssl(u.ssl_options)
            sentinel_kwargs.update(ssl=True, **u.ssl_options)
        if sentinel_kwargs:
            options["sentinel_kwargs"] = sentinel_kwargs
        return broker, options, ssl_opts
    if scheme == "rediss":
        opts = _ssl_options(url, _query(url), True, SSL_PARAMS)
        return url.split("?", 1)[0], {}, _kombu_ssl(opts)
    return url, {}, None


def _kombu_ssl(opts: dict) -> dict:
    out = dict(opts)
    out["ssl_cert_reqs"] = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
                            "required": ssl.CERT_REQUIRED}[opts.get("ssl_cert_reqs", "required")]
    return out


def _sentinel_master(sentinel_cls, url: str, decode_responses: bool, opts: dict):
    """A client of the primary the Sentinels of `url` name (asked again on every new
    connection, so it follows a failover), with `opts` pinned like any other client.
    `sentinel_cls`: redis-py's sync or asyncio `Sentinel`."""
    u = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = dict(
        socket_timeout=CONNECT_TIMEOUT_S, socket_connect_timeout=CONNECT_TIMEOUT_S,
        protocol=2, password=u.sentinel_password)
    master = dict(opts, db=u.db, username=u.username, password=u.password)
    if u.ssl:
        sentinel_kwargs.update(ssl=True, **u.ssl_options)
        master.update(ssl=True, **u.ssl_options)
    return sentinel_cls(list(u.sentinels), sentinel_kwargs=sentinel_kwargs).master_for(
        u.master_name, decode_responses=decode_responses, **master)


def connect(url: str, *, decode_responses: bool = False, blocking: bool = False,
            socket_timeout: float | None = None) -> redis.Redis:
    """A sync client for `url` (see the module docstring for what it pins and the URL forms)."""
    check_url(url)
    opts = _options(blocking, socket_timeout)
    if url.split("://", 1)[0].endswith("+sentinel"):
        from redis.sentinel import Sentinel

        return _sentinel_master(Sentinel, url, decode_responses, opts)
    return redis.Redis.from_url(url, decode_responses=decode_responses, **opts)


def connect_async(url: str, *, decode_responses: bool = False, blocking: bool = False,
                  socket_timeout: float | None = None):
    """An asyncio client for `url`, pinned like `connect`."""
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry

    check_url(url)
    opts = _options(blocking, socket_timeout)
    opts["retry"] = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.05), 3,
                               supported_errors=(redis.ConnectionError, redis.TimeoutError))
    if url.split("://", 1)[0].endswith("+sentinel"):
        from redis.asyncio.sentinel import Sentinel

        return _sentinel_master(Sentinel, url, decode_responses, opts)
    return aredis.Redis.from_url(url, decode_responses=decode_responses, **opts)


class ReplicationLag(redis.ConnectionError):
    """Fewer replicas than asked for confirmed a write in time (`wait_replicas`). A
    `ConnectionError`, so callers that wait Redis out and redo idempotent work (a commit, a
    push with its payload id) treat it like an outage."""


def wait_replicas(client: redis.Redis, replicas: int, timeout_ms: int) -> int:
    """`WAIT replicas timeout_ms` after a write that must survive a failover: the number of
    replicas that have it; `ReplicationLag` when fewer than `replicas` confirmed in time (the
    write is on the primary but may be lost if it fails now). `replicas` 0: nothing to do."""
    if replicas <= 0:
        return 0
    got = int(client.execute_command("WAIT", replicas, timeout_ms))
    if got < replicas:
        raise ReplicationLag(f"only {got} of {replicas} Redis replicas confirmed the write within "
                             f"{timeout_ms} ms (redis_min_replicas_ack)")
    return got
