"""Redis Sentinel: the primary is SIGKILLed mid-work and nothing acked is lost or applied twice
(issue 18, item 5).

A primary, a replica and three Sentinels (quorum 2, `down-after-milliseconds` 1000) on loopback
(tests/redis_procs.py). Every client is made from ONE URL,
`redis+sentinel://127.0.0.1:S1,127.0.0.1:S2,127.0.0.1:S3/mymaster/0`, through
`rlhf_client.redis_conn`: a `QueueProducer` and a `StreamConsumer` (the trainer's, as jobs use
it) with `min_replicas_ack=1` (each push and each commit `WAIT`s for the replica), an asyncio
client (what the services make), and Celery's broker connection (kombu `sentinel://`).

The consumer "applies" a batch (records its payload ids, like a job's training) and then
commits it; with a batch read and applied but not committed, the primary is SIGKILLed. The
Sentinels promote the replica; the old primary comes back and rejoins as a replica (a commit
that WAITs for one replica waits for that). Afterwards: every payload whose push returned is
applied exactly once (the local log of applications has no duplicate, the group's applied-id
index holds every id, nothing is pending).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
import redis
from redis_procs import RedisProc, SentinelProc, available, wait_replica_synced
from rlhf_client import QueueProducer
from rlhf_client.redis_conn import connect, connect_async
from trainer_helpers import synthetic_messages, unique, wait_for

from rlhf.trainer.queues import StreamConsumer, applied_ids

pytestmark = pytest.mark.skipif(not available(), reason="needs redis-server")

MASTER = "mymaster"
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError,
             redis.BusyLoadingError)


def retry(fn, what: str, timeout: float = 90.0):
    """`fn()` again until it does not raise a connection-level error (what a job's `until_redis`
    does through a failover); AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except RETRYABLE as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: still failing after {timeout:g}s: {exc!r}") from exc
            time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path):
    primary = RedisProc(tmp_path / "primary").start()
    replica = RedisProc(tmp_path / "replica", replicaof=(primary.host, primary.port)).start()
    sentinels = [SentinelProc(tmp_path / f"sentinel{i}", MASTER, primary.port, quorum=2,
                              down_after_ms=1000, failover_timeout_ms=3000) for i in range(3)]
    procs = [primary, replica, *sentinels]
    try:
        for s in sentinels:
            s.start()
        wait_replica_synced(replica)

        def sentinels_see_everything():  # each knows the other two and the replica
            for s in sentinels:
                c = redis.Redis(host=s.host, port=s.port, decode_responses=True, socket_timeout=2)
                try:
                    others = c.execute_command("SENTINEL", "SENTINELS", MASTER)
                    replicas = c.execute_command("SENTINEL", "REPLICAS", MASTER)
                finally:
                    c.close()
                if len(others) < 2 or len(replicas) < 1:
                    return False
            return True

        wait_for(sentinels_see_everything, timeout=60, what="the Sentinels to find each other",
                 interval=0.2)
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) \
            + f"/{MASTER}/0"
        yield dict(primary=primary, replica=replica, sentinels=sentinels, url=url)
    finally:
        for p in reversed(procs):
            p.stop()


