"""Retention on real Redis Streams (database 10): acked entries trimmed, never one a group still
needs; applied-id indexes bounded while a redelivered or re-pushed payload is still refused;
the count bound, dead letters, the sweep, migration from the old plain-set index, and a real
reward-model job that trims the stream it commits to.

Time passing is simulated by handing the trim a later `now_ms` (and the consumer a clock): no
test sleeps."""

from __future__ import annotations

import time

from rlhf_client import QueueProducer
from rlhf_client.queues import dead_letter_stream
from rlhf_client.redis_conn import connect
from rlhfpb.v1 import samples_pb2
from trainer_helpers import stream_fixtures, synthetic_messages, unique, wait_for

from helpers import TEST_REDIS
from rlhf.trainer.data import check_preference_payload
from rlhf.trainer.queues import (
    Retention,
    StreamConsumer,
    applied_ids,
    applied_key,
    migrate_applied_index,
    start_trim_loop,
    stream_depth,
    trim_stream,
    trim_streams,
)

REDIS_URL = f"{TEST_REDIS}/10"
HOUR_MS = 3_600_000
#: Acked entries older than a minute go; applied ids are kept an hour.
RET = Retention(acked_s=60, max_entries=None, applied_s=3600, dead_letter_max=None)


r, stream = stream_fixtures(REDIS_URL, "test:retention")


def consumer(r, stream, group, name, **kw):
    kw.setdefault("max_deliveries", 5)
    kw.setdefault("claim_idle_ms", 60_000)
    return StreamConsumer(r, stream, group, name, validate=check_preference_payload, **kw)


def pair(pid: str) -> samples_pb2.PreferencePair:
    return samples_pb2.PreferencePair(id=pid, prompt="q", chosen="good", rejected="bad")


def push(r, stream, n: int, prefix: str = "p") -> list[str]:
    return QueueProducer(r).push_many([pair(f"{prefix}-{i}") for i in range(n)], stream=stream)


def entry_ids(r, stream) -> list[str]:
    return [eid.decode() for eid, _ in r.xrange(stream)]


def now_ms() -> int:
    return int(time.time() * 1000)


def test_acked_entries_past_retention_go_and_unfinished_ones_stay(r, stream):
    ids = push(r, stream, 10)
    everything = entry_ids(r, stream)
    fast, slow = consumer(r, stream, "fast", "f"), consumer(r, stream, "slow", "s")
    got = fast.read(10)
    fast.commit(got[:6])  # 6 acked, 4 pending with "fast"
    slow.commit(slow.read(3))  # 3 acked, 7 not yet delivered to "slow" (it lags)

    # Within the retention acked entries stay (audits, re-reads).
    assert not trim_stream(r, stream, RET)
    assert entry_ids(r, stream) == everything
    # Past it, only what BOTH groups finished goes: "slow" has not read past the third entry.
    later = now_ms() + 2 * 60_000
    res = trim_stream(r, stream, RET, now_ms=later)
    assert (res.entries, res.safe_point) == (3, everything[3])
    assert entry_ids(r, stream) == everything[3:]
    # "slow" catches up: now "fast"'s oldest pending entry (the 7th) holds the trim back.
    slow.commit(slow.read(10))
    assert trim_stream(r, stream, RET, now_ms=later).entries == 3
    assert entry_ids(r, stream) == everything[6:]
    assert {e.entry_id for e in got[6:]} == set(everything[6:])  # exactly the pending ones
    # Everything finished by every group: all of it goes; the groups and the key stay.
    fast.commit(got[6:])
    assert trim_stream(r, stream, RET, now_ms=later).entries == 4
    assert r.xlen(stream) == 0 and stream_depth(r, stream) == 0
    assert {g["name"] for g in r.xinfo_groups(stream)} == {b"fast", b"slow"}
    # Nothing forgotten within the applied horizon; new entries flow as before.
    assert applied_ids(r, stream, "fast") == applied_ids(r, stream, "slow") == set(ids)
    new = push(r, stream, 2, prefix="new")
    assert [e.id for e in fast.read(5)] == new and [e.id for e in slow.read(5)] == new


