"""Reading Redis Streams through a consumer group, without loss and without applying twice.

`StreamConsumer` is what a training job reads its data through. The rules:

- **Read**: first the entries this consumer already holds (its own pending list: a redelivered
  job gets back exactly what its killed first attempt had read), then entries another consumer
  left pending longer than `claim_idle_ms` (`XAUTOCLAIM`: a dead job's), then new ones (`>`).
- **Poison and garbage**: an entry that does not parse, breaks the payload rules, or fails the
  caller's `validate`, and one delivered more than `max_deliveries` times, is moved to the
  dead-letter stream `<stream>:dead` with the reason and acked, in one transaction. None of
  these ever raise out of `read`: a malformed entry never crashes a worker.
- **Apply once**: the payload ids a group has applied live in the set `<stream>:applied:<group>`.
  An entry whose id is in it (a redelivery, or a producer's retry) is acked and skipped.
- **Commit**: `commit(entries)` adds their ids to that set and acks them in one transaction.
  Callers commit only after the update that used the entries is durable (the model version is
  in the store), so a crash before that leaves them pending for the retry.
- **Heartbeat**: `touch(entries)` resets their idle time (`XCLAIM ... JUSTID`), so a live job
  that trains longer than `claim_idle_ms` does not lose its entries to another consumer;
  `owns(entries)` checks, just before a commit, that none was taken over.

Depth metrics: a stream's depth is what its groups have not finished (not yet delivered plus
pending), the dead-letter depth is the dead-letter stream's length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from rlhf_client.redis_conn import MAX_BLOCK_MS
from rlhf_client.queues import DEAD_LETTER_SUFFIX, Payload, PayloadError, dead_letter_stream, decode_entry

from rlhf.serving.metrics import DEAD_LETTER_DEPTH, QUEUE_DEPTH

log = logging.getLogger(__name__)

_READ_CHUNK = 256


def applied_key(stream: str, group: str) -> str:
    return f"{stream}:applied:{group}"


@dataclass(frozen=True)
class Entry:
    """One parsed, valid stream entry handed to a job."""

    entry_id: str  # the stream entry id ("1718000000000-0")
    payload: Payload
    deliveries: int

    @property
    def id(self) -> str:
        """The payload's unique id."""
        return self.payload.id


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamConsumer:
    """One consumer (e.g. one job) of one stream in one consumer group.

    `client` must return bytes (`decode_responses=False`): payloads are binary protobuf.
    `validate(payload)` may raise `ValueError` to dead-letter a payload this job cannot use.
    """

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        group: str,
        consumer: str,
        *,
        max_deliveries: int,
        claim_idle_ms: int,
        validate: Callable[[Payload], object] | None = None,
    ):
        self.r = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.validate = validate
        self.dead_stream = dead_letter_stream(stream)
        self.applied_key = applied_key(stream, group)
        self._history_cursor: str | None = "0"  # own pending list; None once read through
        self._claim_cursor: str | None = "0-0"  # XAUTOCLAIM scan; None once scanned through
        self.dead_lettered = 0
        self.duplicates = 0
        self.ensure_group()

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # ------------------------------------------------------------------ reading
    def read(self, count: int, *, block_ms: int | None = None) -> list[Entry]:
        """Up to `count` valid, not yet applied entries; [] when none is available.

        Sources in order: own pending list, entries idle past `claim_idle_ms` with another
        consumer, new entries (waiting up to `block_ms` for one when given and nothing else
        came). Rejected entries are dead-lettered or acked on the way and never returned.
        """
        out: list[Entry] = []
        while len(out) < count:
            want = min(_READ_CHUNK, count - len(out))
            raw, fresh = self._next_raw(want, block_ms if not out else None)
            if not raw:
                break
            out.extend(self._accept(raw, fresh))
        return out

    def _next_raw(self, want: int, block_ms: int | None):
        """(entries, fresh) from the first source that has any; fresh = never delivered before."""
        if self._history_cursor is not None:
            res = self.r.xreadgroup(self.group, self.consumer, {self.stream: self._history_cursor},
                                    count=want)
            entries = res[0][1] if res else []
            if entries:
                self._history_cursor = _s(entries[-1][0])
                return entries, False
            self._history_cursor = None
        while self._claim_cursor is not None:
            res = self.r.xautoclaim(self.stream, self.group, self.consumer, self.claim_idle_ms,
                                    start_id=self._claim_cursor, count=want)
            cursor, entries = _s(res[0]), res[1]
            self._claim_cursor = None if cursor == "0-0" else cursor
            if entries:
                log.info("%s/%s: reclaimed %d entries idle > %d ms", self.stream, self.group,
                         len(entries), self.claim_idle_ms)
                return entries, False
        res = self._read_new(want, block_ms)
        return (res[0][1] if res else []), True

    def rescan(self) -> None:
        """Make the next `read` run another `XAUTOCLAIM` pass (when the last one is through).

        A job reads its backlog once; a long-running consumer (a rollout worker) calls this
        periodically, to pick up entries a dead consumer left, or entries it stopped touching
        itself (a failed attempt, retried once idle past `claim_idle_ms`: the claim counts a
        delivery, so a prompt that keeps failing is dead-lettered after `max_deliveries`).
        """
        if self._claim_cursor is None:
            self._claim_cursor = "0-0"

    def _read_new(self, want: int, block_ms: int | None):
        """`XREADGROUP ... >`, waiting up to `block_ms` as a loop of waits of at most
        `MAX_BLOCK_MS` (each one well inside the client's read timeout)."""
        if not block_ms:
            return self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=want)
        deadline = time.monotonic() + block_ms / 1000.0
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            res = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=want,
                                    block=max(1, min(left_ms, MAX_BLOCK_MS)))
            if res or left_ms <= MAX_BLOCK_MS:
                return res

    def _deliveries(self, entry_ids: list[str]) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for eid in entry_ids:
            pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        out = {}
        for eid, rows in zip(entry_ids, pipe.execute()):
            out[eid] = int(rows[0]["times_delivered"]) if rows else 0
        return out

    def _accept(self, raw: list, fresh: bool) -> list[Entry]:
        ids = [_s(eid) for eid, _ in raw]
        deliveries = dict.fromkeys(ids, 1) if fresh else self._deliveries(ids)
        parsed: list[tuple[str, Payload, int]] = []
        for (eid_raw, fields), eid in zip(raw, ids):
            n = deliveries[eid]
            if not fields:  # the entry was deleted (XDEL/trim) while pending: nothing to apply
                self.r.xack(self.stream, self.group, eid)
                continue
            if n > self.max_deliveries:
                self._dead_letter(eid, fields, n, f"delivered {n} times (limit {self.max_deliveries})")
                continue
            try:
                payload = decode_entry(fields)
                if self.validate is not None:
                    self.validate(payload)
            except (PayloadError, ValueError) as exc:
                self._dead_letter(eid, fields, n, f"invalid payload: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - a payload must never crash the worker
                self._dead_letter(eid, fields, n, f"payload rejected ({type(exc).__name__}): {exc}")
                continue
            parsed.append((eid, payload, n))
        if not parsed:
            return []
        applied = self.r.smismember(self.applied_key, [p.id for _, p, _ in parsed])
        out, seen = [], set()
        for (eid, payload, n), done in zip(parsed, applied):
            if done or payload.id in seen:
                self.duplicates += 1
                self.r.xack(self.stream, self.group, eid)
                continue
            seen.add(payload.id)
            out.append(Entry(eid, payload, n))
        return out

    def _dead_letter(self, entry_id: str, fields: dict, deliveries: int, reason: str) -> None:
        record = {k: v for k, v in fields.items() if _s(k) in ("type", "id", "data")}
        record.update({
            b"reason": reason.encode()[:2000],
            b"stream": self.stream.encode(),
            b"entry": entry_id.encode(),
            b"group": self.group.encode(),
            b"consumer": self.consumer.encode(),
            b"deliveries": str(deliveries).encode(),
            b"time": f"{time.time():.3f}".encode(),
        })
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, record)
        pipe.xack(self.stream, self.group, entry_id)
        pipe.execute()
        self.dead_lettered += 1
        log.warning("%s/%s: entry %s dead-lettered: %s", self.stream, self.group, entry_id, reason)

    # ------------------------------------------------------------------ while training
    def touch(self, entries: Iterable[Entry], chunk: int = 1000) -> None:
        """Reset the idle time of entries this consumer holds (heartbeat; no delivery counted)."""
        ids = [e.entry_id for e in entries]
        for i in range(0, len(ids), chunk):
            self.r.xclaim(self.stream, self.group, self.consumer, 0, ids[i:i + chunk], justid=True)

    def owns(self, entries: Iterable[Entry]) -> bool:
        """True when every entry is still pending with this consumer (none taken over)."""
        held: set[str] = set()
        start = "-"
        while True:
            rows = self.r.xpending_range(self.stream, self.group, min=start, max="+", count=10_000,
                                         consumername=self.consumer)
            held.update(_s(r["message_id"]) for r in rows)
            if len(rows) < 10_000:
                break
            start = "(" + _s(rows[-1]["message_id"])
        return all(e.entry_id in held for e in entries)

    # ------------------------------------------------------------------ committing
    def commit(self, entries: Iterable[Entry] = (), *, payload_ids: Iterable[str] = (),
               entry_ids: Iterable[str] = ()) -> None:
        """Record the payload ids as applied and ack their entries, in one transaction.

        Pass `entries`, or (when resuming from a manifest) `payload_ids` and `entry_ids`.
        """
        entries = list(entries)
        pids = [e.id for e in entries] + list(payload_ids)
        eids = [e.entry_id for e in entries] + list(entry_ids)
        pipe = self.r.pipeline(transaction=True)
        for i in range(0, len(pids), 5000):
            pipe.sadd(self.applied_key, *pids[i:i + 5000])
        for i in range(0, len(eids), 5000):
            pipe.xack(self.stream, self.group, *eids[i:i + 5000])
        pipe.execute()

    def close(self) -> None:
        """Remove this consumer from the group when it holds nothing (consumers otherwise pile up)."""
        try:
            info = self.r.xinfo_consumers(self.stream, self.group)
            mine = [c for c in info if _s(c.get("name")) == self.consumer]
            if mine and int(mine[0].get("pending", 0)) == 0:
                self.r.xgroup_delconsumer(self.stream, self.group, self.consumer)
        except redis.RedisError:
            log.debug("could not remove consumer %s", self.consumer, exc_info=True)

    # ------------------------------------------------------------------ metrics
    def depth(self) -> int:
        return stream_depth(self.r, self.stream)

    def dead_letter_depth(self) -> int:
        return int(self.r.xlen(self.dead_stream))

    def update_metrics(self) -> None:
        QUEUE_DEPTH.labels(self.stream).set(self.depth())
        DEAD_LETTER_DEPTH.labels(self.stream).set(self.dead_letter_depth())


def stream_depth(client: redis.Redis, stream: str) -> int:
    """Entries of `stream` its slowest consumer group has not finished (undelivered + pending).

    With no group yet, every entry counts. Uses the group's `lag` (Redis ≥ 7), falling back to
    the stream length when Redis cannot tell it.
    """
    length = int(client.xlen(stream))
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such key
        return 0
    if not groups:
        return length
    return max(
        int(g.get("pending", 0)) + (int(g["lag"]) if g.get("lag") is not None else length)
        for g in groups
    )


def refresh_queue_metrics(client: redis.Redis, pattern: str = "*") -> dict[str, tuple[int, int]]:
    """Set the depth gauges of every stream matching `pattern` (the worker runs this periodically).

    Returns {stream: (depth, dead-letter depth)}.
    """
    out = {}
    for key in client.scan_iter(match=pattern, _type="stream", count=500):
        name = _s(key)
        if name.endswith(DEAD_LETTER_SUFFIX):
            continue
        depth = stream_depth(client, name)
        dead = int(client.xlen(dead_letter_stream(name)))
        QUEUE_DEPTH.labels(name).set(depth)
        DEAD_LETTER_DEPTH.labels(name).set(dead)
        out[name] = (depth, dead)
    return out
