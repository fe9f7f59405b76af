"""`rlhf jobs` and `rlhf models`: training jobs and model versions from a shell, on the base
install (no torch, no celery; nothing here imports the server package `rlhf`).

    rlhf jobs [list] [--limit N] [--status S]          newest jobs first
    rlhf jobs show ID [--plot PNG]                     one job's record (JSON)
    rlhf jobs submit FILE|- [--set KEY=VALUE]... [--wait] [--timeout S]
    rlhf jobs schema [TYPE]                            fields of each job type, and an example
    rlhf jobs cancel ID
    rlhf jobs metrics ID [--tail N] [--keys A,B] [--plot PNG]
    rlhf models [list] | show NAME [VERSION] | activate NAME VERSION | rollback NAME
    rlhf models export NAME VERSION DIR                a verified copy of a version
    rlhf models merge NAME VERSION [--as NAME2] [--activate]   an adapter merged (server)

`jobs reap`, `models add-token`, `models import` and `models merge` are listed here and run by
the server package (`pip install 'rlhf[train]'` / `'rlhf[serve]'`).

Every command takes `--redis-url` (env RLHF_REDIS_URL, default redis://127.0.0.1:6379/0),
`--store` (env RLHF_STORE_DIR, default ./model-store), `--json` (print JSON) and `--debug`.
A failure is one line on stderr naming its cause (with `--debug`, after the traceback); exit
status 1 when the command could not be done (Redis unreachable, unknown job / model / version,
the job failed, a refused checkpoint), 2 when what it was given is wrong (a spec, a spec file,
a `--set`, a Redis URL, the flags).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_STORE_DIR = "./model-store"
EXIT_FAILED = 1
EXIT_USAGE = 2
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
#: The command groups this module runs.
GROUPS = ("jobs", "models")
#: Leaves of those groups that run in the server package: help, and the extra they need.
SERVER_LEAVES: dict[str, dict[str, tuple[str, str]]] = {
    "jobs": {"reap": ("re-queue jobs whose lease expired and whose Celery message is gone",
                      "train")},
    "models": {"add-token": ("add a special token to a model (tokenizer and embeddings), as a "
                             "new version", "serve"),
               "import": ("put a Hugging Face directory into the store as a new version "
                          "(checksums, golden probes)", "serve"),
               "merge": ("merge a LoRA adapter version into its base as a new full version",
                         "serve")},
}
_MAX_LINE = 600
_MANIFEST = "manifest.json"


# ---------------------------------------------------------------------------------------------
# Failures as one line
# ---------------------------------------------------------------------------------------------


class CliError(Exception):
    """A failure reported as one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def one_line(text: str) -> str:
    """`text` on one line (a multi-line "header:\\n  a\\n  b" as "header: a; b"), cut at 600
    characters."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = [f"{lines[0]} {'; '.join(lines[1:])}"]
    line = " ".join(" ".join(lines).split())
    return line if len(line) <= _MAX_LINE else line[: _MAX_LINE - 1] + "…"


def redact_url(url: str) -> str:
    """`url` without its credentials (redis://:***@host:6379/0; a Sentinel URL's
    sentinel_password too): `redis_conn.redact_url`."""
    from rlhf_client.redis_conn import redact_url as redact

    return redact(url)


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, saying what to write instead (None: nothing)."""
    if "://" not in url:
        db = "" if "/" in url else "/0"
        return (f"Redis URL {redact_url(url)!r} has no scheme: write redis://{redact_url(url)}{db} "
                "(set --redis-url / RLHF_REDIS_URL)")
    from rlhf_client.redis_conn import check_url  # schemes, TLS and Sentinel forms, query

    try:
        check_url(url)
    except ValueError as exc:
        return f"{exc}; set --redis-url / RLHF_REDIS_URL"
    return None


