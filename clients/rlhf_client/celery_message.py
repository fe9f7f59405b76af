"""A Celery task message written without Celery: how the base install queues a training job.

`send_task_message` LPUSHes onto the queue's Redis list exactly what Celery's `send_task` writes
through kombu's Redis transport (protocol 2; celery/app/amqp.py `as_task_v2`, kombu's virtual
channel `prepare_message` / `_inplace_augment_message` and the Redis `_put`):

    {"body": base64(JSON [args, kwargs, {"callbacks", "errbacks", "chain", "chord"}]),
     "content-encoding": "utf-8", "content-type": "application/json",
     "headers": {"lang": "py", "task", "id", "root_id", "argsrepr", "kwargsrepr", "origin", ...},
     "properties": {"correlation_id": id, "reply_to", "delivery_mode": 2,
                    "delivery_info": {"exchange", "routing_key"}, "priority": 0,
                    "body_encoding": "base64", "delivery_tag": uuid}}

A worker consuming the queue cannot tell it from one Celery sent (a test compares the two, and a
real worker runs a job sent this way). JSON only, as the trainer accepts nothing else. Priority
0 is the queue's own list (kombu keeps priority p > 0 in `queue + "\\x06\\x16" + p`).

Not done here, as Celery's own sender would: declaring the queue's binding (every worker declares
its queues on start, and the message goes straight to the queue's list) and the `task-sent`
event (the worker's `task-received` onwards are sent as usual).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from typing import Any

import redis

__all__ = ["send_task_message", "task_message", "short_repr"]

#: Celery's limits on the reprs of a task's arguments in its headers (`argsrepr_maxsize`,
#: `kwargsrepr_maxsize` defaults).
ARGSREPR_MAXSIZE = 1024
KWARGSREPR_MAXSIZE = 1024

#: This process's reply-to address (Celery's sender puts its app's oid there; nothing answers
#: it: the trainer keeps no results).
_REPLY_TO = str(uuid.uuid4())


def _origin() -> str:
    """Celery's `anon_nodename()`: the sending process, `gen<pid>@<host>`."""
    return f"gen{os.getpid()}@{socket.gethostname()}"


def task_message(*, task: str, args: list | tuple, task_id: str, exchange: str, routing_key: str,
                 kwargs: dict[str, Any] | None = None,
                 headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """The message (a dict, ready for `json.dumps`) that Celery's `send_task(task, args, kwargs,
    task_id=task_id)` puts on a Redis queue; `headers` are extra message headers (e.g.
    `traceparent`), added after Celery's own as `send_task(headers=...)` does."""
    args = list(args)
    kwargs = dict(kwargs or {})
    body = json.dumps([args, kwargs, {"callbacks": None, "errbacks": None, "chain": None,
                                      "chord": None}])
    message_headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": short_repr(args, ARGSREPR_MAXSIZE),
        "kwargsrepr": short_repr(kwargs, KWARGSREPR_MAXSIZE),
        "origin": _origin(),
        "ignore_result": None,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
        **(headers or {}),
    }
    return {
        "body": base64.b64encode(body.encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": message_headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": _REPLY_TO,
            "delivery_mode": 2,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def send_task_message(r: redis.Redis, *, task: str, queue: str, args: list | tuple, task_id: str,
                      headers: dict[str, Any] | None = None, exchange: str = "rlhf.train",
                      kwargs: dict[str, Any] | None = None) -> None:
    """Queue Celery task `task` with `args` (JSON values) on `queue` of the broker `r` (a Redis
    client of the broker's database), task id `task_id`: one LPUSH of `task_message`. The
    exchange and routing key recorded in the message (where a rejected message is requeued) are
    `exchange` (the trainer's direct exchange) and the queue's own name."""
    message = task_message(task=task, args=args, kwargs=kwargs, task_id=task_id,
                           exchange=exchange, routing_key=queue, headers=headers)
    r.lpush(queue, json.dumps(message))


def short_repr(o: Any, maxlen: int) -> str:
    """The `argsrepr` / `kwargsrepr` header: what Flower and `celery events` show of the
    arguments (display only; the worker reads the body). `repr`, cut at `maxlen` characters."""
    text = repr(o)
    return text if len(text) <= maxlen else text[: maxlen - 3] + "..."