def test_the_count_bound_trims_oldest_acked_entries_and_never_unfinished_ones(r, stream):
    push(r, stream, 20)
    everything = entry_ids(r, stream)
    c = consumer(r, stream, "g", "c")
    got = c.read(17)
    c.commit(got[:12])  # 12 acked, 5 pending, 3 unread
    bound = Retention(acked_s=None, max_entries=5, applied_s=None, dead_letter_max=None)
    # 20 entries, bound 5: but 8 are unfinished, so only the 12 acked ones can go.
    assert trim_stream(r, stream, bound).entries == 12
    assert entry_ids(r, stream) == everything[12:]
    c.commit(got[12:] + c.read(3))
    # All acked now: the 5 newest are kept (no age bound), the rest go.
    assert trim_stream(r, stream, bound).entries == 3
    assert entry_ids(r, stream) == everything[15:]


def test_a_duplicate_waiting_behind_a_lagging_group_is_refused_past_the_horizon(r, stream):
    """The applied index keeps an id while any entry pushed within the horizon after it was
    applied may still reach the group, however long the group lags."""
    p = QueueProducer(r)
    p.push(pair("pair-x"), stream=stream)
    p.push(pair("pair-x"), stream=stream)  # a producer's retry: new entry, same payload id
    p.push(pair("pair-y"), stream=stream)
    c = consumer(r, stream, "g", "c")
    c.commit(c.read(1))  # applies pair-x; its retry and pair-y are not yet delivered
    ret = Retention(acked_s=0, max_entries=None, applied_s=3600, dead_letter_max=None)
    far = now_ms() + 5 * HOUR_MS  # well past the applied horizon
    res = trim_stream(r, stream, ret, now_ms=far)
    assert (res.entries, res.applied) == (1, 0)  # the original's entry goes, its id stays
    assert applied_ids(r, stream, "g") == {"pair-x"}
    got = c.read(10)
    assert [e.id for e in got] == ["pair-y"] and c.duplicates == 1  # the retry: refused
    c.commit(got)
    # Caught up: every entry pushed within the horizon has been read, so the id can go.
    res = trim_stream(r, stream, ret, now_ms=far)
    assert (res.entries, res.applied) == (2, 2) and r.xlen(stream) == 0
    assert applied_ids(r, stream, "g") == set()
    # The documented window: a re-push more than the horizon after the original is new data.
    p.push(pair("pair-x"), stream=stream)
    assert [e.id for e in c.read(10)] == ["pair-x"]


def test_an_xclaimed_or_re_pushed_duplicate_is_still_refused_after_trimming(r, stream):
    p = QueueProducer(r)
    p.push(pair("pair-x"), stream=stream)
    p.push(pair("pair-x"), stream=stream)  # the retry of a push whose reply was lost
    first, doomed = consumer(r, stream, "g", "first"), consumer(r, stream, "g", "doomed")
    original = first.read(1)
    retry = doomed.read(1)  # read before the original was applied: held, pending
    assert [e.id for e in original] == [e.id for e in retry] == ["pair-x"]
    first.commit(original)  # applied; "doomed" dies holding the retry's entry
    ret = Retention(acked_s=0, max_entries=None, applied_s=3600, dead_letter_max=None)
    far = now_ms() + 5 * HOUR_MS
    res = trim_stream(r, stream, ret, now_ms=far)
    assert res.entries == 1 and res.safe_point == retry[0].entry_id
    assert entry_ids(r, stream) == [retry[0].entry_id]  # pending: kept
    assert applied_ids(r, stream, "g") == {"pair-x"}  # an entry below the horizon still waits

    # Another consumer claims the dead one's entry (XAUTOCLAIM): refused, acked, not applied.
    rescuer = consumer(r, stream, "g", "rescuer", claim_idle_ms=1)

    def claimed():
        rescuer.rescan()
        assert rescuer.read(10) == []
        return rescuer.duplicates

    wait_for(claimed, timeout=10, what="the pending retry to be claimed and refused")
    assert r.xpending(stream, "g")["pending"] == 0
    # Within the horizon a fresh re-push (a new entry, after the trim) is refused too.
    trim_stream(r, stream, ret, now_ms=now_ms() + 2 * 60_000)
    assert r.xlen(stream) == 0 and applied_ids(r, stream, "g") == {"pair-x"}
    p.push(pair("pair-x"), stream=stream)
    assert rescuer.read(10) == [] and rescuer.duplicates == 2


