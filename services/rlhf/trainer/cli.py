"""`rlhf worker`, `rlhf worker-probe`, and the server-side leaves of `rlhf jobs` / `rlhf models`.

    rlhf worker [--pool prefork|solo] [--concurrency N] [--queues Q,...] [--hostname NAME]
    rlhf worker-probe [--ready] [--heartbeat-file PATH]    # the trainer pod's probes (exit 0/1)
    rlhf jobs reap [--grace S] [--dry-run]                 # re-queue jobs whose message was lost
    rlhf models add-token NAME TOKEN [--activate]          # rlhf.models.tokens
    rlhf models import DIR --name NAME [--activate]        # rlhf.models.cli

The rest of `rlhf jobs` and `rlhf models` (list, show, submit, schema, cancel, metrics, activate,
rollback, export) is the client's (`rlhf_client.cli`: the base install); `add_parsers` builds
both groups from there and adds these leaves. Every command takes --redis-url (env
RLHF_REDIS_URL); `models` and `worker` take --store. --json prints JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("rlhf.trainer")

_COMMON = [
    (("--redis-url",), dict(dest="redis_url", help="Redis (queues, registry, jobs, broker)")),
    (("--log-level",), dict(dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])),
]
_WORKER = [
    (("--store",), dict(dest="store_dir", type=Path, help="model store root")),
    (("--device",), dict(dest="device", help="torch device for training")),
    (("--host",), dict(dest="host", help="address the /metrics endpoint binds")),
    (("--metrics-port",), dict(dest="metrics_port", type=int, help="/metrics port (0: any)")),
    (("--pool",), dict(dest="worker_pool", choices=["prefork", "solo"])),
    (("--concurrency",), dict(dest="worker_concurrency", type=int)),
    (("--visibility-timeout",), dict(dest="celery_visibility_timeout_s", type=float,
                                     help="seconds before a dead worker's job is redelivered")),
    (("--soft-shutdown",), dict(dest="worker_soft_shutdown_s", type=float,
                                help="SIGTERM: seconds a running job gets before it is requeued")),
    (("--torch-threads",), dict(dest="torch_threads", type=int, help="torch intra-op threads")),
    (("--heartbeat-file",), dict(dest="worker_heartbeat_file", type=Path,
                                 help="write the heartbeat `rlhf worker-probe` checks here")),
]


def _add(parser: argparse.ArgumentParser, flags) -> None:
    for names, kwargs in flags:
        parser.add_argument(*names, default=None, **kwargs)


def add_parsers(sub) -> None:
    """Add `worker`, `jobs` and `models` to the rlhf CLI's subparsers (imports nothing heavy)."""
    worker = sub.add_parser("worker", help="run the Celery trainer (training jobs)")
    _add(worker, _COMMON + _WORKER)
    worker.add_argument("--queues", default=None,
                        help="comma-separated queues to consume (default: every trainer queue)")
    worker.add_argument("--hostname", default=None, help="Celery node name (default celery@HOST)")

    probe = sub.add_parser("worker-probe", help="check the worker's heartbeat (the trainer pod's "
                           "probes): exit 0 when live (--ready: and consuming), 1 otherwise")
    probe.add_argument("--ready", action="store_true",
                       help="also require the worker to be connected and consuming")
    probe.add_argument("--heartbeat-file", dest="worker_heartbeat_file", type=Path, default=None,
                       help="the worker's heartbeat file (env RLHF_WORKER_HEARTBEAT_FILE)")

    from rlhf_client.cli import add_parsers as add_client_parsers

    add_client_parsers(sub, server_leaves=add_server_leaves)  # jobs, models


