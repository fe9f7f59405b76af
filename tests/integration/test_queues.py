"""Queues on real Redis Streams: producers, the consumer group, ack after commit, reclaim,
dead letters, duplicates, heartbeats and depth metrics."""

from __future__ import annotations

import pytest
import redis
from rlhf_client import PayloadError, QueueProducer
from rlhf_client.queues import PREFERENCES_STREAM, SFT_STREAM, dead_letter_stream
from rlhfpb.v1 import samples_pb2
from trainer_helpers import REDIS_URL, stream_fixtures, synthetic_messages, unique, wait_for

from rlhf.serving.metrics import DEAD_LETTER_DEPTH, QUEUE_DEPTH
from rlhf.trainer.data import check_preference_payload
from rlhf.trainer.queues import StreamConsumer, applied_ids, refresh_queue_metrics, stream_depth

GROUP = "g"


r, stream = stream_fixtures(REDIS_URL, "test:queue")


@pytest.fixture
def producer(r):
    return QueueProducer(r)


def consumer(r, stream, name, *, max_deliveries=5, claim_idle_ms=60_000, validate=check_preference_payload):
    return StreamConsumer(r, stream, GROUP, name, max_deliveries=max_deliveries,
                          claim_idle_ms=claim_idle_ms, validate=validate)


def pending(r, stream) -> int:
    return int(r.xpending(stream, GROUP)["pending"])


def test_producers_push_every_payload_kind_with_unique_ids(r, stream, producer):
    a = producer.push_pair(prompt="q", chosen="good", rejected="bad", stream=stream)
    b = producer.push_ranking(prompt="q", responses=["great", "fine", "awful"], ranks=[0, 1, 2],
                              stream=stream)
    c = producer.push_sample(samples_pb2.ScoredSample(prompt_ids=[1, 2], completion_ids=[3], reward=0.5),
                             stream=stream)
    mine = producer.push_pair(samples_pb2.PreferencePair(id="own-id", prompt="q", chosen="y", rejected="n"),
                              stream=stream)
    d = producer.push_sft_example(prompt="q", completion="<|reset|> no.", prefix=" sure,",
                                  source="test", stream=stream)
    assert len({a, b, c, d}) == 4 and mine == "own-id"
    entries = r.xrange(stream)
    assert [f[b"id"].decode() for _, f in entries] == [a, b, c, "own-id", d]
    assert [f[b"type"].decode() for _, f in entries] == [
        "rlhfpb.v1.PreferencePair", "rlhfpb.v1.Ranking", "rlhfpb.v1.ScoredSample",
        "rlhfpb.v1.PreferencePair", "rlhfpb.v1.SFTExample"]
    parsed = samples_pb2.PreferencePair.FromString(entries[0][1][b"data"])
    assert (parsed.chosen, parsed.rejected) == ("good", "bad") and parsed.created.seconds > 0
    sft = samples_pb2.SFTExample.FromString(entries[4][1][b"data"])
    assert (sft.prompt, sft.completion, sft.prefix) == ("q", "<|reset|> no.", " sure,")
    assert sft.source == "test"
    assert sft.created.seconds > 0
    with pytest.raises(PayloadError, match="ranks"):
        producer.push_ranking(prompt="q", responses=["a", "b"], ranks=[0], stream=stream)
    with pytest.raises(PayloadError, match="SFTExample.completion: must be non-empty"):
        producer.push_sft_example(prompt="q", completion="", prefix=" sure,", stream=stream)
    with pytest.raises(PayloadError, match="SFTExample: .*rejected"):  # not a field of it
        producer.push_sft_example(prompt="q", completion=" a", rejected=" b", stream=stream)
    assert producer.length(stream) == 5  # the bad ones were not pushed
    # Without a stream name, each type goes to its default stream.
    for push, default in ((lambda: producer.push_pair(prompt="q", chosen="a", rejected="b"),
                           PREFERENCES_STREAM),
                          (lambda: producer.push_sft_example(prompt="q", completion=" a"),
                           SFT_STREAM)):
        pid = push()
        (eid, fields), = r.xrevrange(default, count=1)
        r.xdel(default, eid)
        if r.xlen(default) == 0:
            r.delete(default)
        assert fields[b"id"].decode() == pid


