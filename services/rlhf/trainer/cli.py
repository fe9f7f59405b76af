"""`rlhf worker`, `rlhf worker-probe`, `rlhf jobs`, `rlhf models`: the trainer's commands.

    rlhf worker [--pool prefork|solo] [--concurrency N] [--queues Q,...] [--hostname NAME]
    rlhf worker-probe [--ready] [--heartbeat-file PATH]    # the trainer pod's probes (exit 0/1)
    rlhf jobs [list] [--limit N] [--status S] | jobs show ID | jobs submit SPEC.json [--wait]
    rlhf jobs reap [--grace S] [--dry-run]                 # re-queue jobs whose message was lost
    rlhf models list | models show NAME [VERSION] | models activate NAME VERSION | models rollback NAME

Every command takes --redis-url (env RLHF_REDIS_URL); `models` and `worker` take --store.
Output is text; --json prints JSON instead.
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

    jobs = sub.add_parser("jobs", help="training jobs: list (default), show, submit")
    jobs.set_defaults(jobs_command="list", limit=20, status=None, json=False)
    jobs_sub = jobs.add_subparsers(dest="jobs_command")
    jl = _leaf(jobs_sub, "list", "newest jobs first")
    jl.add_argument("--limit", type=int, default=20)
    jl.add_argument("--status", choices=["queued", "running", "succeeded", "failed"])
    store = [(("--store",), dict(dest="store_dir", type=Path, help="model store root"))]
    js = _leaf(jobs_sub, "show", "one job's record", store)
    js.add_argument("job_id")
    js.add_argument("--plot", type=Path, default=None, metavar="PNG",
                    help="a PPO job: draw its per-step curves (training_curves.json in the "
                    "version it published) into this PNG")
    jsub = _leaf(jobs_sub, "submit", "validate and queue a job spec (JSON file, - for stdin)")
    jsub.add_argument("spec", help='JSON job spec with a "type" (reward_model, dpo, ppo, sft, '
                      'iterate: a loop, see `rlhf loop`)')
    jsub.add_argument("--wait", action="store_true", help="wait until it finishes")
    jsub.add_argument("--timeout", type=float, default=24 * 3600.0)
    jr = _leaf(jobs_sub, "reap", "re-queue queued/running jobs whose lease expired and whose "
               "Celery message is gone")
    jr.add_argument("--grace", type=float, default=None,
                    help="seconds a job's record must be unchanged (default: job_reap_grace_s)")
    jr.add_argument("--dry-run", action="store_true", help="list the orphans, re-queue nothing")

    models = sub.add_parser("models", help="model versions: list, show, activate, rollback, "
                            "add-token")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    _leaf(models_sub, "list", "every model with its active version", store)
    ms = _leaf(models_sub, "show", "a model's versions, or one version's manifest", store)
    ms.add_argument("name")
    ms.add_argument("version", nargs="?")
    ma = _leaf(models_sub, "activate", "make a version the active one", store)
    ma.add_argument("name")
    ma.add_argument("version")
    mr = _leaf(models_sub, "rollback", "re-activate the previously active version", store)
    mr.add_argument("name")
    from rlhf.models.tokens import add_add_token_parser

    add_add_token_parser(models_sub)


def _leaf(sub, name: str, help_: str, extra=()) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_)
    _add(p, _COMMON + list(extra))
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


# ---------------------------------------------------------------------------------------------
# rlhf worker
# ---------------------------------------------------------------------------------------------


def run_worker(args, settings) -> int:
    # SIGTERM → Celery's cold shutdown with the soft-shutdown wait (the running job gets
    # worker_soft_shutdown_s, then is requeued). billiard reads this when it is first imported.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from rlhf.trainer.celery_app import QUEUES, configure

    app = configure(settings)
    _start_metrics(settings)
    _start_heartbeat(settings)
    _start_reaper(settings)
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
    from rlhf_client.training import list_jobs

    from rlhf.serving.metrics import TRAIN_METRIC
    from rlhf.trainer.queues import refresh_queue_metrics

    refresh_queue_metrics(r_bytes)
    for rec in list_jobs(r_text, limit=10, status="running"):
        for key, value in rec.metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                TRAIN_METRIC.labels(rec.type, key).set(value)


# ---------------------------------------------------------------------------------------------
# rlhf jobs / rlhf models
# ---------------------------------------------------------------------------------------------


def _print(obj: Any, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str) if as_json else text)


def run_jobs(args, settings) -> int:
    from rlhf_client.training import JobFailed, TrainingClient

    from rlhf.trainer.jobs import JobRejected

    tc = TrainingClient(settings.redis_url.get_secret_value())
    try:
        if args.jobs_command == "list":
            recs = tc.jobs(limit=args.limit, status=args.status)
            rows = [f"{r.id:34s} {r.type:14s} {r.status:10s} {r.progress:5.0%} "
                    f"{r.version or '-':8s} {r.error or ''}" for r in recs]
            _print([r.to_dict() for r in recs], args.json, "\n".join(rows) or "(no jobs)")
            return 0
        if args.jobs_command == "show":
            rec = tc.status(args.job_id)
            _print(rec.to_dict(), True, "")
            if getattr(args, "plot", None) is not None:
                return _plot_job(rec, args.plot, settings)
            return 0
        if args.jobs_command == "reap":
            from rlhf.trainer.reaper import reap_once

            ids = reap_once(settings, grace_s=args.grace, dry_run=args.dry_run)
            verb = "orphaned" if args.dry_run else "re-queued"
            _print({verb: ids}, args.json, "\n".join(f"{verb} {i}" for i in ids) or
                   f"(no job {verb})")
            return 0
        # submit
        text = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text()
        try:
            job_id = tc.submit(json.loads(text))
        except (JobRejected, json.JSONDecodeError) as exc:
            print(f"rlhf jobs submit: {exc}", file=sys.stderr)
            return 2
        print(job_id)
        if args.wait:
            try:
                rec = tc.wait(job_id, timeout=args.timeout)
            except JobFailed as exc:
                print(str(exc), file=sys.stderr)
                return 1
            _print(rec.to_dict(), args.json, f"{rec.status} {rec.version or ''}")
        return 0
    except KeyError as exc:
        print(f"rlhf jobs: no job {exc.args[0]!r}", file=sys.stderr)
        return 1
    finally:
        tc.close()


def _plot_job(rec, png: Path, settings) -> int:
    """Draw the training curves of the version job `rec` published (PPO jobs write them)."""
    from rlhf.trainer.ppo import plot_ppo_curves

    name = rec.spec.get("model_name")
    if rec.version is None or not name:
        print(f"rlhf jobs show: job {rec.id} has published no version (status {rec.status})",
              file=sys.stderr)
        return 1
    try:
        plot_ppo_curves(Path(settings.store_dir) / name / rec.version, png,
                        title=f"{name} {rec.version} (job {rec.id})")
    except (OSError, ValueError) as exc:
        print(f"rlhf jobs show: no curves to plot: {exc}", file=sys.stderr)
        return 1
    print(f"curves written to {png}", file=sys.stderr)
    return 0


def run_models(args, settings) -> int:
    from rlhf_client.registry import RegistryError
    from rlhf_client.training import ModelsClient

    from rlhf.models.store import ModelStore, TamperedCheckpoint

    cmd = args.models_command
    if cmd == "add-token":
        from rlhf.models.tokens import cmd_add_token

        return cmd_add_token(args, settings)
    mc = ModelsClient.from_url(settings.redis_url.get_secret_value(), store_dir=settings.store_dir)
    try:
        if cmd == "list":
            rows = [{"name": n, "active": mc.active(n), "versions": len(mc.versions(n))}
                    for n in mc.models()]
            _print(rows, args.json, "\n".join(f"{r['name']:32s} active {r['active'] or '-':8s} "
                                              f"{r['versions']} version(s)" for r in rows)
                   or "(no models)")
        elif cmd == "show":
            info = mc.show(args.name, args.version)
            if args.version is not None and info.get("manifest") is not None:
                try:
                    ModelStore(settings.store_dir).verify(args.name, args.version)
                    info["verified"] = True
                except TamperedCheckpoint as exc:
                    info["verified"] = False
                    info["verify_error"] = str(exc)
            _print(info, True, "")
        elif cmd == "activate":
            a = mc.activate(args.name, args.version)
            _print(a.__dict__, args.json, f"{a.name}: {a.previous or '-'} -> {a.version}")
        else:
            a = mc.rollback(args.name)
            _print(a.__dict__, args.json, f"{a.name}: rolled back {a.previous or '-'} -> {a.version}")
        return 0
    except RegistryError as exc:
        print(f"rlhf models: {exc}", file=sys.stderr)
        return 1
    finally:
        mc.close()


HANDLERS = {"worker": run_worker, "worker-probe": run_worker_probe, "jobs": run_jobs,
            "models": run_models}