def test_sigkill_of_the_primary_loses_no_acked_sample_and_applies_none_twice(cluster):
    url, primary, replica = cluster["url"], cluster["primary"], cluster["replica"]
    stream, group = unique("prefs"), "reward-model"
    r = connect(url)
    assert r.info("server")["tcp_port"] == primary.port  # the Sentinels' primary

    def make_consumer() -> StreamConsumer:  # a job (or a job's retry: same consumer name)
        return retry(lambda: StreamConsumer(r, stream, group, "job-1", max_deliveries=10,
                                            claim_idle_ms=60_000, min_replicas_ack=1,
                                            replicas_ack_timeout_ms=500), "start the consumer")

    producer = QueueProducer(connect(url), min_replicas_ack=1, replicas_ack_timeout_ms=500)
    acked: list[str] = []  # payload ids whose push returned (the producer's acknowledgements)

    def push(messages) -> None:
        for m in messages:  # a push that fails is pushed again, same payload id
            acked.append(retry(lambda m=m: producer.push(m, stream=stream), "push"))

    applied_log: list[str] = []  # every application (a job's training on a payload)
    consumer = make_consumer()

    def consume_batch(n: int = 10):
        nonlocal consumer
        try:
            batch = consumer.read(n)
        except RETRYABLE:
            consumer = make_consumer()  # a failed read: the retry reads its own pending first
            return None
        applied_log.extend(e.id for e in batch)  # applied, then committed (idempotent retry)
        retry(lambda: consumer.commit(batch), "commit")
        return batch

    push(synthetic_messages(60, seed=1, prefix=unique("a")))
    for _ in range(2):
        assert len(consume_batch()) == 10

    # mid-work: a batch read and applied, not yet committed — the primary dies
    inflight = consumer.read(10)
    assert len(inflight) == 10
    applied_log.extend(e.id for e in inflight)
    killed = time.monotonic()
    primary.kill()

    def promoted():
        addrs = {s.master_addr() for s in cluster["sentinels"]}
        return addrs == {("127.0.0.1", replica.port)}

    wait_for(promoted, timeout=60, what="the Sentinels to promote the replica", interval=0.05)
    promoted_s = time.monotonic() - killed
    retry(lambda: r.set("probe", "1"), "write to the new primary")
    writable_s = time.monotonic() - killed

    # the old primary comes back as a replica of the new one (WAIT 1 needs a replica), as its
    # orchestrator would start it; left to convert it themselves, the Sentinels take ~10-15 s
    primary.replicaof = (replica.host, replica.port)
    primary.start()
    old = primary.client(socket_timeout=2)
    wait_for(lambda: old.info("replication")["role"] == "slave",
             timeout=60, what="the old primary to rejoin as a replica", interval=0.1)
    old.close()
    wait_replica_synced(primary)
    retry(lambda: consumer.commit(inflight), "commit the in-flight batch")
    rejoined_s = time.monotonic() - killed

    push(synthetic_messages(20, seed=2, prefix=unique("b")))  # after the failover, same URL
    deadline = time.monotonic() + 60
    while set(applied_log) < set(acked):
        assert time.monotonic() < deadline, "the consumer did not finish the stream"
        consume_batch()

    new = connect(url)
    assert new.info("server")["tcp_port"] == replica.port
    dupes = [i for i, n in Counter(applied_log).items() if n > 1]
    assert not dupes, f"applied twice: {dupes}"
    assert set(applied_log) == set(acked) and len(acked) == 80
    assert applied_ids(new, stream, group) == set(acked)  # the committed index survived
    assert new.xpending(stream, group)["pending"] == 0

    # the services' asyncio clients and Celery's broker follow the same URL to the new primary
    async def async_roundtrip():
        a = connect_async(url, decode_responses=True)
        try:
            await a.set("async-probe", "ok")
            return await a.get("async-probe"), (await a.info("server"))["tcp_port"]
        finally:
            await a.aclose()

    assert asyncio.run(async_roundtrip()) == ("ok", replica.port)

    from celery import Celery

    from rlhf.trainer.celery_app import broker_config

    conf = broker_config(url, 60)
    assert conf["broker_url"].startswith("sentinel://127.0.0.1:")
    app = Celery("sentinel-test", set_as_current=False)
    app.conf.update(conf)
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=3)
        with conn.SimpleQueue("sentinel-probe") as q:
            q.put({"hello": "sentinel"})
            assert q.get(timeout=10).payload == {"hello": "sentinel"}
    assert conn.transport.driver_name == "redis"

    print(f"\nfailover: promoted {promoted_s:.2f}s, writable {writable_s:.2f}s, old primary back "
          f"as replica and in-flight commit done {rejoined_s:.2f}s after SIGKILL; "
          f"pushed+acked {len(acked)}, applied {len(applied_log)} (unique {len(set(applied_log))}), "
          f"duplicates skipped by the index {consumer.duplicates}")
    for c in (r, new, producer.r):
        c.close()