def known_failure(exc: BaseException, *, redis_url: str | None = None) -> tuple[str, int] | None:
    """(one line, exit status) for a failure with a known cause; None for any other exception.

    Known: Redis unreachable / refusing / silent, a bad Redis URL, an unknown job, model or
    version, a rejected spec, a job that failed, was cancelled or timed out, a missing or
    unsafe checkpoint directory, and `CliError`.
    """
    import redis

    from rlhf_client.registry import RegistryError
    from rlhf_client.training import JobFailed, JobNotCancellable, JobNotFound

    where = f"Redis at {redact_url(redis_url)}" if redis_url else "Redis"
    hint = "(set --redis-url / RLHF_REDIS_URL)"
    if isinstance(exc, CliError):
        return one_line(str(exc)), exc.code
    if isinstance(exc, redis.AuthenticationError):
        return one_line(f"{where} refused the credentials ({exc}) {hint}"), EXIT_FAILED
    if isinstance(exc, redis.ConnectionError):
        return one_line(f"{where} is unreachable ({exc}) {hint}"), EXIT_FAILED
    if isinstance(exc, redis.TimeoutError):
        return one_line(f"{where} did not answer in time ({exc}) {hint}"), EXIT_FAILED
    if isinstance(exc, ValueError) and "Redis URL" in str(exc):  # redis_conn.check_url
        problem = redis_url_problem(redis_url) if redis_url else None
        return one_line(problem or str(exc)), EXIT_USAGE
    if isinstance(exc, JobNotFound):
        return f"no job {exc.args[0]!r}", EXIT_FAILED
    if isinstance(exc, (RegistryError, JobFailed, JobNotCancellable, TimeoutError)):
        return one_line(str(exc)), EXIT_FAILED  # JobFailed: a cancelled job too
    from rlhf_client.jobspecs import JobRejected

    if isinstance(exc, JobRejected):
        return one_line(str(exc)), EXIT_USAGE
    from rlhf_client.datafiles import CheckpointNotFound, UnsafeCheckpoint

    if isinstance(exc, (CheckpointNotFound, UnsafeCheckpoint)):
        return one_line(str(exc)), EXIT_FAILED
    return None


def report(prog: str, exc: BaseException, *, debug: bool, redis_url: str | None = None) -> int:
    """Print `exc` as one line on stderr (after its traceback with `debug`); its exit status.
    A failure with no known cause says its type and to run with --debug."""
    known = known_failure(exc, redis_url=redis_url)
    if known is None:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        known = (one_line(f"{text} (run with --debug for the traceback)"), EXIT_FAILED)
    if debug:
        traceback.print_exception(exc)
    print(f"{prog}: {known[0]}", file=sys.stderr, flush=True)
    return known[1]


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------


