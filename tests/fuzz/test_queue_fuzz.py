"""Generated queue payloads through the real producers and consumers, on real Redis.

Producers: `rlhf_client.queues.QueueProducer`; consumer: `rlhf.trainer.queues.StreamConsumer`.
Each example writes a batch of stream entries to a fresh stream (DB 5 of the shared server,
unique names, deleted afterwards): good payloads of every type (random unicode, long text),
duplicates of them (a producer's retry), and bad entries with a known defect — missing fields,
unknown or non-UTF-8 type/id, bytes that are no protobuf, an entry id that differs from the
payload's, payloads that break the rules (written past the producer's check, as a foreign or
older producer would). Promises:
- the producer refuses each rule-breaking payload with `PayloadError` naming the field, and
  pushes nothing;
- the consumer never raises; every bad entry ends in `<stream>:dead` with a reason (naming the
  broken field for a rule) and is acked; the consumer keeps reading afterwards;
- every good payload is returned once, duplicates are acked and skipped, and after the commit
  a second consumer of the group gets nothing.
"""

from __future__ import annotations

import uuid

import pytest
import redis
from conftest import FUZZ_REPORT
from helpers import TEST_REDIS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rlhf_client import PayloadError, QueueProducer
from rlhf_client.queues import MAX_ID_CHARS, MAX_PROMPT_ID_CHARS, dead_letter_stream
from rlhfpb.v1 import samples_pb2

from rlhf.trainer.queues import StreamConsumer, applied_key

REDIS_URL = f"{TEST_REDIS}/5"  # the fuzz tests' database (contract: DB 5)
PREFIX = "fuzz:queue:"
GROUP = "g"
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

TEXT = st.one_of(st.text(min_size=1, max_size=30), st.sampled_from(["🙂" * 200, "\u202e x", "日本語", "a\x00b"]),
                 st.just("long " * 20_000))


@pytest.fixture(scope="module")
def r():
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()
    yield client
    for key in client.scan_iter(match=f"{PREFIX}*", count=1000):
        client.delete(key)
    client.close()


# ------------------------------------------------------------------------------------------------
# payloads
# ------------------------------------------------------------------------------------------------


@st.composite
def good_payload(draw, pid: str):
    kind = draw(st.sampled_from(["pair", "ranking", "sample", "prompt", "sft"]))
    if kind == "pair":
        return samples_pb2.PreferencePair(id=pid, prompt=draw(st.text(max_size=20)), chosen=draw(TEXT),
                                          rejected=draw(TEXT))
    if kind == "ranking":
        responses = draw(st.lists(TEXT, min_size=2, max_size=5))
        return samples_pb2.Ranking(id=pid, prompt=draw(TEXT), responses=responses,
                                   ranks=draw(st.permutations(range(len(responses)))))
    if kind == "sample":
        n = draw(st.integers(1, 50))
        ids = draw(st.lists(st.integers(-(2**31), 2**31 - 1), min_size=n, max_size=n))
        lps = draw(st.sampled_from([[], [float("nan")] * n, [-0.5] * n]))
        return samples_pb2.ScoredSample(id=pid, completion_ids=ids, behaviour_logprobs=lps,
                                        reward=draw(st.floats(width=32)))
    if kind == "prompt":
        return samples_pb2.RolloutPrompt(id=pid[:MAX_PROMPT_ID_CHARS], prompt=draw(TEXT))
    return samples_pb2.SFTExample(id=pid, prompt=draw(st.text(max_size=20)), completion=draw(TEXT),
                                  prefix=draw(st.text(max_size=5)))


#: payloads that break one rule: (message, the field its PayloadError and dead-letter reason name)
def rule_breakers(pid: str):
    return [
        (samples_pb2.PreferencePair(id=pid, prompt="q", chosen="", rejected="b"), "chosen"),
        (samples_pb2.PreferencePair(id=pid, prompt="q", chosen="a", rejected=""), "rejected"),
        (samples_pb2.PreferencePair(id="", prompt="q", chosen="a", rejected="b"), "id"),
        (samples_pb2.PreferencePair(id="x" * (MAX_ID_CHARS + 1), chosen="a", rejected="b"), "id"),
        (samples_pb2.Ranking(id=pid, responses=["a"], ranks=[0]), "responses"),
        (samples_pb2.Ranking(id=pid, responses=["a", "b"], ranks=[0]), "ranks"),
        (samples_pb2.Ranking(id=pid, responses=["a", ""], ranks=[0, 1]), "responses"),
        (samples_pb2.ScoredSample(id=pid, completion_ids=[]), "completion_ids"),
        (samples_pb2.ScoredSample(id=pid, completion_ids=[1, 2], reference_logprobs=[0.1]), "reference_logprobs"),
        (samples_pb2.RolloutPrompt(id=pid, prompt=""), "prompt"),
        (samples_pb2.RolloutPrompt(id="p" * (MAX_PROMPT_ID_CHARS + 1), prompt="q"), "id"),
        (samples_pb2.SFTExample(id=pid, prompt="q", completion="", prefix="p"), "completion"),
    ]


def raw_fields(msg) -> dict[bytes, bytes]:
    """An entry as the producer writes it, without its check (a foreign producer)."""
    return {b"type": msg.DESCRIPTOR.full_name.encode(), b"id": msg.id.encode(), b"data": msg.SerializeToString()}


