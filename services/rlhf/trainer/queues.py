"""Reading Redis Streams through a consumer group, without loss and without applying twice;
trimming what every group has finished.

`StreamConsumer` is what a training job reads its data through. The rules:

- **Read**: first the entries this consumer already holds (its own pending list: a redelivered
  job gets back exactly what its killed first attempt had read), then entries another consumer
  left pending longer than `claim_idle_ms` (`XAUTOCLAIM`: a dead job's), then new ones (`>`).
- **Poison and garbage**: an entry that does not parse, breaks the payload rules, or fails the
  caller's `validate`, and one delivered more than `max_deliveries` times, is moved to the
  dead-letter stream `<stream>:dead` with the reason and acked, in one transaction. None of
  these ever raise out of `read`: a malformed entry never crashes a worker.
- **Apply once**: the payload ids a group has applied live in the applied index
  `<stream>:applied:<group>`, a sorted set: member = payload id, score = when it was applied
  (unix ms). An entry whose payload id is in it (a redelivery, or a producer's retry) is acked
  and skipped.
- **Commit**: `commit(entries)` adds their ids to the index and acks them in one transaction.
  Callers commit only after the update that used the entries is durable (the model version is
  in the store), so a crash before that leaves them pending for the retry.
- **Heartbeat**: `touch(entries)` resets their idle time (`XCLAIM ... JUSTID`), so a live job
  that trains longer than `claim_idle_ms` does not lose its entries to another consumer;
  `owns(entries)` checks, just before a commit, that none was taken over.

**Retention** (`Retention`, `trim_stream`, `trim_streams`). Redis runs with `noeviction`, so
nothing may grow without bound: acked entries, dead letters and applied ids are trimmed.

- *The safe point of a stream* is the smallest, over its consumer groups, of each group's first
  unfinished entry: its oldest pending entry (`XPENDING` summary), else the entry after its
  last-delivered id (`XINFO GROUPS`). Every entry below it has been delivered to every group and
  acked by every group. Trimming (`XTRIM MINID`, exact) never passes it, so an entry that is
  pending or not yet delivered to some group (a lagging one) is never trimmed. Below it, an
  entry goes when it is older than `acked_s` (by its stream id: when it was pushed), or when
  the stream holds more than `max_entries` entries (the oldest acked ones go first; entries
  that are unread or pending are kept even past that bound). A stream without consumer groups
  is never trimmed: nothing has read it (prompts pushed before the first rollout worker, a
  job's metrics stream). Dead-letter streams are bounded by count (`dead_letter_max`):
  `XADD ... MAXLEN ~` when one is written, exact `XTRIM MAXLEN` in the sweep.
- *The applied index* of a group forgets a payload id once both (a) it was applied more than
  `applied_s` ago and (b) the group's own safe point has passed that horizon: every entry
  pushed up to `applied_s` after the id was applied has been delivered to the group and acked
  (when the group is caught up — nothing pending, everything delivered — its safe point is
  now). Why this keeps exactly-once: the index is keyed by *payload* id, not entry id, because
  a producer that retries a push whose reply it lost (or re-pushes a prompt file) writes a new
  entry with the same payload id. A payload can reach a group again only (i) as a pending entry
  (its own or a dead consumer's, via the history read or `XAUTOCLAIM`) or (ii) as a new entry
  not yet delivered. Both sit at or above the group's safe point, so (b) keeps the id while any
  such entry pushed within the horizon still waits, however long the group lags — a duplicate
  queued right behind the original and read a week later is still refused. The window, stated:
  **a duplicate pushed more than `applied_s` after the original was applied is not recognised**
  and is applied again. The default (7 days) is far beyond any producer retry; re-pushing a
  whole data set after that is a new data set. Scores are the committing process's clock
  (unix ms) and stream ids Redis's: clocks in step to within seconds (NTP) are assumed, which
  is nothing against a horizon of hours or days.
- *Upgrade*: the index used to be a plain SET. `migrate_applied_index` turns one into the
  sorted set in one Lua call (every old id scored "applied now", so each gets the full horizon
  from the upgrade); a consumer does it when it starts, the sweep for every group it visits.
  A process of the old release that meets a migrated key gets WRONGTYPE and fails its read or
  commit: it fails closed (nothing is applied twice), so roll the trainer and rollout workers
  together.
- *Where it runs*: after a consumer's commit when it was given a `Retention` (jobs: the stream
  they read; at most every `_COMMIT_TRIM_EVERY_S`), and in the trainer worker's main process
  every `stream_trim_interval_s` over every stream (`trim_streams`: this is what trims the
  prompts stream rollout workers ack into, the human-pairs stream the loop acks into, dead
  letters, and indexes of streams that are gone). Trimming never fails a commit: its Redis
  errors are logged. Several workers sweeping at once is safe (each pass only trims below a
  safe point it has just read; safe points only move forward).

Depth metrics: a stream's depth is what its groups have not finished (not yet delivered plus
pending), the dead-letter depth is the dead-letter stream's length.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis
from rlhf_client import tracing
from rlhf_client.redis_conn import MAX_BLOCK_MS, wait_replicas
from rlhf_client.queues import DEAD_LETTER_SUFFIX, Payload, PayloadError, dead_letter_stream, decode_entry

from rlhf.serving.metrics import (
    DEAD_LETTER_DEPTH,
    QUEUE_DEPTH,
    REDIS_MEMORY_MAX,
    REDIS_MEMORY_USED,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 256
_APPLIED = ":applied:"
#: A consumer trims after its commits at most this often (seconds); the worker sweeps too.
_COMMIT_TRIM_EVERY_S = 10.0
#: The count bound walks at most this many acked entries per pass (the next pass goes on).
_COUNT_WALK_MAX = 100_000


def applied_key(stream: str, group: str) -> str:
    """The group's applied index: a sorted set, payload id → when it was applied (unix ms)."""
    return f"{stream}{_APPLIED}{group}"