def add_common_flags(p: argparse.ArgumentParser) -> None:
    """--redis-url, --store, --json, --debug, --log-level: on each group and each leaf (given
    anywhere on the line; unset ones fall back to RLHF_REDIS_URL / RLHF_STORE_DIR / defaults)."""
    s = argparse.SUPPRESS
    p.add_argument("--redis-url", dest="redis_url", default=s, metavar="URL",
                   help=f"Redis: jobs, registry, broker (env RLHF_REDIS_URL; {DEFAULT_REDIS_URL})")
    p.add_argument("--store", dest="store_dir", type=Path, default=s, metavar="DIR",
                   help=f"model store root (env RLHF_STORE_DIR; {DEFAULT_STORE_DIR})")
    p.add_argument("--json", action="store_true", default=s, help="print JSON")
    p.add_argument("--debug", action="store_true", default=s,
                   help="on failure print the traceback (default: one line naming the cause)")
    p.add_argument("--log-level", dest="log_level", default=s,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"])


ServerLeaves = Callable[[str, Any], None]


def add_parsers(sub, *, server_leaves: ServerLeaves | None = None) -> None:
    """`jobs` and `models` under `sub` (the `rlhf` subparsers). `server_leaves(group, subparsers)`
    adds the server-side leaves (SERVER_LEAVES); without it they are placeholders that take any
    arguments (the `rlhf` command hands such a line to the server package)."""
    jobs = sub.add_parser("jobs", help="training jobs: list (default), show, submit, schema, "
                          "cancel, metrics, reap", description="Training jobs (Redis records, "
                          "Celery messages).")
    add_common_flags(jobs)
    jobs.set_defaults(jobs_command="list", limit=20, status=None)
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")
    jl = _leaf(jobs_sub, "list", "newest jobs first")
    jl.add_argument("--limit", type=int, default=20)
    jl.add_argument("--status", choices=JOB_STATUSES)
    js = _leaf(jobs_sub, "show", "one job's record (JSON)")
    js.add_argument("job_id", metavar="ID")
    js.add_argument("--plot", type=Path, default=None, metavar="PNG",
                    help="also draw its metrics (as `jobs metrics ID --plot PNG`)")
    jsub = _leaf(jobs_sub, "submit", "validate and queue a job spec (YAML or JSON)",
                 description="Validate a job spec and queue it; prints the job id. See `rlhf "
                 "jobs schema` for every type's fields and an example.")
    jsub.add_argument("spec", metavar="FILE", help="the spec, YAML or JSON, with a \"type\" "
                      "(reward_model, dpo, ppo, sft, iterate); - reads stdin")
    jsub.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field, KEY dotted (source.stream=prefs), VALUE read as "
                      "YAML (repeatable)")
    jsub.add_argument("--wait", action="store_true",
                      help="follow it with a progress bar (step, loss, ETA); print its metrics")
    jsub.add_argument("--timeout", type=float, default=24 * 3600.0, metavar="S",
                      help="--wait: give up after this many seconds (exit 1; the job goes on)")
    jsc = _leaf(jobs_sub, "schema", "every job type's fields (or one type's) and an example")
    jsc.add_argument("type", nargs="?", metavar="TYPE")
    jc = _leaf(jobs_sub, "cancel", "cancel a job (a queued one never runs; a running one stops "
               "at its next step and publishes nothing)")
    jc.add_argument("job_id", metavar="ID")
    jm = _leaf(jobs_sub, "metrics", "a job's per-step metrics (table, --json, or --plot)")
    jm.add_argument("job_id", metavar="ID")
    jm.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N rows")
    jm.add_argument("--keys", default=None, metavar="A,B",
                    help="only these metrics (comma-separated; default: every numeric one)")
    jm.add_argument("--plot", type=Path, default=None, metavar="PNG",
                    help="draw them into this PNG (needs matplotlib: the serve extra)")

    models = sub.add_parser("models", help="model versions: list (default), show, activate, "
                            "rollback, export, import, merge, add-token",
                            description="Model versions: the registry (Redis) and the store.")
    add_common_flags(models)
    models.set_defaults(models_command="list")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND")
    _leaf(models_sub, "list", "every model with its active version")
    ms = _leaf(models_sub, "show", "a model's versions, or one version's manifest (verified)")
    ms.add_argument("name")
    ms.add_argument("version", nargs="?")
    ma = _leaf(models_sub, "activate", "make a version the active one")
    ma.add_argument("name")
    ma.add_argument("version")
    mr = _leaf(models_sub, "rollback", "re-activate the previously active version")
    mr.add_argument("name")
    me = _leaf(models_sub, "export", "copy a version (weights, config, tokenizer, manifest) to "
               "a directory, checksums verified")
    me.add_argument("name")
    me.add_argument("version")
    me.add_argument("dir", type=Path, metavar="DIR", help="must not exist, or be empty")

    for group, group_sub in (("jobs", jobs_sub), ("models", models_sub)):
        if server_leaves is not None:
            server_leaves(group, group_sub)
            continue
        for name, (help_, extra) in SERVER_LEAVES[group].items():
            group_sub.add_parser(name, help=f"{help_} (needs rlhf[{extra}])", add_help=False)


def _leaf(sub, name: str, help_: str, **kwargs) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, **kwargs)
    add_common_flags(p)
    return p