def test_entries_stay_pending_until_commit_then_are_never_applied_again(r, stream, producer):
    ids = producer.push_many(synthetic_messages(10, seed=0, prefix=unique("p")), stream=stream)
    c = consumer(r, stream, "job-1")
    got = c.read(100)
    assert [e.id for e in got] == ids and all(e.deliveries == 1 for e in got)
    assert pending(r, stream) == 10  # read is not ack
    assert c.depth() == 10
    c.commit(got[:4])
    assert pending(r, stream) == 6 and c.depth() == 6
    assert applied_ids(r, stream, GROUP) == set(ids[:4])
    # A producer retry (same payload ids) is acked on sight and never handed out again.
    retried = [samples_pb2.PreferencePair(id=i, prompt="q", chosen="a", rejected="b") for i in ids[:4]]
    producer.push_many(retried, stream=stream)
    fresh = consumer(r, stream, "job-2")
    assert fresh.read(100) == [] and fresh.duplicates == 4
    assert pending(r, stream) == 6  # job-1's uncommitted six are untouched


def test_a_redelivered_job_reads_its_own_pending_entries_first(r, stream, producer):
    ids = producer.push_many(synthetic_messages(6, seed=1, prefix=unique("p")), stream=stream)
    first = consumer(r, stream, "job-A")
    assert [e.id for e in first.read(4)] == ids[:4]
    # The same job, restarted (same consumer name): its four come back, then the rest.
    again = consumer(r, stream, "job-A")
    got = again.read(100)
    assert [e.id for e in got] == ids
    assert [e.deliveries for e in got] == [2, 2, 2, 2, 1, 1]


def test_entries_of_a_dead_consumer_are_reclaimed(r, stream, producer):
    ids = producer.push_many(synthetic_messages(5, seed=2, prefix=unique("p")), stream=stream)
    dead = consumer(r, stream, "job-dead")
    assert len(dead.read(5)) == 5  # ... and the job dies without committing

    def reclaimed():
        got = consumer(r, stream, "job-live", claim_idle_ms=200).read(10)
        return got or None

    got = wait_for(reclaimed, timeout=10, what="XAUTOCLAIM to hand over the dead consumer's entries")
    assert sorted(e.id for e in got) == sorted(ids)
    assert all(e.deliveries >= 2 for e in got)
    info = {c["name"].decode(): c["pending"] for c in r.xinfo_consumers(stream, GROUP)}
    assert info.get("job-live") == 5 and info.get("job-dead", 0) == 0


def test_a_long_running_consumer_reclaims_again_after_rescan(r, stream, producer):
    ids = producer.push_many(synthetic_messages(3, seed=5, prefix=unique("p")), stream=stream)
    live = consumer(r, stream, "job-live", claim_idle_ms=200)
    assert [e.id for e in live.read(2)] == ids[:2]  # its first pass: nothing idle yet
    assert len(consumer(r, stream, "job-dead").read(5)) == 1  # ... takes the third and dies
    # one XAUTOCLAIM pass per consumer: once it is through, reads see only new entries ...
    assert live.read(5) == []
    wait_for(lambda: r.xpending_range(stream, GROUP, "-", "+", 1, idle=250, consumername="job-dead"),
             timeout=10, what="the dead consumer's entry to go idle")
    assert live.read(5) == []
    # ... until rescan(): the dead consumer's entry, and its own untouched ones, come back
    live.rescan()
    got = live.read(5)
    assert sorted(e.id for e in got) == sorted(ids) and all(e.deliveries == 2 for e in got)


def test_heartbeat_keeps_entries_from_being_reclaimed(r, stream, producer):
    producer.push_many(synthetic_messages(3, seed=3, prefix=unique("p")), stream=stream)
    busy = consumer(r, stream, "job-busy")
    held = busy.read(3)
    other = consumer(r, stream, "job-other", claim_idle_ms=1000)
    for _ in range(8):  # ~2 s in all, twice the claim idle time; a touch every ~0.25 s
        busy.touch(held)
        assert other.read(3, block_ms=250) == []
        other = consumer(r, stream, "job-other", claim_idle_ms=1000)
    assert busy.owns(held)
    # Without heartbeats they go to the other consumer, and the first one can tell.
    got = wait_for(lambda: consumer(r, stream, "job-other", claim_idle_ms=1000).read(3), timeout=10,
                   what="reclaim after the heartbeats stop")
    assert len(got) == 3 and not busy.owns(held)


