"""Queue throughput on Redis Streams: entries/s pushed and consumed, next to redis-benchmark.

    python bench/queues.py [--entries 20000] [--redis-url redis://127.0.0.1:6379/11]

Measured side by side in one run, against the same Redis, with the same entry size:
  push            QueueProducer.push_pair: validate, serialise, one XADD round trip per entry
  push_many       QueueProducer.push_many: 500 entries per pipelined round trip
  consume         StreamConsumer.read(256) (XREADGROUP, parse, validate, applied-id check)
                  + commit (SADD applied ids + XACK, one transaction) per batch
  redis-benchmark the same XADD (same field sizes) from redis-benchmark on one connection:
                  unpipelined (the limit for `push`) and 500 per pipeline (the limit for
                  `push_many`); its own C client, no Python, no protobuf.
Reported: entries/s for each, and ours / redis-benchmark. Every key it makes is deleted.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import uuid

import redis



def messages(n: int, tag: str):
    from rlhfpb.v1 import samples_pb2

    from rlhf.trainer.data import synthetic_pairs

    return [samples_pb2.PreferencePair(id=p.source_id, prompt=p.prompt, chosen=p.chosen,
                                       rejected=p.rejected, source="bench")
            for p in synthetic_pairs(n, seed=0, prefix=tag)]


def redis_benchmark(url: str, n: int, pipeline: int, key: str, data_len: int) -> float:
    """requests/s of `XADD key * type .. id .. data <data_len bytes>` from redis-benchmark."""
    c = redis.Redis.from_url(url).connection_pool.connection_kwargs
    cmd = ["redis-benchmark", "-h", c.get("host", "127.0.0.1"), "-p", str(c.get("port", 6379)),
           "--dbnum", str(c.get("db", 0)), "-c", "1", "-n", str(n), "-P", str(pipeline), "-q",
           "XADD", key, "*", "type", "rlhfpb.v1.PreferencePair", "id", "x" * 36,
           "data", "d" * data_len]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.findall(r"([\d.]+) requests per second", out)
    if not m:
        raise RuntimeError(f"unexpected redis-benchmark output: {out!r}")
    return float(m[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=20000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/11")
    args = ap.parse_args()

    from rlhf_client.queues import QueueProducer

    from rlhf.trainer.data import check_preference_payload
    from rlhf.trainer.queues import StreamConsumer

    r = redis.Redis.from_url(args.redis_url)
    tag = f"bench-{uuid.uuid4().hex[:8]}"
    s1, s2, bench_key = f"{tag}:single", f"{tag}:many", f"{tag}:redis-benchmark"
    n = args.entries
    msgs = messages(n, tag)
    data_len = sum(len(m.SerializeToString()) for m in msgs) // n
    rows = []
    try:
        producer = QueueProducer(r)
        single = msgs[: n // 4]  # one round trip each: a quarter is plenty to time
        t = time.perf_counter()
        for m in single:
            producer.push_pair(m, stream=s1)
        push = len(single) / (time.perf_counter() - t)

        t = time.perf_counter()
        producer.push_many(msgs, stream=s2, chunk=500)
        push_many = n / (time.perf_counter() - t)

        consumer = StreamConsumer(r, s2, "bench", "c1", max_deliveries=5, claim_idle_ms=60_000,
                                  validate=check_preference_payload)
        t = time.perf_counter()
        done = 0
        while True:
            batch = consumer.read(256)
            if not batch:
                break
            consumer.commit(batch)
            done += len(batch)
        consume = done / (time.perf_counter() - t)
        assert done == n, (done, n)

        rb_single = redis_benchmark(args.redis_url, max(2000, n // 4), 1, bench_key, data_len)
        rb_many = redis_benchmark(args.redis_url, n * 5, 500, bench_key, data_len)
        rows = [
            ("push (one XADD per entry)", push, rb_single),
            ("push_many (500 per pipeline)", push_many, rb_many),
            ("consume (read 256 + commit)", consume, rb_many),
        ]
    finally:
        for key in r.scan_iter(match=f"{tag}*"):
            r.delete(key)
    print(f"entries: {n}, payload {data_len} bytes (serialised PreferencePair), Redis {args.redis_url}")
    print("| path | ours entries/s | redis-benchmark XADD/s | ours / redis-benchmark |")
    print("|---|---|---|---|")
    for name, ours, limit in rows:
        print(f"| {name} | {ours:,.0f} | {limit:,.0f} | {ours / limit:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
