"""A training job's per-step history: read it from Redis, draw it.

Every `progress` call of a running job adds one row to the job's Redis stream
`rlhf:job:<id>:metrics` (written by the trainer's `rlhf.trainer.tracking.JobTracker`):

    step      the training step (the job's `step` metric; a loop job's `round`; rows without one,
              such as the first (item counts) and the last (held-out metrics), carry the step
              before them, 0 at the start)
    time      when the job reported it (unix seconds, the worker's clock)
    attempt   the job's attempt (a retried job continues the same stream)
    ...       the job's metrics: numbers, strings and booleans (lists and mappings are left to
              the job record)

Each stream field holds its value as JSON. The stream keeps the newest `job_metrics_maxlen` rows
and expires `job_record_ttl_s` after its last write, like the job record.

Base install only: nothing here imports the server package; matplotlib is imported by
`plot_metrics` alone (`pip install 'rlhf[train]'` brings it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis

from rlhf_client.training import job_key

#: The fields every row has besides the job's metrics.
ROW_FIELDS = ("step", "time", "attempt")
#: Clock difference tolerated between the worker that wrote rows and the Redis server whose
#: clock numbers the stream entries (`read_metrics(since=...)` reads this much further back,
#: then keeps the rows whose own `time` is after `since`).
_CLOCK_SLACK_S = 300.0


def metrics_key(job_id: str) -> str:
    """The Redis stream holding job `job_id`'s history."""
    return job_key(job_id) + ":metrics"


def encode_row(row: Mapping[str, Any]) -> dict[str, str]:
    """A row as stream fields (each value JSON); values that are not a number, string or boolean
    are left out."""
    # NaN and infinities are written as Python's json writes them (NaN, Infinity) and read back.
    return {str(k): json.dumps(v) for k, v in row.items() if isinstance(v, (bool, int, float, str))}


def decode_row(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """Stream fields (bytes or str) back into a row: `step`, `time`, `attempt`, then the metrics
    in the order the job reported them."""
    row: dict[str, Any] = {}
    for k, v in fields.items():
        key = k.decode() if isinstance(k, bytes) else str(k)
        text = v.decode() if isinstance(v, bytes) else str(v)
        try:
            row[key] = json.loads(text)
        except ValueError:  # not written by encode_row: kept as text
            row[key] = text
    step, when, attempt = row.pop("step", 0), row.pop("time", 0.0), row.pop("attempt", None)
    head: dict[str, Any] = {"step": int(step), "time": float(when)}
    if attempt is not None:
        head["attempt"] = int(attempt)
    return {**head, **row}


def read_metrics(r: redis.Redis, job_id: str, *, since: float | None = None,
                 count: int | None = None) -> list[dict[str, Any]]:
    """Job `job_id`'s history rows, oldest first (`[]` when it has none, or it expired).

    `since` (unix seconds): only rows the job reported after then; `count`: only the newest
    `count` rows (after `since`). Works with clients made with `decode_responses` True or False.
    """
    key = metrics_key(job_id)
    low = "-" if since is None else str(max(0, int((since - _CLOCK_SLACK_S) * 1000)))
    if count is not None and since is None:
        entries = list(reversed(r.xrevrange(key, "+", low, count=max(0, count)))) if count > 0 else []
    else:
        entries = r.xrange(key, low, "+")
    rows = [decode_row(fields) for _id, fields in entries]
    if since is not None:
        rows = [row for row in rows if row["time"] > since]
        if count is not None:
            rows = rows[-count:] if count > 0 else []
    return rows


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's numeric metrics (booleans and the row's own fields left out): what is plotted,
    and what the trainer's reporters send to TensorBoard and MLflow."""
    return {k: float(v) for k, v in row.items()
            if k not in ROW_FIELDS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def metric_names(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Every numeric metric of `rows`, in first-seen order."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(numeric_metrics(row)))
    return list(names)


def curve_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The numeric metrics of `rows` that make a curve: reported at two steps or more with more
    than one value (a count reported once, or a constant such as `steps`, is no curve); every
    numeric metric when none does."""
    names = metric_names(rows)
    curves = []
    for name in names:
        values = {row["step"]: v for row in rows if (v := numeric_metrics(row).get(name)) is not None}
        if len(values) >= 2 and len(set(values.values())) > 1:
            curves.append(name)
    return curves or names


def plot_metrics(rows: Sequence[Mapping[str, Any]], png: str | Path, title: str | None = None,
                 keys: Sequence[str] | None = None) -> Path:
    """Draw `rows` (from `read_metrics`) to `png`: one panel per metric (`keys`, or every one
    that makes a curve: `curve_names`), against the step. Needs matplotlib
    (`pip install 'rlhf[train]'`); the file's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting job metrics needs matplotlib: pip install matplotlib "
                          "(or pip install 'rlhf[train]')") from exc
    names = list(keys) if keys is not None else curve_names(rows)
    if not names:
        raise ValueError("no numeric metrics to plot" + ("" if rows else ": the job has no history"))
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    try:
        for ax, name in zip(axes.flat, names):
            points = [(row["step"], v) for row in rows
                      if (v := numeric_metrics(row).get(name)) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 50 else None, linewidth=1.2)
            else:
                ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out = Path(png)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        return out
    finally:
        plt.close(fig)
