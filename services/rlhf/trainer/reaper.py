"""The reaper: send again the Celery message of a job that has none left.

A job's message can be lost where no single process sees it (the broker restarted while Celery
was rejecting it, a message deleted by hand, a send that failed after the record was written),
leaving a `queued` or `running` record that nothing will ever run. The reaper finds such jobs
and re-queues them. A job is an orphan when all of these hold, checked twice `confirm_s` apart
(a message moving from its queue to a worker's unacked entry is in neither for an instant):

- its record is `queued` or `running`, and has not changed for `grace_s` (progress writes and
  every status change touch `updated`; a job just submitted or requeued has its message on the
  way);
- nobody holds its lease (a running attempt renews it every third of `job_lease_s`; after an
  outage it retakes it);
- no message for it exists: not in its queue's list (at any priority), not in kombu's `unacked`
  hash (delivered to a live worker, or to a dead one and waiting for the visibility timeout).

The reaper then flips the record to `queued` (a script that checks the record is unchanged and
the lease still free: of several reapers exactly one wins) and sends the job's message again,
task id = job id. That never runs a job twice: a later delivery passes `JobStore.begin` like
any other, so a completed job is `Done` and a job some attempt runs is `Busy`.

`rlhf worker` runs a pass every `job_reap_interval_s` in its main process (with `clean_stale`
for the temp dirs of dead attempts, see workdirs.py); `rlhf jobs reap` runs one pass.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Iterable

import redis
from rlhf_client.training import JOBS_INDEX, job_key, read_job

from rlhf.trainer.jobs import JobStore

log = logging.getLogger(__name__)

ACTIVE_STATUSES = ("queued", "running")
#: kombu's Redis transport: delivered, unacked messages (tag → [message, exchange, routing key]).
UNACKED_KEY = "unacked"
#: kombu's Redis transport keeps priority p > 0 of queue q in the list `q + SEP + p`.
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)

_CLAIM = """
if redis.call('exists', KEYS[2]) == 1 then
  return 0
end
local status = redis.call('hget', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then
  return 0
end
if redis.call('hget', KEYS[1], 'updated') ~= ARGV[1] then
  return 0
end
redis.call('hset', KEYS[1], 'status', 'queued', 'error', ARGV[2], 'updated', ARGV[3])
redis.call('hincrby', KEYS[1], 'reaped', 1)
return 1
"""

Sender = Callable[[str, dict, str], object]  # (job type, spec, job id)


def queue_keys(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]


def _task_id(raw) -> str | None:
    try:
        msg = json.loads(raw)
    except (TypeError, ValueError):
        return None
    if isinstance(msg, list) and msg:  # an unacked entry: [message, exchange, routing key]
        msg = msg[0]
    if not isinstance(msg, dict):
        return None
    headers = msg.get("headers") or {}
    properties = msg.get("properties") or {}
    return headers.get("id") or properties.get("correlation_id")


def broker_task_ids(client: redis.Redis, queues: Iterable[str]) -> set[str]:
    """The task ids of every message in `queues` (any priority) or in the unacked hash."""
    ids: set[str] = set()
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.lrange(key, 0, -1)
    for rows in pipe.execute():
        ids.update(filter(None, map(_task_id, rows)))
    for _, raw in client.hscan_iter(UNACKED_KEY, count=500):
        task_id = _task_id(raw)
        if task_id:
            ids.add(task_id)
    return ids


def _stale_unleased(client: redis.Redis, grace_s: float) -> dict[str, str]:
    """{job id: its `updated`} of queued/running jobs unchanged for `grace_s`, with no lease."""
    now = time.time()
    out: dict[str, str] = {}
    ids = client.zrange(JOBS_INDEX, 0, -1)
    for i in range(0, len(ids), 500):
        chunk = [j.decode() if isinstance(j, bytes) else j for j in ids[i:i + 500]]
        pipe = client.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hmget(job_key(job_id), "status", "updated")
            pipe.exists(JobStore.lease_key(job_id))
        res = pipe.execute()
        for job_id, (status, updated), leased in zip(chunk, res[::2], res[1::2]):
            status = status.decode() if isinstance(status, bytes) else status
            updated = updated.decode() if isinstance(updated, bytes) else updated
            if status not in ACTIVE_STATUSES or leased or not updated:
                continue
            try:
                if now - float(updated) < grace_s:
                    continue
            except ValueError:
                pass
            out[job_id] = updated
    return out


def find_orphans(client: redis.Redis, queues: Iterable[str], *, grace_s: float) -> dict[str, str]:
    """One look: {job id: `updated`} of the jobs that are orphans right now."""
    queues = list(queues)
    candidates = _stale_unleased(client, grace_s)
    if not candidates:
        return {}
    present = broker_task_ids(client, queues)
    return {j: u for j, u in candidates.items() if j not in present}


def reap(client: redis.Redis, send: Sender, queues: Iterable[str], *, grace_s: float,
         confirm_s: float = 1.0, dry_run: bool = False) -> list[str]:
    """Re-queue every orphan job (see the module docstring); returns their ids.

    `client` decodes responses. `send(job_type, spec, job_id)` sends a job's message.
    """
    queues = list(queues)
    first = find_orphans(client, queues, grace_s=grace_s)
    if not first:
        return []
    time.sleep(confirm_s)
    second = find_orphans(client, queues, grace_s=grace_s)
    orphans = {j: u for j, u in second.items() if first.get(j) == u}
    if dry_run:
        return sorted(orphans)
    claim = client.register_script(_CLAIM)
    reaped = []
    for job_id, updated in sorted(orphans.items()):
        rec = read_job(client, job_id)
        if rec is None or not rec.spec:
            continue
        note = (f"re-queued by the reaper: {rec.status} at attempt {rec.attempts}, no lease and "
                f"no Celery message left")
        if not claim(keys=[job_key(job_id), JobStore.lease_key(job_id)],
                     args=[updated, note, f"{time.time():.6f}"]):
            continue  # it moved meanwhile, or another reaper won
        try:
            send(rec.type, rec.spec, job_id)
        except Exception:  # noqa: BLE001 - the record is `queued` and fresh: a later pass sends it
            log.exception("job %s: could not re-send its message", job_id)
            continue
        log.warning("job %s: %s; its message was sent again", job_id, note)
        reaped.append(job_id)
    return reaped


def celery_sender(redis_url: str) -> Sender:
    """Send a job's message the way `submit_job` does (task id = job id)."""
    from rlhf.trainer.celery_app import send_job

    return functools.partial(send_job, redis_url)


def reap_once(settings, *, grace_s: float | None = None, dry_run: bool = False,
              confirm_s: float = 1.0) -> list[str]:
    """One reaper pass with `settings` (what `rlhf jobs reap` and the worker's loop run)."""
    from rlhf_client.redis_conn import connect

    from rlhf.trainer.celery_app import QUEUES

    url = settings.redis_url.get_secret_value()
    client = connect(url, decode_responses=True)
    try:
        return reap(client, celery_sender(url), QUEUES,
                    grace_s=settings.job_reap_grace_s if grace_s is None else grace_s,
                    confirm_s=confirm_s, dry_run=dry_run)
    finally:
        client.close()