def add_server_leaves(group: str, group_sub) -> None:
    """The leaves of `rlhf jobs` / `rlhf models` that run here (rlhf_client.cli.SERVER_LEAVES):
    `jobs reap`, `models add-token`, `models import`."""
    from rlhf_client.cli import SERVER_LEAVES, add_common_flags

    if group == "jobs":
        jr = group_sub.add_parser("reap", help=SERVER_LEAVES["jobs"]["reap"][0])
        add_common_flags(jr)
        jr.add_argument("--grace", type=float, default=None,
                        help="seconds a job's record must be unchanged (default: job_reap_grace_s)")
        jr.add_argument("--dry-run", action="store_true", help="list the orphans, re-queue nothing")
        return
    from rlhf.models.cli import add_import_parser, add_merge_parser
    from rlhf.models.tokens import add_add_token_parser

    add_add_token_parser(group_sub)
    group_sub.choices["add-token"].add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="on failure print the traceback (default: one line naming the cause)")
    add_import_parser(group_sub, add_common_flags)
    add_merge_parser(group_sub, add_common_flags)


# ---------------------------------------------------------------------------------------------
# rlhf worker
# ---------------------------------------------------------------------------------------------


def run_worker(args, settings) -> int:
    # SIGTERM → Celery's cold shutdown with the soft-shutdown wait (the running job gets
    # worker_soft_shutdown_s, then is requeued). billiard reads this when it is first imported.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from rlhf.tracing import setup_worker
    from rlhf.trainer.celery_app import QUEUES, configure

    app = configure(settings)
    setup_worker(settings)  # off unless RLHF_OTEL
    _start_metrics(settings)
    _start_heartbeat(settings)
    _start_reaper(settings)
    _start_stream_trimmer(settings)
    argv = [
        "worker",
        f"--pool={settings.worker_pool}",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={args.queues or ','.join(QUEUES)}",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv.append(f"--hostname={args.hostname}")
    app.worker_main(argv)
    return 0


def _start_heartbeat(settings) -> None:
    """The heartbeat file the pod's probes read (see health.py)."""
    if settings.worker_heartbeat_file is None:
        return
    from rlhf.trainer.health import Heartbeat

    Heartbeat(settings.worker_heartbeat_file, settings.worker_heartbeat_s).start()
    log.info("heartbeat file %s, every %gs", settings.worker_heartbeat_file,
             settings.worker_heartbeat_s)


def _start_reaper(settings) -> None:
    """Temp dirs of attempts that died with an earlier worker go now; then, every
    job_reap_interval_s, those of dead attempts and a reaper pass (see reaper.py)."""
    from rlhf.trainer.workdirs import clean_stale, tmp_root

    root = tmp_root(settings)
    removed = clean_stale(root)
    if removed:
        log.info("removed %d temp dir(s) of dead job attempts under %s", removed, root)
    if settings.job_reap_interval_s <= 0:
        return

    def loop() -> None:
        from rlhf.trainer.jobs import REDIS_ERRORS
        from rlhf.trainer.reaper import reap_once

        while True:
            time.sleep(settings.job_reap_interval_s)
            try:
                clean_stale(root)
            except OSError:
                log.warning("cleaning %s failed", root, exc_info=True)
            try:
                reap_once(settings)
            except REDIS_ERRORS as exc:  # an outage: the next pass tries again
                log.info("reaper pass skipped: Redis unreachable (%s)", exc)
            except Exception:  # noqa: BLE001 - the reaper must not take the worker down
                log.warning("reaper pass failed", exc_info=True)

    threading.Thread(target=loop, name="job-reaper", daemon=True).start()


def _start_stream_trimmer(settings) -> None:
    """At start and every stream_trim_interval_s: trim acked stream entries, dead letters and
    applied-id indexes past their retention (rlhf.trainer.queues.trim_streams)."""
    if settings.stream_trim_interval_s <= 0:
        return
    from rlhf_client.redis_conn import connect

    from rlhf.trainer.queues import Retention, start_trim_loop

    start_trim_loop(connect(settings.redis_url.get_secret_value()),
                    Retention.from_settings(settings), settings.stream_trim_interval_s)


def run_worker_probe(args, settings) -> int:
    """Exit 0 when the worker's heartbeat says live (with --ready: and consuming), else 1."""
    from rlhf.trainer.health import check

    if settings.worker_heartbeat_file is None:
        print("rlhf worker-probe: no heartbeat file (set RLHF_WORKER_HEARTBEAT_FILE or "
              "--heartbeat-file)", file=sys.stderr)
        return 2
    why = check(settings.worker_heartbeat_file, interval_s=settings.worker_heartbeat_s,
                ready=args.ready)
    if why is not None:
        print(f"rlhf worker-probe: {why}")
        return 1
    print("ready" if args.ready else "live")
    return 0


def _start_metrics(settings) -> None:
    """/metrics in the worker's main process, refreshed from Redis every interval.

    Jobs run in pool children, so their gauges would be invisible here: the main process reads
    queue depths from the streams and the running jobs' latest metrics from their records.
    """
    if settings.metrics_port is None:
        return
    from prometheus_client import start_http_server
    from rlhf_client.redis_conn import connect

    server, _ = start_http_server(settings.metrics_port, addr=settings.host)
    log.info("metrics listening on %s:%d", settings.host, server.server_port)
    url = settings.redis_url.get_secret_value()
    r_bytes = connect(url)
    r_text = connect(url, decode_responses=True)

    def loop() -> None:
        while True:
            try:
                refresh_worker_metrics(r_bytes, r_text)
            except Exception:  # noqa: BLE001 - metrics must not take the worker down
                log.debug("metrics refresh failed", exc_info=True)
            time.sleep(settings.queue_metrics_interval_s)

    threading.Thread(target=loop, name="metrics-refresh", daemon=True).start()


def refresh_worker_metrics(r_bytes, r_text) -> None:
    """Queue depths, and the training gauges of the running jobs and of the most recent ones
    (`TRAIN_METRIC_JOBS`, whatever their status: a finished job shows its final metrics), each
    labelled with its job and model; every other job's series are removed."""
    from rlhf_client.training import list_jobs

    from rlhf.serving.metrics import TRAIN_METRIC_JOBS, keep_train_jobs, set_train_metrics
    from rlhf.trainer.queues import refresh_queue_metrics, refresh_redis_memory

    refresh_queue_metrics(r_bytes)
    refresh_redis_memory(r_bytes)
    recs = {rec.id: rec for rec in list_jobs(r_text, limit=TRAIN_METRIC_JOBS)}
    recs.update((rec.id, rec) for rec in list_jobs(r_text, limit=10, status="running"))
    for rec in sorted(recs.values(), key=lambda rec: rec.updated or 0.0):
        set_train_metrics(rec.type, rec.id, rec.spec.get("model_name") or "", rec.metrics)
    keep_train_jobs(recs)


# ---------------------------------------------------------------------------------------------
# rlhf jobs / rlhf models
# ---------------------------------------------------------------------------------------------


def _print(obj: Any, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str) if as_json else text)


def run_reap(args, settings) -> int:
    """`rlhf jobs reap`."""
    from rlhf.trainer.reaper import reap_once

    ids = reap_once(settings, grace_s=args.grace, dry_run=args.dry_run)
    verb = "orphaned" if args.dry_run else "re-queued"
    _print({verb: ids}, getattr(args, "json", False),
           "\n".join(f"{verb} {i}" for i in ids) or f"(no job {verb})")
    return 0


def run_models(args, settings) -> int:
    """`rlhf models add-token` / `rlhf models import`."""
    if args.models_command == "add-token":
        from rlhf.models.tokens import cmd_add_token

        return cmd_add_token(args, settings)
    if args.models_command == "merge":
        from rlhf.models.cli import cmd_merge

        return cmd_merge(args, settings)
    from rlhf.models.cli import cmd_import

    return cmd_import(args, settings)


HANDLERS = {"worker": run_worker, "worker-probe": run_worker_probe, "jobs": run_reap,
            "models": run_models}