def test_an_entry_delivered_too_often_is_dead_lettered_with_the_reason(r, stream, producer):
    (pid,) = producer.push_many(synthetic_messages(1, seed=4, prefix=unique("p")), stream=stream)
    for attempt in range(2):  # two deliveries to a job that keeps dying
        assert [e.id for e in consumer(r, stream, "job-crashy", max_deliveries=2).read(1)] == [pid]
    c = consumer(r, stream, "job-crashy", max_deliveries=2)
    assert c.read(1) == [] and c.dead_lettered == 1  # the third delivery is refused
    assert pending(r, stream) == 0
    (dead,) = QueueProducer(r).dead_letters(stream)
    assert dead["id"] == pid and dead["reason"] == "delivered 3 times (limit 2)"
    assert dead["deliveries"] == "3" and dead["group"] == GROUP and dead["consumer"] == "job-crashy"
    original = samples_pb2.PreferencePair.FromString(dead["data"])
    assert original.id == pid  # the payload travels with it, for inspection or replay


def test_malformed_entries_never_crash_the_consumer(r, stream, producer):
    good = producer.push_pair(prompt="q", chosen="good", rejected="bad", stream=stream)
    ok_fields = r.xrange(stream)[0][1]
    r.xadd(stream, {b"type": b"rlhfpb.v1.PreferencePair", b"id": b"g1", b"data": b"\xff\xff\xff"})
    r.xadd(stream, {b"something": b"else"})
    r.xadd(stream, {b"type": b"rlhfpb.v1.Bogus", b"id": b"g2", b"data": b""})
    r.xadd(stream, {**ok_fields, b"id": b"not-the-payload-id"})
    bad_ranking = samples_pb2.Ranking(id="g3", prompt="q", responses=["a", "b"], ranks=[0])
    r.xadd(stream, {b"type": b"rlhfpb.v1.Ranking", b"id": b"g3", b"data": bad_ranking.SerializeToString()})
    producer.push_sample(prompt_ids=[1], completion_ids=[2], stream=stream)  # valid, wrong kind here
    last = producer.push_ranking(prompt="q", responses=["great", "bad"], ranks=[0, 1], stream=stream)

    c = consumer(r, stream, "job-1")
    got = c.read(100)
    assert [e.id for e in got] == [good, last]
    assert c.dead_lettered == 6 and pending(r, stream) == 2
    reasons = [d["reason"] for d in reversed(QueueProducer(r).dead_letters(stream))]
    assert "does not parse" in reasons[0]
    assert "lacks field" in reasons[1]
    assert "unknown payload type" in reasons[2]
    assert "differs from the payload" in reasons[3]
    assert "Ranking.ranks" in reasons[4]
    assert "not preference data" in reasons[5]
    assert c.dead_letter_depth() == 6


def test_depth_metrics(r, stream, producer):
    producer.push_many(synthetic_messages(7, seed=5, prefix=unique("p")), stream=stream)
    assert stream_depth(r, stream) == 7  # no group yet: everything is waiting
    c = consumer(r, stream, "job-1")
    got = c.read(3)
    r.xadd(stream, {b"junk": b"1"})
    c.commit(got)
    c.read(1)  # the next entry is delivered; nothing pending is done yet
    c.update_metrics()
    assert QUEUE_DEPTH.labels(stream)._value.get() == 5  # 4 undelivered + 1 pending
    assert DEAD_LETTER_DEPTH.labels(stream)._value.get() == 0
    c.read(10)  # the rest, including the junk entry, which goes to the dead letters
    depths = refresh_queue_metrics(r, pattern=f"{stream}*")
    assert depths == {stream: (4, 1)}
    assert DEAD_LETTER_DEPTH.labels(stream)._value.get() == 1
    assert dead_letter_stream(stream) not in depths  # dead-letter streams are not queues
