"""Redis with a password and TLS, end to end (issue 18, item 4-redis).

Each test runs its own `redis-server` (tests/redis_procs.py): one with `requirepass` on a plain
port, one TLS-only (no plaintext port at all) with a password and a throwaway CA made here. Over
the TLS one a real `rlhf worker` (Celery broker over `rediss://`, certificate verified) runs a
tiny reward-model job that a `QueueProducer` fed and a `TrainingClient` submitted; the
registry's event reaches a `RegistryFollower` (pub/sub over TLS) and `ModelsClient` reads the
active version. The password never appears in a log line or an error message.
"""

from __future__ import annotations

import asyncio
import types

import pytest
import redis
from redis_procs import RedisProc, available, make_certs
from rlhf_client import ModelsClient, QueueProducer, TrainingClient
from rlhf_client.redis_conn import check_url, connect, redact_url
from trainer_helpers import FAST_WORKER_ENV, Worker, synthetic_messages, unique, until

pytestmark = pytest.mark.skipif(not available(), reason="needs redis-server")

PASSWORD = "s3cret-Pw+/x"  # characters that must be quoted in a URL
TRAIN = dict(learning_rate=1e-3, batch_size=8, max_length=64)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("redis-certs"))


@pytest.fixture(scope="module")
def auth_redis(tmp_path_factory):
    server = RedisProc(tmp_path_factory.mktemp("redis-auth"), requirepass=PASSWORD).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory, certs):
    server = RedisProc(tmp_path_factory.mktemp("redis-tls"), requirepass=PASSWORD, tls=certs,
                       tls_only=True).start()
    yield server
    server.stop()


def cli_line(capsys, *argv: str) -> tuple[int, str]:
    """`rlhf ARGV` in this process: (exit code, stderr), stderr asserted to be one line."""
    from rlhf.cli import main

    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return code, lines[0]


def test_a_wrong_or_missing_password_is_one_line_without_the_secret(auth_redis, capsys):
    port = auth_redis.port
    wrong = f"redis://:not-{PASSWORD.replace('/', '%2F').replace('+', '%2B')}@127.0.0.1:{port}/0"
    code, line = cli_line(capsys, "jobs", "list", "--redis-url", wrong)
    assert code == 1
    assert line.startswith(f"rlhf jobs list: Redis at redis://***@127.0.0.1:{port}/0 refused the "
                           "credentials"), line
    assert "not-" not in line and PASSWORD not in line

    missing = f"redis://127.0.0.1:{port}/0"
    code, line = cli_line(capsys, "models", "list", "--redis-url", missing)
    assert code == 1
    assert line.startswith(f"rlhf models list: Redis at {missing} refused the credentials"), line
    assert "Authentication required" in line and "(set --redis-url / RLHF_REDIS_URL)" in line

    # with the right one the same command works
    from rlhf.cli import main

    assert main(["jobs", "list", "--redis-url", auth_redis.url]) == 0
    assert PASSWORD not in capsys.readouterr().err


def test_tls_refuses_an_unknown_ca_and_plaintext(tls_redis, tmp_path, capsys):
    other = make_certs(tmp_path / "other-ca")
    url = tls_redis.tls_url.replace(str(tls_redis.tls.ca), str(other.ca))
    code, line = cli_line(capsys, "jobs", "list", "--redis-url", url)
    assert code == 1 and "certificate verify failed" in line, line
    assert "***@127.0.0.1" in line and PASSWORD not in line

    # the TLS-only server has no plaintext port: redis:// to its port is not answered
    plain = f"redis://:x@127.0.0.1:{tls_redis.tls_port}/0"
    code, line = cli_line(capsys, "jobs", "list", "--redis-url", plain)
    assert code == 1 and line.startswith("rlhf jobs list: Redis at redis://***@"), line

    # a URL option that cannot work is refused before any connection, naming the parameter
    code, line = cli_line(capsys, "jobs", "list", "--redis-url",
                          f"redis://:{PASSWORD[:3]}@127.0.0.1:1/0?ssl_cert_reqs=required")
    assert code == 2 and "ssl_cert_reqs needs TLS: write rediss://" in line, line
    code, line = cli_line(capsys, "jobs", "list", "--redis-url",
                          "rediss://127.0.0.1:1/0?ssl_ca_certs=/nonexistent/ca.pem")
    assert code == 2 and "ssl_ca_certs: no file '/nonexistent/ca.pem'" in line, line