def applied_ids(client: redis.Redis, stream: str, group: str) -> set[str]:
    """The payload ids `group` has applied from `stream` and still remembers (either format:
    the sorted set, or a plain set not yet migrated)."""
    key = applied_key(stream, group)
    kind = _s(client.type(key))
    members = client.smembers(key) if kind == "set" else client.zrange(key, 0, -1)
    return {_s(m) for m in members}


@dataclass(frozen=True)
class Retention:
    """How long finished stream data is kept (see the module docstring, "Retention").

    `acked_s`: entries every group has acked are trimmed once older than this (by their stream
    id); None: no age bound. `max_entries`: beyond this many entries in a stream, the oldest
    acked ones are trimmed; None: no count bound. `applied_s`: an applied payload id is
    forgotten this long after it was applied, once its group has finished every entry pushed
    until then; None: never. `dead_letter_max`: dead-letter streams keep about this many
    entries; None: all.
    """

    acked_s: float | None = 24 * 3600.0
    max_entries: int | None = 100_000
    applied_s: float | None = 7 * 24 * 3600.0
    dead_letter_max: int | None = 10_000

    @classmethod
    def from_settings(cls, settings) -> "Retention":
        return cls(acked_s=settings.stream_retention_s, max_entries=settings.stream_max_entries,
                   applied_s=settings.applied_ids_retention_s,
                   dead_letter_max=settings.dead_letter_max_entries)


