"""Celery task events from a real `rlhf worker` (what Flower and `celery events` show).

A real worker on Redis (db 15, the observability tests' own) runs a real reward-model job, while
an event receiver (`app.events.Receiver`, the one Flower uses) listens on the same broker. The
job's task-received, task-started and task-succeeded events must arrive, from that worker, in
that order, as JSON.
"""

from __future__ import annotations

import threading

import pytest
from celery import Celery
from helpers import TEST_REDIS
from job_bench import job_bench
from trainer_helpers import wait_for

REDIS_URL = f"{TEST_REDIS}/15"
TASK = "rlhf.train_reward_model"


class EventLog:
    """Every event a Receiver captures, from its own thread until `stop()`."""

    def __init__(self, redis_url: str):
        self.events: list[dict] = []
        self.app = Celery("event-test", broker=redis_url, set_as_current=False)
        self.app.conf.update(accept_content=["json"], event_serializer="json")
        self._conn = self.app.connection_for_read()
        self.receiver = self.app.events.Receiver(self._conn, handlers={"*": self.events.append})
        self._thread = threading.Thread(target=self._capture, daemon=True, name="event-receiver")
        self.error: BaseException | None = None

    def _capture(self) -> None:
        try:  # wakeup: a broadcast that asks every worker for a heartbeat event
            self.receiver.capture(limit=None, timeout=None, wakeup=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def start(self) -> "EventLog":
        self._thread.start()
        return self

    def of(self, **match) -> list[dict]:
        return [e for e in list(self.events) if match.items() <= e.items()]

    def stop(self) -> None:
        self.receiver.should_stop = True
        self._thread.join(timeout=10)
        self._conn.release()


@pytest.fixture
def bench(tmp_path, tiny_reward_dir):
    with job_bench(tmp_path, tiny_reward_dir, REDIS_URL) as made:
        yield made


def test_a_job_s_task_events_reach_an_event_receiver(bench):
    worker = bench.start("events")
    log = EventLog(REDIS_URL).start()
    try:
        # Subscribed (Redis pub/sub drops what nobody listens to): the worker answered the
        # receiver's wake-up with a heartbeat event.
        wait_for(lambda: log.error or log.of(type="worker-heartbeat", hostname=worker.name),
                 timeout=60, what="the worker's heartbeat event")
        assert log.error is None, log.error
        job_id = bench.submit_small_job(seed=3)
        assert bench.tc.wait(job_id, timeout=180, poll_s=0.2).status == "succeeded"
        succeeded = wait_for(lambda: log.of(type="task-succeeded", uuid=job_id), timeout=30,
                             what="the job's task-succeeded event")
    finally:
        log.stop()
    task_events = [e for e in log.events if e.get("uuid") == job_id and e["type"] != "task-sent"]
    assert [e["type"] for e in task_events] == ["task-received", "task-started", "task-succeeded"]
    assert all(e["hostname"] == worker.name for e in task_events)
    (received,) = log.of(type="task-received", uuid=job_id)
    assert received["name"] == TASK
    assert "'status': 'succeeded'" in succeeded[0]["result"]  # the task's return value (repr)
    assert succeeded[0]["runtime"] > 0
