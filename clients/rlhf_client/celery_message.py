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
import numbers
import os
import socket
import uuid
from collections import deque, namedtuple
from itertools import chain
from typing import Any

import redis

__all__ = ["send_task_message", "task_message", "saferepr"]

#: Celery's limits on the reprs of a task's arguments in its headers (`argsrepr_maxsize`,
#: `kwargsrepr_maxsize`, `task_repr_maxlevels` defaults).
ARGSREPR_MAXSIZE = 1024
KWARGSREPR_MAXSIZE = 1024
REPR_MAXLEVELS = 3

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
        "argsrepr": saferepr(args, ARGSREPR_MAXSIZE, REPR_MAXLEVELS),
        "kwargsrepr": saferepr(kwargs, KWARGSREPR_MAXSIZE, REPR_MAXLEVELS),
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


# ------------------------------------------------------------------------------------------------
# Celery's `saferepr` (celery/utils/saferepr.py) for JSON values: the argsrepr / kwargsrepr headers
# ------------------------------------------------------------------------------------------------

_Literal = namedtuple("_Literal", ("value", "truncate", "direction"))
_Key = namedtuple("_Key", ("value",))
_Quoted = namedtuple("_Quoted", ("value",))
_Dirty = namedtuple("_Dirty", ("objid",))

_DICT_START = _Literal("{", False, +1)
_DICT_KVSEP = _Literal(": ", True, 0)
_DICT_END = _Literal("}", False, -1)
_LIST_START = _Literal("[", False, +1)
_LIST_END = _Literal("]", False, -1)
_LIST_SEP = _Literal(", ", True, 0)
_TUPLE_START = _Literal("(", False, +1)
_TUPLE_END = _Literal(")", False, -1)
_TUPLE_END_SV = _Literal(",)", False, -1)


def saferepr(o: Any, maxlen: int | None = None, maxlevels: int = 3) -> str:
    """`repr` as Celery writes it into a task's headers: strings quoted without escapes, at
    most `maxlevels` levels of containers (deeper ones `{...}` / `[...]`), cut near `maxlen`
    characters with `...` and the open brackets closed. For the values JSON holds (dicts,
    lists, tuples, strings, numbers, booleans, None) it equals Celery's own."""
    return "".join(_saferepr(o, maxlen, maxlevels))


def _truncate(s: str, maxlen: int | None) -> str:
    if maxlen and len(s) >= maxlen:
        return s[:maxlen].rsplit(" ", 1)[0] + "..."
    return s


def _chaindict(mapping):
    size = len(mapping)
    for i, (k, v) in enumerate(mapping.items()):
        yield _Key(k)
        yield _DICT_KVSEP
        yield v
        if i < size - 1:
            yield _LIST_SEP


def _chainlist(items):
    size = len(items)
    for i, v in enumerate(items):
        yield v
        if i < size - 1:
            yield _LIST_SEP


def _saferepr(o, maxlen, maxlevels):
    stack = deque([iter([o])])
    for token, it in _reprstream(stack, maxlevels):
        if maxlen is not None and maxlen <= 0:
            if isinstance(token, _Literal) and token.direction < 0:
                yield token.value
                continue
            yield ", ..."
            stack.append(chain([token], it))
            break
        if isinstance(token, _Literal):
            val = token.value
        elif isinstance(token, _Key):
            val = saferepr(token.value, maxlen, maxlevels)
        elif isinstance(token, _Quoted):
            val = "'{}'".format(_truncate(token.value, maxlen).replace("'", "\\'"))
        else:
            val = _truncate(token, maxlen)
        yield val
        if maxlen is not None:
            maxlen -= len(val)
    depth = 0
    for rest1 in stack:  # close what is open
        for rest2 in rest1:
            if isinstance(rest2, _Literal) and not rest2.truncate:
                depth += rest2.direction
                if depth < 0:
                    depth = 0
                    yield rest2.value


def _reprstream(stack: deque, maxlevels: int):
    seen: set[int] = set()
    level = 0
    while stack:
        it = stack.popleft()
        for val in it:
            orig = val
            if isinstance(val, _Dirty):
                seen.discard(val.objid)
                continue
            if isinstance(val, _Literal):
                level += val.direction
                yield val, it
            elif isinstance(val, _Key):
                yield val, it
            elif isinstance(val, numbers.Number):
                yield str(val), it
            elif isinstance(val, str):
                yield _Quoted(val), it
            else:
                if isinstance(val, tuple):
                    start = _TUPLE_START
                    end = _TUPLE_END_SV if len(val) == 1 else _TUPLE_END
                    val = _chainlist(val)
                elif isinstance(val, dict):
                    start, end, val = _DICT_START, _DICT_END, _chaindict(val)
                elif isinstance(val, list):
                    start, end, val = _LIST_START, _LIST_END, _chainlist(val)
                else:
                    yield repr(val), it
                    continue
                if maxlevels and level >= maxlevels:
                    yield _Literal(f"{start.value}...{end.value}", False, 0), it
                    continue
                objid = id(orig)
                if objid in seen:
                    yield f"<Recursion on {type(orig).__name__} with id={objid}>", it
                    continue
                seen.add(objid)
                stack.append(chain([start], val, [_Dirty(objid), end], it))
                break