def test_url_forms_and_redaction(certs):
    ok = [
        "redis://:pw@127.0.0.1:6379/0",
        "unix:///run/redis.sock?db=2",
        f"rediss://u:pw@h:6380/1?ssl_ca_certs={certs.ca}&ssl_cert_reqs=required"
        f"&ssl_certfile={certs.client_cert}&ssl_keyfile={certs.client_key}&ssl_check_hostname=false",
        "redis+sentinel://:pw@h1:26379,h2:26380,h3:26381/mymaster/4?sentinel_password=spw",
        f"rediss+sentinel://h1:26379/m?ssl_ca_certs={certs.ca}",
    ]
    for url in ok:
        assert check_url(url) == url
    for bad, why in [
        ("redis://h:1/0?socket_timeout=1", "unknown query parameter 'socket_timeout'"),
        ("rediss://h:1/0?ssl_cert_reqs=sometimes", "ssl_cert_reqs must be one of"),
        ("redis+sentinel://h1:26379", "the path must be /MASTER_NAME"),
        ("redis+sentinel://h1/mymaster", "sentinel 'h1' is not HOST:PORT"),
        ("http://h:1/0", "not a Redis URL"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_url(bad)
    assert redact_url("rediss://u:pw@h:1/0?ssl_cert_reqs=none") == "rediss://u:***@h:1/0?ssl_cert_reqs=none"
    with pytest.raises(ValueError, match="unknown query parameter 'password'") as refused:
        check_url("redis://h:1/0?password=hunter2")
    assert "hunter2" not in str(refused.value)
    assert redact_url("redis+sentinel://:pw@a:1,b:2/m/0?sentinel_password=spw") == \
        "redis+sentinel://***@a:1,b:2/m/0?sentinel_password=***"


def test_celery_broker_options_follow_the_url(certs):
    import ssl

    from rlhf.trainer.celery_app import broker_config

    tls = broker_config(f"rediss://:pw@h:6380/3?ssl_ca_certs={certs.ca}&ssl_cert_reqs=required", 60)
    assert tls["broker_url"] == "rediss://:pw@h:6380/3"  # kombu reads no query: options below
    assert tls["broker_use_ssl"] == {"ssl_ca_certs": str(certs.ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert tls["broker_transport_options"]["visibility_timeout"] == 60
    sent = broker_config("redis+sentinel://:p%40w@h1:26379,h2:26380/mymaster/2?sentinel_password=s")
    assert sent["broker_url"] == "sentinel://:p%40w@h1:26379/2;sentinel://:p%40w@h2:26380/2"
    assert sent["broker_transport_options"] == {"master_name": "mymaster",
                                                "sentinel_kwargs": {"password": "s"}}
    assert "broker_use_ssl" not in sent


class RecordingSwapper:
    """The follower's swap target without a model: records the versions it is told to load
    (the Redis side — pub/sub and registry reads over TLS — is what is under test)."""

    def __init__(self):
        self.target = types.SimpleNamespace(info=types.SimpleNamespace(
            ref=types.SimpleNamespace(version="none")))
        self.loaded: list[str] = []

    async def load_version(self, version: str, *, event_time: float | None = None):
        self.loaded.append(version)
        self.target.info.ref.version = version
        return types.SimpleNamespace(current=types.SimpleNamespace(version=version), seconds=0.0)


@pytest.fixture
def tls_worker(tls_redis, tmp_path):
    """`rlhf worker` on the TLS URL (its Celery broker connection over TLS)."""
    worker = Worker(tmp_path / "worker.log", redis_url=tls_redis.tls_url, store=tmp_path / "store",
                    name="tls@test", env=FAST_WORKER_ENV)
    yield worker
    worker.stop()


async def test_a_worker_job_over_tls_with_a_password(tls_redis, tls_worker, tiny_reward_dir):
    from rlhf.serving.follow import RegistryFollower
    from rlhf.trainer.queues import applied_ids

    url = tls_redis.tls_url
    assert url.startswith("rediss://") and "ssl_cert_reqs=required" in url
    model, stream = unique("rm"), unique("prefs")

    swapper = RecordingSwapper()
    follower = RegistryFollower(swapper, url, model, poll_s=3600)  # events only, no polling
    follower.start()
    worker = tls_worker
    tc = TrainingClient(url)
    try:
        producer = QueueProducer.from_url(url)
        pushed = producer.push_many(synthetic_messages(24, seed=3, prefix=unique("p")),
                                    stream=stream)
        job_id = tc.submit_reward_model(model_name=model, base_dir=str(tiny_reward_dir),
                                        source={"type": "stream", "stream": stream},
                                        activate=True, **TRAIN)
        await asyncio.to_thread(worker.wait_ready, 180)
        rec = await asyncio.to_thread(tc.wait, job_id, timeout=240, poll_s=0.2)
        assert (rec.status, rec.version, rec.worker) == ("succeeded", "v0001", "tls@test")

        # the follower heard the activation over TLS; ModelsClient reads it
        await until(lambda: swapper.loaded == ["v0001"], timeout=60,
                    what="the follower to load v0001")
        mc = ModelsClient.from_url(url)
        assert mc.active(model) == "v0001"
        # every pushed pair applied once, and the worker connected only through TLS
        r = connect(url)
        assert applied_ids(r, stream, "reward-model") == set(pushed)
        assert r.connection_pool.connection_class.__name__ == "SSLConnection"
        r.close()
        mc.r.close()
        producer.close()
    finally:
        worker.stop()  # before reading its log (the fixture's stop is then a no-op)
        await follower.stop()
        tc.close()
    log = worker.log()
    assert "ready." in log and "insecure" not in log  # kombu verified the certificate
    assert PASSWORD not in log  # settings are logged redacted; URLs through redact_url
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=tls_redis.tls_port, ssl=True,
                    ssl_ca_certs=str(tls_redis.tls.ca), password="wrong").ping()
