"""A running job's history and `report_to`: every progress row kept, sent where the spec asks.

`JobTracker` belongs to the job's `JobContext` (jobs.py). Every `ctx.progress(fraction, metrics)`
call becomes one row (not only the throttled record write):

- **History** (always): rows are buffered and written to the job's Redis stream
  `rlhf:job:<id>:metrics` (`rlhf_client.history`, which reads and plots them) in one pipeline at
  the record-write cadence (every 0.5 s at most, and whenever progress is forced) and when the
  job function ends. The stream keeps the newest `job_metrics_maxlen` rows (an exact `XTRIM`
  after each write) and expires `job_record_ttl_s` after its last write, like the finished job's
  record. Best effort, like progress: with Redis away rows stay buffered (the newest
  `job_metrics_maxlen`) and go out with the next write that gets through; training goes on. A
  retried attempt continues the same stream (each row names its attempt).
- **`report_to`** (the spec's list, TRL's names): `"tensorboard"` writes scalars with
  `torch.utils.tensorboard.SummaryWriter` into the spec's `logging_dir` (a path on the worker;
  unset: `<job_logging_dir>/<job id>`, whose default is `<store_dir>/.runs/<job id>` — on the
  shared store volume, where `tensorboard --logdir <store_dir>/.runs` shows every job, and
  never taken for a model: the store skips dot directories); `"mlflow"` logs to MLflow through
  `MlflowClient` with MLflow's own conventions: tracking URI from `MLFLOW_TRACKING_URI`,
  experiment `MLFLOW_EXPERIMENT_NAME` (default `rlhf`), run name = job id (tag `rlhf.job_id`:
  a retried attempt resumes the same run), params = the spec flattened (`source.type`, ...),
  metrics per step, and the run ended FINISHED, FAILED or KILLED (cancelled) with the job
  function. (A tracking server or database is MLflow 3's way; its `file://` store needs
  MLflow's own opt-in `MLFLOW_ALLOW_FILE_STORE=true`, as the tests set.) Reporters run in their own thread, fed every report interval, so a slow or
  unreachable tracking server never holds training up; their errors are logged, never raised.
  A reporter whose package is missing fails the job when it starts, naming the extra to install
  (`pip install 'rlhf[tensorboard]'`, `pip install 'rlhf[mlflow]'`).

What a row is: `step` (the `step` metric; for a loop job its `round`; otherwise the step of the
row before, 0 at the start), `time` (unix seconds), `attempt`, then the metrics that are numbers,
strings or booleans. TensorBoard and MLflow get the numeric ones (`rlhf_client.history.
numeric_metrics`) at that step.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import redis
from rlhf_client.history import encode_row, metrics_key, numeric_metrics

if TYPE_CHECKING:
    from rlhf.config import Settings

log = logging.getLogger(__name__)

#: `report_to` names → (the module that must be importable, the extra that installs it).
REPORTERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
}
#: Metrics that set a row's step, first found wins.
STEP_KEYS = ("step", "round")
#: Seconds between deliveries to the reporters (rows in between go in one batch).
REPORT_INTERVAL_S = 0.5
#: Seconds the end of a job function waits for its reporters to deliver their last rows and
#: end their runs (an unreachable tracking server is not waited for longer).
REPORT_CLOSE_WAIT_S = 30.0
#: MLflow's limits per `log_batch` request.
_MLFLOW_MAX_METRICS, _MLFLOW_MAX_PARAMS, _MLFLOW_MAX_PARAM_CHARS = 1000, 100, 500


class ReporterMissing(RuntimeError):
    """A job asks for a reporter whose package this worker lacks (or one that does not exist)."""


def check_reporters(names: list[str] | tuple[str, ...]) -> None:
    """`ReporterMissing` naming the extra to install when a reporter in `names` cannot run here."""
    for name in names:
        if name not in REPORTERS:
            raise ReporterMissing(f"report_to {name!r} is not a reporter (known: "
                                  f"{', '.join(REPORTERS)})")
        module, extra = REPORTERS[name]
        if importlib.util.find_spec(module) is None:
            raise ReporterMissing(f"report_to {name!r} needs the {module} package, which this "
                                  f"worker lacks: pip install 'rlhf[{extra}]'")


def default_logging_dir(settings: "Settings", job_id: str) -> Path:
    """Where a job's TensorBoard events go when its spec names no `logging_dir`."""
    root = settings.job_logging_dir if settings.job_logging_dir is not None \
        else Path(settings.store_dir) / ".runs"
    return Path(root) / job_id


def run_status(exc: BaseException | None) -> str | None:
    """How a job function's end closes an MLflow run: FINISHED, KILLED (cancelled), FAILED, or
    None (leave the run alone: another attempt holds the job and goes on logging to it)."""
    from rlhf.trainer import jobs

    if exc is None:
        return "FINISHED"
    if isinstance(exc, jobs.LeaseLost):
        return None
    if isinstance(exc, jobs.CancelRequested):
        return "KILLED"
    return "FAILED"