def build_parser(prog: str = "rlhf") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Training jobs and model versions.")
    add_parsers(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


class _Run:
    """One command's arguments and its settings (flag, else environment, else default)."""

    def __init__(self, args: argparse.Namespace, prog: str):
        self.args = args
        self.prog = prog
        self.redis_url = (getattr(args, "redis_url", None) or os.environ.get("RLHF_REDIS_URL")
                          or DEFAULT_REDIS_URL)
        self.store_dir = Path(getattr(args, "store_dir", None) or os.environ.get("RLHF_STORE_DIR")
                              or DEFAULT_STORE_DIR)
        self.json = bool(getattr(args, "json", False))
        self.debug = bool(getattr(args, "debug", False))
        self._closers: list[Callable[[], None]] = []

    def _check_url(self) -> None:
        problem = redis_url_problem(self.redis_url)
        if problem:
            raise CliError(problem, EXIT_USAGE)

    def training(self):
        from rlhf_client.training import TrainingClient

        self._check_url()
        tc = TrainingClient(self.redis_url)
        self._closers.append(tc.close)
        return tc

    def models(self):
        from rlhf_client.training import ModelsClient

        self._check_url()
        mc = ModelsClient.from_url(self.redis_url, store_dir=self.store_dir)
        self._closers.append(mc.close)
        return mc

    def close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - closing a client that never connected
                pass

    def out(self, obj: Any, text: str) -> None:
        print(json.dumps(obj, indent=2, sort_keys=True, default=str) if self.json else text,
              flush=True)


def main(argv: Sequence[str] | None = None, *, prog: str = "rlhf",
         server: Callable[[list[str], str, str], int] | None = None) -> int:
    """Run `jobs ...` / `models ...` (`argv` without the program name); the exit status.
    A server-side leaf is handed to `server(argv, group, leaf)` (the `rlhf` command's own
    parser); without one, it says which extra runs it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args, extra = parser.parse_known_args(argv)
    group = args.command
    leaf = getattr(args, f"{group}_command")
    if leaf in SERVER_LEAVES[group]:
        if server is not None:
            return server(argv, group, leaf)
        print(f"{prog} {group} {leaf}: runs in the server package: pip install "
              f"'rlhf[{SERVER_LEAVES[group][leaf][1]}]'", file=sys.stderr)
        return EXIT_FAILED
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    run = _Run(args, f"{prog} {group} {leaf}")
    if getattr(args, "log_level", None):
        import logging

        logging.basicConfig(level=args.log_level)
    handler = _JOBS[leaf] if group == "jobs" else _MODELS[leaf]
    try:
        return handler(run) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        return 141
    except Exception as exc:  # noqa: BLE001 - one line (the traceback with --debug)
        return report(run.prog, exc, debug=run.debug, redis_url=run.redis_url)
    finally:
        run.close()


# ---------------------------------------------------------------------------------------------
# rlhf jobs
# ---------------------------------------------------------------------------------------------


def _jobs_list(run: _Run) -> int:
    recs = run.training().jobs(limit=run.args.limit, status=run.args.status)
    rows = [f"{r.id:34s} {r.type:14s} {r.status:10s} {r.progress:5.0%} "
            f"{r.version or '-':8s} {one_line(r.error or '')}" for r in recs]
    run.out([r.to_dict() for r in recs], "\n".join(rows) or "(no jobs)")
    return 0


def _jobs_show(run: _Run) -> int:
    rec = run.training().status(run.args.job_id)
    print(json.dumps(rec.to_dict(), indent=2, sort_keys=True, default=str), flush=True)
    if run.args.plot is not None:
        _plot(run, rec, run.args.plot)
    return 0


def _jobs_submit(run: _Run) -> int:
    spec = load_spec(run.args.spec, run.args.sets)
    tc = run.training()
    job_id = tc.submit(spec)
    print(job_id, flush=True)
    if not run.args.wait:
        return 0
    bar = ProgressBar(tc)
    try:
        rec = tc.wait(job_id, timeout=run.args.timeout, poll_s=0.5, on_update=bar.update)
        bar.finish(rec)
    except KeyboardInterrupt:
        bar.close()
        print(f"{run.prog}: stopped waiting; job {job_id} goes on (`rlhf jobs cancel {job_id}` "
              "stops it)", file=sys.stderr)
        return 130
    finally:
        bar.close()
    run.out(rec.to_dict(), format_result(rec))
    return 0


def _jobs_schema(run: _Run) -> int:
    from rlhf_client.jobspecs import JOB_TYPES, example_spec, job_schema

    types = list(JOB_TYPES)
    if run.args.type is not None and run.args.type not in JOB_TYPES:
        raise CliError(f"unknown job type {run.args.type!r}; the types are: {', '.join(types)}",
                       EXIT_USAGE)
    if run.args.type is not None:
        types = [run.args.type]
    if run.json:
        run.out({t: {"schema": job_schema(t), "example": example_spec(t)} for t in types}, "")
        return 0
    print("\n\n".join(format_schema(t, job_schema(t), example_spec(t)) for t in types), flush=True)
    return 0


def _jobs_cancel(run: _Run) -> int:
    rec = run.training().cancel(run.args.job_id)  # a finished job: JobNotCancellable
    run.out(rec.to_dict(), f"{rec.id} {rec.status}" + ("" if rec.status == "cancelled" else
                                                        " (cancel requested: it stops at its "
                                                        "next step)"))
    return 0


def _jobs_metrics(run: _Run) -> int:
    from rlhf_client.history import metric_names, read_metrics

    tc = run.training()
    rec = tc.status(run.args.job_id)  # unknown job: one line
    tail = run.args.tail
    if tail is not None and tail < 1:
        raise CliError("--tail: give a number of rows, 1 or more", EXIT_USAGE)
    rows = read_metrics(tc.r, rec.id, count=tail) or curves_rows(run.store_dir, rec)
    if tail is not None:
        rows = rows[-tail:]
    keys = [k.strip() for k in run.args.keys.split(",") if k.strip()] if run.args.keys else None
    if keys:
        unknown = [k for k in keys if k not in metric_names(rows)]
        if unknown and rows:
            raise CliError(f"--keys: job {rec.id} has no metric {', '.join(map(repr, unknown))} "
                           f"(it has: {', '.join(metric_names(rows)) or 'none'})", EXIT_USAGE)
    if run.args.plot is not None:
        _plot(run, rec, run.args.plot, rows=rows, keys=keys)
    if run.json:
        run.out(rows, "")
    elif rows:  # (every row of a training stage says its `steps`: left out)
        keys = keys or [k for k in metric_names(rows) if k != "steps"]
        print(format_table(rows, keys), flush=True)
    else:
        print(f"(job {rec.id} has no metrics history)", flush=True)
    return 0


def _plot(run: _Run, rec, png: Path, *, rows=None, keys=None) -> None:
    from rlhf_client.history import plot_metrics, read_metrics

    if rows is None:
        rows = read_metrics(run.training().r, rec.id) or curves_rows(run.store_dir, rec)
    if not rows:
        raise CliError(f"job {rec.id} has no metrics to plot (status {rec.status})")
    try:
        import matplotlib  # noqa: F401 - only to say what is missing
    except ImportError:
        raise CliError("--plot needs matplotlib (pip install 'rlhf[serve]')") from None
    try:
        path = plot_metrics(rows, png, title=f"job {rec.id} ({rec.type})", keys=keys)
    except (OSError, ValueError) as exc:
        raise CliError(f"--plot {png}: {exc}") from exc
    print(f"metrics plotted to {path}", file=sys.stderr, flush=True)


def curves_rows(store_dir: Path, rec) -> list[dict[str, Any]]:
    """Per-step rows from `training_curves.json` in the version job `rec` published (a PPO job
    writes it), for jobs whose history in Redis is gone; [] when there is none."""
    name = rec.spec.get("model_name")
    if rec.version is None or not name:
        return []
    path = store_dir / name / rec.version / "training_curves.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    steps = data.get("steps", []) if isinstance(data, dict) else data
    return [{"step": i + 1, "time": rec.finished or 0.0, **s}
            for i, s in enumerate(steps) if isinstance(s, dict)]


_JOBS: dict[str, Callable[[_Run], int]] = {
    "list": _jobs_list, "show": _jobs_show, "submit": _jobs_submit, "schema": _jobs_schema,
    "cancel": _jobs_cancel, "metrics": _jobs_metrics,
}


# --- spec files ------------------------------------------------------------------------------


def load_spec(source: str, sets: Sequence[str] = ()) -> dict[str, Any]:
    """A job spec from a YAML or JSON file (`-`: stdin) with `--set KEY=VALUE` overrides applied;
    `CliError` (exit 2) naming what is wrong with the file or an override."""
    name = "<stdin>" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read the spec file {name}: {exc.strerror or exc}",
                       EXIT_USAGE) from exc
    except UnicodeDecodeError as exc:
        raise CliError(f"cannot read the spec file {name}: not UTF-8 text ({exc.reason})",
                       EXIT_USAGE) from exc
    data = _yaml(text, f"{name}: not YAML or JSON")
    if data is None:
        raise CliError(f"{name} is empty: a job spec is a mapping with a \"type\" (see rlhf jobs "
                       "schema)", EXIT_USAGE)
    if not isinstance(data, dict):
        raise CliError(f"{name}: a job spec is a mapping with a \"type\", not a "
                       f"{type(data).__name__}", EXIT_USAGE)
    for item in sets:
        set_path(data, item)
    return data


def _yaml(text: str, what: str) -> Any:
    """`text` read as YAML; `CliError` (exit 2) "`what` (line L, column C): problem"."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise CliError(f"{what}{where}: {problem}", EXIT_USAGE) from exc


def set_path(spec: dict[str, Any], item: str) -> None:
    """Apply one `--set KEY=VALUE` to `spec` in place: KEY dotted (missing mappings on the way
    are made), VALUE read as YAML (`3` an int, `true` a bool, `[a, b]` a list, `x` a string)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CliError(f"--set {item!r}: expected KEY=VALUE (KEY dotted, e.g. "
                       "source.stream=prefs)", EXIT_USAGE)
    parts = key.split(".")
    if not all(parts):
        raise CliError(f"--set {item!r}: {key!r} has an empty name in its path", EXIT_USAGE)
    value = _yaml(raw, f"--set {item!r}: the value is not YAML")
    node = spec
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise CliError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a "
                           "mapping", EXIT_USAGE)
        node = child
    node[parts[-1]] = value


# --- --wait ----------------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def loss_of(metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """The metric the bar shows as the loss: `loss`, else the first numeric `*loss`."""
    for key in ("loss", *[k for k in metrics if k.endswith("loss") and k != "loss"]):
        if _number(metrics.get(key)):
            return key, metrics[key]
    return None


class ProgressBar:
    """The live bar of `jobs submit --wait` (tqdm, on stderr): a stage's step / steps (a loop's
    round / rounds, else percent), the loss, elapsed and ETA. `update` is `TrainingClient.wait`'s
    `on_update`; `finish` completes it from the last record (and the job's history, for a job
    that ran between two polls)."""

    def __init__(self, tc, *, file=None):
        self.tc = tc
        self.file = file or sys.stderr
        self.bar = None
        self._unit = None

    @staticmethod
    def position(rec) -> tuple[float, float, str] | None:
        m = rec.metrics
        if _number(m.get("steps")) and m["steps"] > 0 and _number(m.get("step")):
            return m["step"], m["steps"], "step"
        if _number(m.get("rounds")) and m["rounds"] > 0 and _number(m.get("round")):
            return m["round"], m["rounds"], "round"
        if rec.status == "running" and rec.progress > 0:
            return round(rec.progress * 100, 1), 100, "%"
        return None

    def _show(self, n: float, total: float, unit: str, metrics: Mapping[str, Any], desc: str):
        from tqdm import tqdm

        if self.bar is None or self._unit != unit or self.bar.total != total:
            self.close()  # the rate (and ETA) counts from what this bar has seen: `initial`
            self.bar = tqdm(total=total, initial=n, unit=unit, file=self.file, dynamic_ncols=True,
                            mininterval=0, leave=True, desc=desc)
            self._unit = unit
        if n < self.bar.n:  # a new stage or attempt
            self.bar.reset(total=total)
        self.bar.set_description_str(desc, refresh=False)
        loss = loss_of(metrics)
        if loss is not None:
            self.bar.set_postfix({loss[0]: f"{loss[1]:.4g}"}, refresh=False)
        self.bar.update(n - self.bar.n)

    def update(self, rec) -> None:
        pos = self.position(rec)
        desc = str(rec.metrics.get("stage") or rec.status)
        if pos is not None and not rec.done:
            self._show(*pos, rec.metrics, desc)
        elif self.bar is not None and self._unit != "status":
            self.bar.set_description_str(desc)
        elif not rec.done:  # queued, or reading its data: the status and the time waited
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=None, file=self.file, bar_format="{desc} [{elapsed}]",
                                leave=False, mininterval=0)
                self._unit = "status"
            self.bar.set_description_str(desc)

    def finish(self, rec) -> None:
        """At the end of a job that succeeded: the bar at its last training step with that
        step's loss, from the job's history (the polls may have missed the last steps, or all
        of them)."""
        if rec.status != "succeeded":
            return
        from rlhf_client.history import read_metrics

        try:
            rows = [r for r in read_metrics(self.tc.r, rec.id, count=50) if _number(r.get("steps"))]
        except Exception:  # noqa: BLE001 - the bar is a nicety
            rows = []
        if rows:
            last = rows[-1]
            self._show(last["step"], last["steps"], "step", last, rec.status)
        elif self.bar is not None and self._unit != "status":
            self.bar.set_description_str(rec.status, refresh=False)
            self.bar.update(self.bar.total - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_result(rec) -> str:
    """A finished job: status and version, then its metrics one per line."""
    head = f"{rec.status} {rec.version or '-'}"
    width = max((len(k) for k in rec.metrics), default=0)
    lines = [f"  {k:{width}s}  {_cell(v)}" for k, v in rec.metrics.items()]
    return "\n".join([head, *lines])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return "-" if v is None else str(v)


def format_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """History rows as a table: step, the time of day, then `keys`."""
    header = ["step", "time", *keys]
    body = [[str(r.get("step", "")),
             time.strftime("%H:%M:%S", time.localtime(r["time"])) if r.get("time") else "-",
             *[_cell(r.get(k)) if k in r else "" for k in keys]] for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)).rstrip()
                     for row in [header, *body])


# --- schema ----------------------------------------------------------------------------------


def schema_fields(schema: Mapping[str, Any]) -> list[dict[str, str]]:
    """The fields of a job type's JSON schema, flattened: one dict per field with `field`
    (dotted; a variant's fields say which, `source.path [type=jsonl]`), `type`, `default`,
    `constraints` and `description`."""
    defs = schema.get("$defs", {})
    out: list[dict[str, str]] = []

    def resolve(s: Mapping[str, Any]) -> dict[str, Any]:
        s = dict(s)
        while "$ref" in s:
            target = defs[s.pop("$ref").rsplit("/", 1)[-1]]
            s = {**target, **s}  # the field's own default / description win
        return s

    def walk(obj: Mapping[str, Any], prefix: str, note: str) -> None:
        required = set(obj.get("required", ()))
        for name, raw in obj.get("properties", {}).items():
            path = prefix + name
            prop = resolve(raw)
            options = [resolve(o) for o in prop.get("oneOf", prop.get("anyOf", []))]
            objects = [o for o in options if o.get("type") == "object"] or (
                [prop] if prop.get("type") == "object" and "properties" in prop else [])
            if len(objects) > 1 and "discriminator" in prop:  # a tagged union (source)
                tag = prop["discriminator"]["propertyName"]
                tags = [o["properties"][tag].get("const") for o in objects]
                out.append(_row(path, prop, name in required, note,
                                type_=f"mapping, one of {tag}: " + " | ".join(map(str, tags))))
                for o, t in zip(objects, tags):
                    rest = {k: v for k, v in o["properties"].items() if k != tag}
                    walk({**o, "properties": rest}, f"{path}.", f"{tag}={t}")
                continue
            out.append(_row(path, prop, name in required, note))
            if len(objects) == 1 and objects[0].get("properties"):
                walk(objects[0], f"{path}.", note)

    walk(schema, "", "")
    return out


def _row(path: str, prop: Mapping[str, Any], required: bool, note: str, *,
         type_: str | None = None) -> dict[str, str]:
    if required:
        default = "(required)"
    elif "default" in prop:
        default = json.dumps(prop["default"], default=str)
    else:
        default = "(auto)"
    return {"field": path + (f" [{note}]" if note else ""), "type": type_ or _type(prop),
            "default": default, "constraints": _constraints(prop),
            "description": " ".join(str(prop.get("description", "")).split())}


_JSON_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool",
               "null": "null", "object": "mapping"}


def _type(s: Mapping[str, Any]) -> str:
    if "const" in s:
        return json.dumps(s["const"])
    if "enum" in s:
        return " | ".join(json.dumps(v) for v in s["enum"])
    for key in ("oneOf", "anyOf"):
        if key in s:
            return " | ".join(_type(o) if "$ref" not in o else o["$ref"].rsplit("/", 1)[-1]
                              for o in s[key])
    t = s.get("type")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(i) for i in s["prefixItems"]) + "]"
        return f"list[{_type(s.get('items', {}))}]"
    if t == "object" and s.get("title") and "properties" in s:
        return f"mapping ({s['title']})"
    if isinstance(t, list):
        return " | ".join(_JSON_TYPES.get(x, x) for x in t)
    return _JSON_TYPES.get(t, t or "any")


_BOUNDS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
           ("exclusiveMaximum", "<"), ("minLength", "length >="), ("maxLength", "length <="),
           ("minItems", "items >="), ("maxItems", "items <="), ("pattern", "matches"))


def _constraints(s: Mapping[str, Any]) -> str:
    parts = [f"{word} {s[key]}" for key, word in _BOUNDS if key in s]
    for o in s.get("anyOf", []):
        parts += [f"{word} {o[key]}" for key, word in _BOUNDS if key in o]
    return ", ".join(dict.fromkeys(parts))


def format_schema(job_type: str, schema: Mapping[str, Any], example: Mapping[str, Any]) -> str:
    """One job type for a person: its description, a table of its fields (each description on
    the line below), and an example spec as YAML."""
    import yaml

    fields = schema_fields(schema)
    cols = ("field", "type", "default", "constraints")
    widths = {c: min(48, max([len(c), *(len(f[c]) for f in fields)])) for c in cols}
    lines = [f"{job_type}: {' '.join(str(schema.get('description', '')).split())}", ""]
    lines.append("  " + "  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip())
    for f in fields:
        lines.append("  " + "  ".join(f[c].ljust(widths[c]) for c in cols).rstrip())
        if f["description"]:
            lines.append(f"      {f['description']}")
    lines += ["", f"example ({job_type}.yaml):", ""]
    lines += ["  " + ln for ln in yaml.safe_dump(dict(example), sort_keys=False).splitlines()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# rlhf models
# ---------------------------------------------------------------------------------------------


def _models_list(run: _Run) -> int:
    mc = run.models()
    rows = [{"name": n, "active": mc.active(n), "versions": len(mc.versions(n))}
            for n in mc.models()]
    run.out(rows, "\n".join(f"{r['name']:32s} active {r['active'] or '-':8s} {r['versions']} "
                            "version(s)" for r in rows) or "(no models)")
    return 0


def _models_show(run: _Run) -> int:
    a = run.args
    info = run.models().show(a.name, a.version)
    if a.version is not None and info.get("manifest") is not None:
        try:
            verify_version(run.store_dir / a.name / a.version)
            info["verified"] = True
        except CliError as exc:
            info["verified"] = False
            info["verify_error"] = str(exc)
    print(json.dumps(info, indent=2, sort_keys=True, default=str), flush=True)
    return 0


def _models_activate(run: _Run) -> int:
    a = run.models().activate(run.args.name, run.args.version)
    run.out(a.__dict__, f"{a.name}: {a.previous or '-'} -> {a.version}")
    return 0


def _models_rollback(run: _Run) -> int:
    a = run.models().rollback(run.args.name)
    run.out(a.__dict__, f"{a.name}: rolled back {a.previous or '-'} -> {a.version}")
    return 0


def _models_export(run: _Run) -> int:
    a = run.args
    files = export_version(run.store_dir, a.name, a.version, a.dir)
    run.out({"name": a.name, "version": a.version, "dir": str(a.dir), "files": files},
            f"exported {a.name} {a.version} to {a.dir} ({len(files)} files, checksums verified)")
    return 0


_MODELS: dict[str, Callable[[_Run], int]] = {
    "list": _models_list, "show": _models_show, "activate": _models_activate,
    "rollback": _models_rollback, "export": _models_export,
}


def _version_files(d: Path) -> list[Path]:
    """The files of a version directory besides its manifest (as the store lists them)."""
    return sorted(p for p in d.rglob("*") if p.is_file() and p.name != _MANIFEST)


def verify_version(d: Path) -> dict[str, Any]:
    """A store version's manifest, after checking its files are exactly the manifest's and
    each matches its sha256; `CliError` naming the first difference."""
    try:
        manifest = json.loads((d / _MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"{d}: no readable {_MANIFEST} (not a complete store version): "
                       f"{exc}") from exc
    present = {p.relative_to(d).as_posix() for p in _version_files(d)}
    missing, extra = sorted(set(files) - present), sorted(present - set(files))
    if missing or extra:
        raise CliError(f"{d}: files differ from the manifest (missing {missing}, extra {extra})")
    for rel, digest in files.items():
        if _sha256(d / rel) != digest:
            raise CliError(f"{d}: {rel} does not match its sha256 in the manifest")
    return manifest


def _sha256(path: Path, copy_to: Path | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f, (copy_to.open("xb") if copy_to else _Null()) as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            out.write(block)
    return h.hexdigest()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, _block: bytes) -> None:
        return None


def export_version(store_dir: Path, name: str, version: str, dest: Path) -> list[str]:
    """Copy version `version` of `name` from the store to `dest` (absent, or an empty
    directory): every file the manifest lists, each checked against its sha256 as it is copied,
    and the manifest; written beside `dest` and renamed into place (all or nothing). The files
    copied."""
    src = store_dir / name / version
    if not (src / _MANIFEST).is_file():
        raise CliError(f"the store at {store_dir} has no version {version!r} of {name!r} "
                       "(set --store / RLHF_STORE_DIR)")
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise CliError(f"{dest} exists and is not an empty directory", EXIT_USAGE)
    manifest = verify_version(src)  # the set of files; contents are re-checked as copied
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.export-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for rel, digest in manifest["files"].items():
            target = tmp / rel
            if not target.resolve().is_relative_to(tmp.resolve()):
                raise CliError(f"{src}: the manifest names a file outside the version: {rel!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if _sha256(src / rel, copy_to=target) != digest:
                raise CliError(f"{src}: {rel} changed while it was copied (sha256 differs from "
                               "the manifest)")
        shutil.copy2(src / _MANIFEST, tmp / _MANIFEST)
        os.replace(tmp, dest)  # onto an empty directory, or a new name
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(manifest["files"])


if __name__ == "__main__":
    sys.exit(main())