@st.composite
def bad_entry(draw, pid: str):
    """(fields, words the dead-letter reason must contain)."""
    kind = draw(st.sampled_from(["missing", "unknown_type", "not_utf8", "garbage", "id_differs", "rule", "extra"]))
    good = draw(good_payload(pid))
    fields = raw_fields(good)
    if kind == "missing":
        gone = draw(st.sampled_from([b"type", b"id", b"data"]))
        del fields[gone]
        return fields, ["lacks", gone.decode()]
    if kind == "unknown_type":
        fields[b"type"] = draw(st.text(max_size=300)).encode() or b"?"
        if fields[b"type"].decode() in ("rlhfpb.v1." + n for n in ("PreferencePair", "Ranking", "ScoredSample",
                                                                   "RolloutPrompt", "SFTExample")):
            fields[b"type"] += b"x"
        return fields, ["unknown payload type"]
    if kind == "not_utf8":
        fields[draw(st.sampled_from([b"type", b"id"]))] = b"\xff\xfe" + draw(st.binary(max_size=10))
        return fields, ["UTF-8"]
    if kind == "garbage":
        fields[b"data"] = b"\xff" + draw(st.binary(max_size=200))  # no field number 0x7f..: a bad tag
        return fields, ["invalid payload"]
    if kind == "id_differs":
        fields[b"id"] = (pid + "-other").encode()
        return fields, ["differs"]
    if kind == "rule":
        msg, field = draw(st.sampled_from(rule_breakers(pid)))
        return raw_fields(msg), [field]
    fields[b"type"] = b"rlhfpb.v1.ModelRef"  # a real message, not a payload type
    return fields, ["unknown payload type"]


@st.composite
def batches(draw):
    """A list of (fields, expected): expected is "good", "dup" (a retry of an earlier good
    payload) or the reason's words of a bad entry."""
    out, goods = [], []
    for k in range(draw(st.integers(1, 12))):
        pid = f"p{k}-{draw(st.text(max_size=8))}"
        roll = draw(st.integers(0, 9))
        if roll < 4:
            msg = draw(good_payload(pid))
            goods.append(msg)
            out.append((raw_fields(msg), "good"))
        elif roll == 4 and goods:
            out.append((raw_fields(draw(st.sampled_from(goods))), "dup"))
        else:
            out.append(draw(bad_entry(pid)))
    return out


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def test_producer_refuses_rule_breakers_naming_the_field(r):
    stream = f"{PREFIX}producer:{uuid.uuid4().hex}"
    producer = QueueProducer(r)
    cases = 0
    for msg, field in rule_breakers("an-id"):
        if not msg.id:  # the producer stamps a fresh id on a payload without one
            continue
        with pytest.raises(PayloadError) as err:
            producer.push(msg, stream=stream)
        assert field in str(err.value), (field, str(err.value))
        cases += 1
    assert r.exists(stream) == 0  # nothing was pushed
    FUZZ_REPORT["queues: producer rule breakers"] = {"cases": cases, "outcome": {"PayloadError": cases}}


def test_generated_entries_dead_letter_or_apply_once(r):
    counts = {"examples": 0, "entries": 0, "good": 0, "dup": 0, "dead": 0}

    @FUZZ
    @given(batch=batches())
    def run(batch):
        stream = f"{PREFIX}{uuid.uuid4().hex}"
        try:
            for fields, _ in batch:
                r.xadd(stream, fields)
            consumer = StreamConsumer(r, stream, GROUP, "c1", max_deliveries=3, claim_idle_ms=60_000)
            got = consumer.read(100)  # never raises, whatever the entries hold
            want_good = [f[b"id"].decode() for f, e in batch if e == "good"]
            assert [e.id for e in got] == want_good
            for e, (fields, _) in zip(got, [b for b in batch if b[1] == "good"]):
                assert e.payload.SerializeToString() == fields[b"data"]
            bad = [(f, e) for f, e in batch if isinstance(e, list)]
            dead = r.xrange(dead_letter_stream(stream))
            assert len(dead) == len(bad) == consumer.dead_lettered
            for (_, words), (_, record) in zip(bad, dead):
                reason = record[b"reason"].decode()
                assert all(w in reason for w in words), (words, reason)
                assert record[b"stream"].decode() == stream
            assert consumer.duplicates == sum(e == "dup" for _, e in batch)
            consumer.commit(got)
            assert int(r.xpending(stream, GROUP)["pending"]) == 0  # bad and duplicate entries acked too
            # the consumer stays up: a fresh good entry is read; a retry of an applied one is not
            fresh = samples_pb2.PreferencePair(id="fresh", prompt="q", chosen="a", rejected="b")
            producer = QueueProducer(r)
            producer.push(fresh, stream=stream)
            for f, e in batch:
                if e == "good":
                    r.xadd(stream, f)
            assert [e.id for e in consumer.read(100)] == ["fresh"]
            other = StreamConsumer(r, stream, GROUP, "c2", max_deliveries=3, claim_idle_ms=60_000)
            assert other.read(100) == []
            counts["examples"] += 1
            counts["entries"] += len(batch)
            counts["good"] += len(want_good)
            counts["dup"] += sum(e == "dup" for _, e in batch)
            counts["dead"] += len(bad)
        finally:
            r.delete(stream, dead_letter_stream(stream), applied_key(stream, GROUP))

    run()
    FUZZ_REPORT["queues: generated entries"] = counts
    assert counts["dead"] > 0 and counts["good"] > 0 and counts["dup"] > 0