def test_the_applied_index_stays_bounded_across_many_commits(r, stream):
    clock = [time.time()]
    ret = Retention(acked_s=300, max_entries=None, applied_s=3600, dead_letter_max=None)
    c = consumer(r, stream, "g", "c", retention=ret, clock=lambda: clock[0])
    sizes = []
    for k in range(30):
        clock[0] += 600  # ten minutes a round
        ids = push(r, stream, 20, prefix=f"r{k}")
        got = c.read(50)
        assert [e.id for e in got] == ids
        c.commit(got)
        c.trim()
        assert r.xlen(stream) == 0  # every entry acked and (by the clock) past its retention
        sizes.append(r.zcard(applied_key(stream, "g")))
    # An hour's worth of rounds is remembered (this one and the six before), never more.
    assert sizes == [min(20 * (k + 1), 140) for k in range(30)]
    # Re-pushes of the last hour's payloads are refused; older ones are new data again.
    QueueProducer(r).push_many([pair("r29-0"), pair("r23-5"), pair("r22-5"), pair("r0-0")],
                               stream=stream)
    assert [e.id for e in c.read(10)] == ["r22-5", "r0-0"] and c.duplicates == 2


def test_an_old_plain_set_index_is_migrated_and_keeps_refusing(r, stream):
    for group in ("g", "h", "k"):
        r.xgroup_create(stream, group, id="0", mkstream=True)
        r.sadd(applied_key(stream, group), "old-1", "old-2")
    assert applied_ids(r, stream, "g") == {"old-1", "old-2"}  # readable before the migration
    QueueProducer(r).push_many([pair("old-1"), pair("new-1")], stream=stream)

    # The worker's sweep migrates every group's index of every stream it visits...
    ret = Retention(acked_s=None, max_entries=None, applied_s=3600, dead_letter_max=None)
    done = trim_streams(r, ret, pattern=f"{stream}*")
    assert done[stream].migrated == 6
    assert {r.type(applied_key(stream, g)) for g in ("g", "h", "k")} == {b"zset"}
    assert migrate_applied_index(r, applied_key(stream, "g")) == 0  # once
    g = consumer(r, stream, "g", "c")
    assert [e.id for e in g.read(10)] == ["new-1"] and g.duplicates == 1
    # ... and a consumer starting on an index the sweep never saw migrates it itself.
    r.delete(applied_key(stream, "h"))
    r.sadd(applied_key(stream, "h"), "old-1")
    h = consumer(r, stream, "h", "c")
    assert r.type(applied_key(stream, "h")) == b"zset"
    assert [e.id for e in h.read(10)] == ["new-1"] and h.duplicates == 1
    # Migrated ids count as applied at the upgrade: the full horizon from then.
    assert trim_stream(r, stream, ret, now_ms=now_ms() + 30 * 60_000).applied == 0
    assert applied_ids(r, stream, "k") == {"old-1", "old-2"}