@dataclass
class TrimResult:
    """What one trim pass did to one stream."""

    stream: str
    entries: int = 0  # stream entries removed
    applied: int = 0  # applied ids forgotten (all of the stream's groups)
    migrated: int = 0  # ids moved from an old plain-set index
    safe_point: str | None = None  # the first entry some group has not finished

    def __bool__(self) -> bool:
        return bool(self.entries or self.applied or self.migrated)


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Entry:
    """One parsed, valid stream entry handed to a job."""

    entry_id: str  # the stream entry id ("1718000000000-0")
    payload: Payload
    deliveries: int
    #: the producer's W3C trace context (the entry's `traceparent` field; tracing on only)
    traceparent: str | None = field(default=None, compare=False, repr=False)

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
    `retention`: trim the stream and its applied indexes after each commit, and bound the
    dead-letter stream as it is written (None: leave both to the worker's sweep). `clock`:
    unix seconds, what the applied index is scored with.
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
        retention: Retention | None = None,
        clock: Callable[[], float] = time.time,
        min_replicas_ack: int = 0,
        replicas_ack_timeout_ms: int = 1000,
    ):
        self.r = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.validate = validate
        self.retention = retention
        self.clock = clock  # unix seconds: the applied index's scores (tests move it on)
        self.min_replicas_ack = min_replicas_ack  # commit: WAIT for this many replicas
        self.replicas_ack_timeout_ms = replicas_ack_timeout_ms
        self.dead_stream = dead_letter_stream(stream)
        self.applied_key = applied_key(stream, group)
        self._last_trim = float("-inf")
        self._history_cursor: str | None = "0"  # own pending list; None once read through
        self._claim_cursor: str | None = "0-0"  # XAUTOCLAIM scan; None once scanned through
        self.dead_lettered = 0
        self.duplicates = 0
        self.ensure_group()
        migrate_applied_index(self.r, self.applied_key, self._now_ms())

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
        While tracing is on, a read that returns entries is a CONSUMER span linked to each
        entry's producer (`rlhf_client.tracing`).
        """
        started_ns = time.time_ns()
        out: list[Entry] = []
        while len(out) < count:
            want = min(_READ_CHUNK, count - len(out))
            raw, fresh = self._next_raw(want, block_ms if not out else None)
            if not raw:
                break
            out.extend(self._accept(raw, fresh))
        if out:
            tracing.consumer_span(self.stream, (e.traceparent for e in out),
                                  start_time_ns=started_ns,
                                  attributes={"messaging.consumer.group.name": self.group})
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
        parsed: list[tuple[str, Payload, int, bytes | None]] = []
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
            parsed.append((eid, payload, n, fields.get(tracing.TRACEPARENT_FIELD)))
        if not parsed:
            return []
        applied = self.applied_flags(self.r, [p.id for _, p, _, _ in parsed])
        out, seen = [], set()
        for (eid, payload, n, traceparent), done in zip(parsed, applied):
            if done or payload.id in seen:
                self.duplicates += 1
                self.r.xack(self.stream, self.group, eid)
                continue
            seen.add(payload.id)
            out.append(Entry(eid, payload, n, traceparent.decode() if traceparent else None))
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
        maxlen = self.retention.dead_letter_max if self.retention is not None else None
        pipe = self.r.pipeline(transaction=True)
        pipe.xadd(self.dead_stream, record, maxlen=maxlen, approximate=True)
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
    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def applied_flags(self, client, payload_ids: list[str]) -> list[bool]:
        """Whether each payload id is in the group's applied index. `client` may be this
        consumer's client or a pipeline in immediate mode (WATCHing the index)."""
        if not payload_ids:
            return []
        return [score is not None for score in client.zmscore(self.applied_key, payload_ids)]

    def queue_commit(self, pipe, payload_ids: Iterable[str] = (),
                     entry_ids: Iterable[str] = ()) -> None:
        """Queue what `commit` does into `pipe` (a MULTI block the caller executes): the payload
        ids into the applied index, scored now, and XACK of the entries."""
        pids = list(dict.fromkeys(payload_ids))
        eids = list(entry_ids)
        now = self._now_ms()
        for i in range(0, len(pids), 5000):
            pipe.zadd(self.applied_key, dict.fromkeys(pids[i:i + 5000], now))
        for i in range(0, len(eids), 5000):
            pipe.xack(self.stream, self.group, *eids[i:i + 5000])

    def commit(self, entries: Iterable[Entry] = (), *, payload_ids: Iterable[str] = (),
               entry_ids: Iterable[str] = ()) -> None:
        """Record the payload ids as applied and ack their entries, in one transaction; then,
        with a `retention`, trim the stream and its applied indexes (errors logged, not raised).

        Pass `entries`, or (when resuming from a manifest) `payload_ids` and `entry_ids`.
        """
        entries = list(entries)
        pipe = self.r.pipeline(transaction=True)
        self.queue_commit(pipe, [e.id for e in entries] + list(payload_ids),
                          [e.entry_id for e in entries] + list(entry_ids))
        pipe.execute()
        self.confirm_replicated()
        if self.retention is not None \
                and time.monotonic() - self._last_trim >= _COMMIT_TRIM_EVERY_S:
            self.trim()

    def confirm_replicated(self) -> None:
        """With `min_replicas_ack`: WAIT until that many replicas have every write made so far
        (the commit); `ReplicationLag` (a `redis.ConnectionError`: retried like an outage, and
        the commit is idempotent) when fewer confirm in time."""
        wait_replicas(self.r, self.min_replicas_ack, self.replicas_ack_timeout_ms)

    def trim(self) -> TrimResult | None:
        """Trim this stream and its groups' applied indexes by `retention` now; None when there
        is no retention or Redis failed (logged: trimming is housekeeping, never an error)."""
        if self.retention is None:
            return None
        self._last_trim = time.monotonic()
        try:
            done = trim_stream(self.r, self.stream, self.retention, now_ms=self._now_ms())
        except redis.RedisError as exc:
            log.info("%s: trim skipped (%s)", self.stream, exc)
            return None
        if done:
            log.debug("%s: trimmed %d entries, forgot %d applied ids", self.stream, done.entries,
                      done.applied)
        return done

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


