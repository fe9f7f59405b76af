"""The job message the base install writes by hand (`rlhf_client.celery_message`) is the message
Celery's own `send_task` writes through kombu's Redis transport: same JSON, ids aside (and the
display-only argument reprs, which Celery writes with its own `saferepr`).

Real Redis (database 3); Celery's sender (`rlhf.trainer.celery_app.sender`) writes the reference
message. That a worker runs a message written this way is shown by every worker test: job
submission goes through it (tests/integration/test_jobs_cancel.py, test_worker.py).
"""

from __future__ import annotations

import base64
import json

import pytest
from rlhf_client import jobspecs
from rlhf_client.celery_message import send_task_message, short_repr
from rlhf_client.redis_conn import connect
from trainer_helpers import delete_matching, unique

from helpers import TEST_REDIS
from rlhf.trainer.celery_app import EXCHANGE, QUEUE_FOR_TASK, TASK_FOR_JOB, sender

URL = f"{TEST_REDIS}/3"
#: What differs between two sends of the same task (fresh per message or per process).
VARYING = {("headers", "origin"), ("properties", "delivery_tag"), ("properties", "reply_to"),
           ("headers", "argsrepr"), ("headers", "kwargsrepr")}


@pytest.fixture
def r():
    client = connect(URL)
    queues = set(QUEUE_FOR_TASK.values())
    yield client
    for q in queues:
        client.delete(q)
    delete_matching(client, "_kombu.binding*")
    client.close()


def _pop(r, queue: str) -> dict:
    raw = r.rpop(queue)
    assert raw is not None and r.llen(queue) == 0
    return json.loads(raw)


def _comparable(message: dict) -> dict:
    out = json.loads(json.dumps(message))
    for part, key in VARYING:
        assert out[part].get(key), (part, key)  # present in both, just not equal
        out[part][key] = "..."
    return out


@pytest.mark.parametrize("job_type", sorted(jobspecs.JOB_TYPES))
def test_the_hand_written_message_is_celerys(r, job_type):
    task = TASK_FOR_JOB[job_type]
    queue = QUEUE_FOR_TASK[task]
    spec = jobspecs.parse_spec({**jobspecs.example_spec(job_type),
                                "job_id": unique("job")}).model_dump(mode="json")
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for headers in (None, {"traceparent": traceparent}):
        r.delete(queue)
        sender(URL).send_task(task, args=[spec], task_id=spec["job_id"], headers=headers)
        celerys = _pop(r, queue)
        send_task_message(r, task=task, queue=queue, args=[spec], task_id=spec["job_id"],
                          headers=headers, exchange=EXCHANGE.name)
        ours = _pop(r, queue)
        assert _comparable(ours) == _comparable(celerys)
        assert list(ours) == list(celerys) and list(ours["headers"]) == list(celerys["headers"])
        body, _, _ = json.loads(base64.b64decode(ours["body"]))
        assert body == [spec] and ours["headers"]["argsrepr"] == short_repr([spec], 1024)
        if headers:
            assert ours["headers"]["traceparent"] == headers["traceparent"]


def test_the_argument_repr_is_cut_at_celerys_limit():
    long = ["x" * 5000]
    assert short_repr(long, 1024) == repr(long)[:1021] + "..." and len(short_repr(long, 1024)) == 1024
    assert short_repr([{"a": 1}], 1024) == "[{'a': 1}]"
