"""Fixtures of the fault tests (helpers in chaos_procs.py): an own Redis (append-only, fsync
always) that a test may kill and restart.

The shared Redis on 6379 is never touched here: every test that breaks Redis breaks its own
(tests/redis_procs.py).
"""

from __future__ import annotations

import pytest
import redis
from redis_procs import RedisProc


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server, AOF on with fsync always (what it acknowledged survives a kill)."""
    server = RedisProc(tmp_path / "redis", appendonly=True, appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture
def rclient(own_redis):
    client = redis.Redis(host=own_redis.host, port=own_redis.port)
    yield client
    client.close()