def refresh_redis_memory(client: redis.Redis) -> tuple[int, int]:
    """Set the Redis memory gauges from `INFO memory` (the worker runs this periodically; the
    RlhfRedisMemoryHigh alert compares them). Returns (used, maxmemory; 0 = no limit)."""
    info = client.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    REDIS_MEMORY_USED.set(used)
    REDIS_MEMORY_MAX.set(limit)
    return used, limit


# ---------------------------------------------------------------------------------------- retention
StreamId = tuple[int, int]

# A plain SET index (before the sorted set) → the sorted set, every id scored ARGV[1], in one
# atomic call: no reader ever sees the key half converted.
_MIGRATE_LUA = """
local t = redis.call('TYPE', KEYS[1])
if type(t) == 'table' then t = t['ok'] end
if t ~= 'set' then return 0 end
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
for i = 1, #members, 1000 do
  local args = {}
  for j = i, math.min(i + 999, #members) do
    args[#args + 1] = ARGV[1]
    args[#args + 1] = members[j]
  end
  redis.call('ZADD', KEYS[1], unpack(args))
end
return #members
"""

# The id of the ARGV[2]-th entry of KEYS[1] before ARGV[1] (an exclusive XRANGE end), or the
# last one there is; walked in chunks so no more than 1000 entries are held at a time.
_NTH_ENTRY_LUA = """
local want = tonumber(ARGV[2])
local start, last, got = '-', false, 0
while got < want do
  local n = math.min(1000, want - got)
  local r = redis.call('XRANGE', KEYS[1], start, ARGV[1], 'COUNT', n)
  if #r == 0 then break end
  got = got + #r
  last = r[#r][1]
  start = '(' .. last
  if #r < n then break end
end
return last
"""


def _parse_id(value) -> StreamId:
    ms, _, seq = _s(value).partition("-")
    return int(ms), int(seq or 0)


def _fmt_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def _next_id(sid: StreamId) -> StreamId:
    return (sid[0] + 1, 0) if sid[1] >= 2**64 - 1 else (sid[0], sid[1] + 1)


def migrate_applied_index(client: redis.Redis, key: str, now_ms: int | None = None) -> int:
    """Turn an applied index still in the old format (a plain SET) into the sorted set, every id
    scored `now_ms` (applied "now": it keeps the full horizon from the upgrade). Returns how many
    ids moved (0 when the key is already a sorted set or missing)."""
    now_ms = _now_ms() if now_ms is None else now_ms
    return int(client.eval(_MIGRATE_LUA, 1, key, now_ms))


@dataclass(frozen=True)
class _GroupState:
    name: str
    safe_point: StreamId  # the first entry this group has not finished
    nothing_pending: bool


def _group_states(client: redis.Redis, stream: str, groups: list[dict]) -> list[_GroupState]:
    """Each group's safe point: its oldest pending entry, else the one after its last delivered.

    Read before the stream's last-generated id (see `trim_stream`); racing reads, acks and
    claims only move the true safe point forward, so a point read here is never too far."""
    pipe = client.pipeline(transaction=False)
    for g in groups:
        pipe.xpending(stream, _s(g["name"]))
    out = []
    for g, summary in zip(groups, pipe.execute()):
        after_last = _next_id(_parse_id(g["last-delivered-id"]))
        oldest = summary.get("min") if int(summary.get("pending") or 0) else None
        point = min(after_last, _parse_id(oldest)) if oldest else after_last
        out.append(_GroupState(_s(g["name"]), point,
                               nothing_pending=oldest is None and not int(g.get("pending") or 0)))
    return out