def test_the_sweep_bounds_dead_letters_and_leaves_what_no_group_read(r, stream):
    bounded = Retention(acked_s=0, max_entries=None, applied_s=3600, dead_letter_max=5)
    for i in range(12):
        r.xadd(stream, {b"type": b"rlhfpb.v1.PreferencePair", b"id": f"junk-{i}".encode(),
                        b"data": b"\xff\xfe"})
    c = consumer(r, stream, "g", "c", retention=bounded)
    assert c.read(20) == [] and c.dead_lettered == 12
    lonely = f"{stream}:nogroup"  # pushed before any consumer: never trimmed
    push(r, lonely, 3)
    gone = f"{stream}:gone"  # an index whose stream was deleted: only its age counts
    r.zadd(applied_key(gone, "g"), {"ancient": now_ms() - 2 * HOUR_MS, "recent": now_ms()})

    done = trim_streams(r, bounded, pattern=f"{stream}*")
    dead = dead_letter_stream(stream)
    assert r.xlen(dead) == 5
    assert [f[b"id"] for _, f in r.xrange(dead)] == [f"junk-{i}".encode() for i in range(7, 12)]
    assert r.xlen(stream) == 0 and done[stream].entries == 12  # dead-lettered = acked
    assert r.xlen(lonely) == 3 and lonely not in done
    assert r.zrange(applied_key(gone, "g"), 0, -1) == [b"recent"]


def test_a_commit_and_the_worker_loop_trim_without_being_asked(r, stream):
    at_once = Retention(acked_s=0, max_entries=None, applied_s=3600, dead_letter_max=None)
    push(r, stream, 6)
    everything = entry_ids(r, stream)
    lagging = consumer(r, stream, "lagging", "l")
    lagging.commit(lagging.read(2))  # no retention: its commit trims nothing
    assert r.xlen(stream) == 6
    job = consumer(r, stream, "job", "j", retention=at_once)
    job.commit(job.read(10))  # the commit trims up to what "lagging" finished
    assert entry_ids(r, stream) == everything[2:]
    lagging.commit(lagging.read(10))
    stop = start_trim_loop(r, at_once, 0.05, pattern=f"{stream}*")
    try:
        wait_for(lambda: r.xlen(stream) == 0, timeout=10, what="the trim loop to trim")
    finally:
        stop.set()


def test_a_reward_model_job_trims_the_stream_it_commits_to(r, stream, tiny_reward_dir, tmp_path):
    from rlhf.config import Settings
    from rlhf.trainer.jobs import execute, parse_spec
    from rlhf.trainer.reward_model import run_reward_model_job
    from trainer_helpers import forget_job, forget_model

    settings = Settings(redis_url=REDIS_URL, store_dir=tmp_path / "store", metrics_port=None,
                        torch_threads=1, stream_retention_s=0)
    pushed = QueueProducer(r).push_many(synthetic_messages(24, seed=3, prefix=unique("rm")),
                                        stream=stream)
    everything = entry_ids(r, stream)
    audit = consumer(r, stream, "audit", "a")  # another group, 8 entries behind the job
    audit.commit(audit.read(16))
    model = unique("retention-rm")
    job = parse_spec({"type": "reward_model", "model_name": model, "base_dir": str(tiny_reward_dir),
                      "learning_rate": 1e-3, "batch_size": 8, "max_length": 64,
                      "source": {"type": "stream", "stream": stream, "group": "rm"}})
    rt = connect(REDIS_URL, decode_responses=True)
    try:
        out = execute(job, run_reward_model_job, settings=settings, worker="test")
        assert out.status == "succeeded", out
        assert applied_ids(r, stream, "rm") == set(pushed)
        assert entry_ids(r, stream) == everything[16:]  # what "audit" has not finished stays
        # A redelivery of an applied pair (a producer's retry) is refused after the trim.
        QueueProducer(r).push(pair(pushed[0]), stream=stream)
        again = consumer(r, stream, "rm", "again")
        assert again.read(10) == [] and again.duplicates == 1
    finally:
        forget_model(rt, model)
        forget_job(rt, job.job_id)
        rt.close()
