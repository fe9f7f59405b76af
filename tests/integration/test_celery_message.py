"""The job message the base install writes by hand (`rlhf_client.celery_message`) is the message
Celery's own `send_task` writes through kombu's Redis transport: same JSON, ids aside.

Real Redis (database 3); Celery's sender (`rlhf.trainer.celery_app.sender`) writes the reference
message. That a worker runs a message written this way is shown by every worker test: job
submission goes through it (tests/integration/test_jobs_cancel.py, test_worker.py).
"""

from __future__ import annotations

import base64
import json
import random
import string

import pytest
from celery.utils.saferepr import saferepr as celery_saferepr
from rlhf_client import jobspecs
from rlhf_client.celery_message import saferepr, send_task_message
from rlhf_client.redis_conn import connect
from trainer_helpers import delete_matching, unique

from helpers import TEST_REDIS
from rlhf.trainer.celery_app import EXCHANGE, QUEUE_FOR_TASK, TASK_FOR_JOB, sender

URL = f"{TEST_REDIS}/3"
#: What differs between two sends of the same task (fresh per message or per process).
VARYING = {("headers", "origin"), ("properties", "delivery_tag"), ("properties", "reply_to")}


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
        assert body == [spec] and ours["headers"]["argsrepr"] == celerys["headers"]["argsrepr"]
        if headers:
            assert ours["headers"]["traceparent"] == headers["traceparent"]


def test_argsrepr_is_celerys_saferepr_for_json_values():
    """Strings with quotes and newlines, deep nesting (Celery keeps 3 levels), long values (cut
    near the limit with the brackets closed): random JSON values, several limits."""
    rnd = random.Random(15)
    alphabet = string.ascii_letters + " '\"\n\\é"

    def value(depth: int):
        k = rnd.random()
        if depth > 4 or k < 0.4:
            return rnd.choice([None, True, False, rnd.randint(-10**6, 10**6), rnd.random() * 1e3,
                               "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))])
        if k < 0.7:
            return {"".join(rnd.choice("ab' ") for _ in range(rnd.randint(1, 6))): value(depth + 1)
                    for _ in range(rnd.randint(0, 5))}
        return [value(depth + 1) for _ in range(rnd.randint(0, 5))]

    for _ in range(1500):
        v = [value(0)]
        for maxlen in (None, 1, 7, 60, 1024):
            for levels in (0, 1, 3):
                assert saferepr(v, maxlen, levels) == celery_saferepr(v, maxlen, maxlevels=levels)