def flatten(spec: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A spec as MLflow params: nested keys joined with dots, values as text (lists as JSON)."""
    out: dict[str, str] = {}
    for k, v in spec.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------


class JobTracker:
    """One attempt's history rows (buffered, written to Redis) and its reporters.

    `record(metrics)` on every progress call; `flush()` at the record-write cadence (raises the
    Redis error when Redis is away: the rows stay buffered); `start()` / `stop(exc)` around each
    run of the job function (`JobContext.heartbeat`).
    """

    def __init__(self, settings: "Settings", r: redis.Redis, job_id: str, *, spec: Any = None,
                 attempt: int = 1):
        self.settings = settings
        self.r = r
        self.job_id = job_id
        self.spec = spec
        self.attempt = attempt
        self.key = metrics_key(job_id)
        self.maxlen = settings.job_metrics_maxlen
        self.ttl_s = settings.job_record_ttl_s
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._seq = 0
        self._dropped = 0
        self._step = 0
        self._reporting: _Reporting | None = None

    @property
    def report_to(self) -> list[str]:
        return list(getattr(self.spec, "report_to", None) or [])

    # ------------------------------------------------------------------ rows
    def record(self, metrics: Mapping[str, Any] | None) -> None:
        """Buffer one row of `metrics` (nothing for None or {}). Never raises."""
        if not metrics:
            return
        try:
            row = self._row(metrics)
            with self._lock:
                if len(self._pending) >= self.maxlen:  # Redis away for long: keep the newest
                    self._pending.popleft()
                    self._dropped += 1
                    if self._dropped == 1:
                        log.warning("job %s: history buffer full (Redis unreachable); its oldest "
                                    "rows are dropped", self.job_id)
                self._seq += 1
                self._pending.append((self._seq, row))
            if self._reporting is not None:
                self._reporting.put(row)
        except Exception:  # noqa: BLE001 - history is best effort; training goes on
            log.warning("job %s: history row not recorded", self.job_id, exc_info=True)

    def _row(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        for key in STEP_KEYS:
            v = metrics.get(key)
            if isinstance(v, int) and not isinstance(v, bool):
                self._step = v
                break
        row: dict[str, Any] = {"step": self._step, "time": time.time(), "attempt": self.attempt}
        for k, v in metrics.items():
            if k not in row and isinstance(v, (bool, int, float, str)):
                row[k] = v
        return row

    def flush(self) -> int:
        """Write the buffered rows to the job's stream (one pipeline: XADD each, exact XTRIM to
        `job_metrics_maxlen`, EXPIRE); the number written. Connection errors propagate (Redis is
        away: the caller pauses its writes); the rows stay buffered until a write gets through."""
        with self._lock:
            batch = list(self._pending)
        if not batch:
            return 0
        pipe = self.r.pipeline(transaction=True)
        for _seq, row in batch:
            pipe.xadd(self.key, encode_row(row))
        pipe.xtrim(self.key, maxlen=self.maxlen, approximate=False)
        pipe.expire(self.key, self.ttl_s)
        try:
            pipe.execute()
        except redis.ResponseError as exc:  # e.g. OOM under noeviction: kept for the next write
            log.warning("job %s: %d history rows not written (%s); kept for the next write",
                        self.job_id, len(batch), exc)
            return 0
        last = batch[-1][0]
        with self._lock:
            while self._pending and self._pending[0][0] <= last:
                self._pending.popleft()
        return len(batch)

    @property
    def buffered(self) -> int:
        """Rows not yet written to Redis."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Before the job function runs: check and start its reporters (`ReporterMissing` when
        one cannot run on this worker: the job fails at once)."""
        names = self.report_to
        if not names or self._reporting is not None:
            return
        check_reporters(names)
        self._reporting = _Reporting(self, names)
        self._reporting.start()

    def stop(self, exc: BaseException | None = None) -> None:
        """After the job function ended (`exc`: what it raised): write the last rows (best
        effort) and end the reporters' runs (`run_status(exc)`)."""
        try:
            self.flush()
        except (redis.RedisError, OSError) as err:
            log.warning("job %s: %d history rows not written (Redis unreachable: %s)", self.job_id,
                        self.buffered, err)
        reporting, self._reporting = self._reporting, None
        if reporting is not None:
            reporting.stop(run_status(exc))


# ---------------------------------------------------------------------------------------------
# Reporters
# ---------------------------------------------------------------------------------------------


class Reporter(Protocol):
    name: str

    def open(self) -> None: ...

    def write(self, rows: list[dict[str, Any]]) -> None: ...

    def close(self, status: str | None) -> None: ...