def trim_stream(client: redis.Redis, stream: str, retention: Retention, *,
                now_ms: int | None = None) -> TrimResult:
    """One trim pass over `stream` and its groups' applied indexes (module docstring,
    "Retention"). `now_ms` (unix ms) defaults to this process's clock. A stream that does not
    exist or has no consumer group is left alone."""
    now_ms = _now_ms() if now_ms is None else now_ms
    res = TrimResult(stream)
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:  # no such key (or not a stream)
        return res
    if not groups:
        return res
    states = _group_states(client, stream, groups)
    info = client.xinfo_stream(stream)  # after the groups: a later last-generated id is safe
    last_generated = _parse_id(info["last-generated-id"])
    length = int(info["length"])
    # caught up: nothing pending, everything delivered; what it reads next is pushed after now
    caught_up = {s.name: s.nothing_pending and s.safe_point > last_generated for s in states}
    safe = min(s.safe_point for s in states)
    res.safe_point = _fmt_id(safe)

    cut: StreamId | None = None
    if retention.acked_s is not None:
        cut = (max(0, now_ms - int(retention.acked_s * 1000)), 0)
    if retention.max_entries is not None and length > retention.max_entries:
        excess = min(length - retention.max_entries, _COUNT_WALK_MAX)
        nth = client.eval(_NTH_ENTRY_LUA, 1, stream, "(" + _fmt_id(safe), excess)
        if nth:
            by_count = _next_id(_parse_id(nth))
            cut = by_count if cut is None else max(cut, by_count)
    if cut is not None and min(cut, safe) > (0, 0):
        res.entries = int(client.xtrim(stream, minid=_fmt_id(min(cut, safe)), approximate=False))

    for s in states:
        key = applied_key(stream, s.name)
        res.migrated += migrate_applied_index(client, key, now_ms)
        if retention.applied_s is None:
            continue
        point_ms = max(s.safe_point[0], now_ms) if caught_up[s.name] else s.safe_point[0]
        limit = min(point_ms, now_ms) - int(retention.applied_s * 1000)
        res.applied += int(client.zremrangebyscore(key, "-inf", f"({limit}"))
    return res


def trim_streams(client: redis.Redis, retention: Retention, *, pattern: str = "*",
                 now_ms: int | None = None) -> dict[str, TrimResult]:
    """The worker's sweep: `trim_stream` over every stream matching `pattern`, dead-letter
    streams cut to `dead_letter_max` entries, and applied indexes whose stream is gone emptied
    of ids older than `applied_s`. Returns {stream or index key: what was done} for those
    changed. One stream's error (a key of another type under the pattern) is logged and skipped."""
    now_ms = _now_ms() if now_ms is None else now_ms
    out: dict[str, TrimResult] = {}
    for key in client.scan_iter(match=pattern, _type="stream", count=500):
        name = _s(key)
        try:
            if name.endswith(DEAD_LETTER_SUFFIX):
                if retention.dead_letter_max is not None:
                    n = int(client.xtrim(name, maxlen=retention.dead_letter_max, approximate=False))
                    if n:
                        out[name] = TrimResult(name, entries=n)
                continue
            done = trim_stream(client, name, retention, now_ms=now_ms)
        except redis.ResponseError as exc:
            log.warning("%s: not trimmed: %s", name, exc)
            continue
        if done:
            out[name] = done
    if retention.applied_s is not None:
        limit = now_ms - int(retention.applied_s * 1000)
        for key in client.scan_iter(match=pattern + _APPLIED + "*", _type="zset", count=500):
            name = _s(key)
            stream = name.rsplit(_APPLIED, 1)[0]
            if client.exists(stream):
                continue  # its groups' indexes were trimmed above (or it has no group: kept)
            n = int(client.zremrangebyscore(name, "-inf", f"({limit}"))
            if n:
                out[name] = TrimResult(stream, applied=n)
    return out


def start_trim_loop(client: redis.Redis, retention: Retention, interval_s: float, *,
                    pattern: str = "*") -> threading.Event:
    """A daemon thread running `trim_streams` now and then every `interval_s` until the returned
    event is set (the trainer worker's main process runs one). Errors are logged, never raised."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                done = trim_streams(client, retention, pattern=pattern)
                if done:
                    log.info("retention: %d entries trimmed, %d applied ids forgotten, %d ids "
                             "migrated, in %d key(s)", sum(d.entries for d in done.values()),
                             sum(d.applied for d in done.values()),
                             sum(d.migrated for d in done.values()), len(done))
            except redis.RedisError as exc:  # an outage: the next pass tries again
                log.info("retention pass skipped: %s", exc)
            except Exception:  # noqa: BLE001 - housekeeping must not take the worker down
                log.warning("retention pass failed", exc_info=True)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="stream-trim", daemon=True).start()
    return stop