class TensorBoardReporter:
    """Scalars per step into a TensorBoard log directory (events files appended per attempt)."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.writer: Any = None

    def open(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for k, v in numeric_metrics(row).items():
                self.writer.add_scalar(k, v, global_step=row["step"], walltime=row["time"])
        self.writer.flush()

    def close(self, status: str | None) -> None:
        if self.writer is not None:
            self.writer.close()


class MLflowReporter:
    """One MLflow run per job (run name = job id), resumed by a retried attempt."""

    name = "mlflow"

    def __init__(self, job_id: str, spec: Any, attempt: int):
        self.job_id = job_id
        self.spec = spec
        self.attempt = attempt
        self.client: Any = None
        self.run_id: str | None = None

    def open(self) -> None:
        from mlflow.environment_variables import MLFLOW_EXPERIMENT_NAME
        from mlflow.tracking import MlflowClient

        client = MlflowClient()  # tracking URI: MLFLOW_TRACKING_URI, as MLflow reads it
        experiment = self._experiment(client, MLFLOW_EXPERIMENT_NAME.get() or "rlhf")
        found = client.search_runs([experiment], filter_string=f"tags.`rlhf.job_id` = '{self.job_id}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"rlhf.job_id": self.job_id, "rlhf.job_type": getattr(self.spec, "type", ""),
                    "rlhf.model": getattr(self.spec, "model_name", "") or ""}
            self.run_id = client.create_run(experiment, run_name=self.job_id,
                                            tags=tags).info.run_id
            self._log_params(client)
        client.set_tag(self.run_id, "rlhf.attempt", str(self.attempt))
        self.client = client

    @staticmethod
    def _experiment(client: Any, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return client.create_experiment(name)
        except MlflowException:  # made by another worker meanwhile
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def _log_params(self, client: Any) -> None:
        from mlflow.entities import Param

        dump = self.spec.model_dump(mode="json") if hasattr(self.spec, "model_dump") else {}
        params = [Param(k[:250], v[:_MLFLOW_MAX_PARAM_CHARS]) for k, v in flatten(dump).items()]
        for i in range(0, len(params), _MLFLOW_MAX_PARAMS):
            client.log_batch(self.run_id, params=params[i:i + _MLFLOW_MAX_PARAMS])

    def write(self, rows: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(k, v, int(row["time"] * 1000), row["step"])
                   for row in rows for k, v in numeric_metrics(row).items()]
        for i in range(0, len(metrics), _MLFLOW_MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_MAX_METRICS])

    def close(self, status: str | None) -> None:
        if self.client is not None and status is not None:
            self.client.set_terminated(self.run_id, status=status)


class _Reporting:
    """The reporters of one run of a job function, in their own thread: opened there, fed the
    rows every `REPORT_INTERVAL_S`, closed with the run's status. Errors are logged (the first of
    each reporter with its traceback), never raised: training goes on."""

    def __init__(self, tracker: JobTracker, names: list[str]):
        self.tracker = tracker
        self.job_id = tracker.job_id
        self._makers: dict[str, Callable[[], Reporter]] = {
            name: self._maker(name) for name in names}
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=tracker.maxlen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._status: str | None = None
        self._errors: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name=f"report-{self.job_id}",
                                        daemon=True)

    def _maker(self, name: str) -> Callable[[], Reporter]:
        t = self.tracker
        if name == "tensorboard":
            log_dir = getattr(t.spec, "logging_dir", None)
            path = Path(log_dir) if log_dir else default_logging_dir(t.settings, t.job_id)
            return lambda: TensorBoardReporter(path)
        return lambda: MLflowReporter(t.job_id, t.spec, t.attempt)

    def start(self) -> None:
        self._thread.start()

    def put(self, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.append(row)

    def stop(self, status: str | None) -> None:
        self._status = status
        self._stop.set()
        self._thread.join(timeout=REPORT_CLOSE_WAIT_S)
        if self._thread.is_alive():
            log.warning("job %s: reporters did not finish within %.0fs; left behind",
                        self.job_id, REPORT_CLOSE_WAIT_S)

    def _failed(self, name: str, what: str) -> None:
        n = self._errors[name] = self._errors.get(name, 0) + 1
        if n == 1:
            log.warning("job %s: report_to %s: %s failed; training goes on", self.job_id, name,
                        what, exc_info=True)
        else:
            log.debug("job %s: report_to %s: %s failed again (%d)", self.job_id, name, what, n,
                      exc_info=True)

    def _run(self) -> None:
        reporters: list[Reporter] = []
        for name, make in self._makers.items():
            try:
                rep = make()
                rep.open()
                reporters.append(rep)
            except Exception:  # noqa: BLE001 - a reporter that cannot start is left out
                self._failed(name, "start")
        while True:
            stopping = self._stop.wait(REPORT_INTERVAL_S)
            with self._lock:
                rows = list(self._rows)
                self._rows.clear()
            if rows:
                for rep in reporters:
                    try:
                        rep.write(rows)
                    except Exception:  # noqa: BLE001 - logged; the next rows are tried again
                        self._failed(rep.name, "write")
            if stopping:
                break
        for rep in reporters:
            try:
                rep.close(self._status)
            except Exception:  # noqa: BLE001
                self._failed(rep.name, "close")
