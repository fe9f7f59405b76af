"""`rlhf loop`: start an online / iterative alignment loop and follow it.

    rlhf loop start FILE [--set KEY=VALUE ...] [--follow]   # FILE: YAML or JSON (a LoopJob spec)
    rlhf loop status ID [--json]                            # the loop's rounds as a table
    rlhf loop follow ID [--interval S] [--timeout S]        # a live table until the loop ends
    rlhf loop plot ID OUT.png                               # held-out score, KL, win rate, ...

`--set` changes one field of the file's spec, by its dotted path (`--set rounds=5 --set
sampling.n=8 --set train.beta=0.2`); the value is read as YAML (a number, true, a list ...), as
text when it is not. Every command takes --redis-url (env RLHF_REDIS_URL). Exit codes: 0 done (a
followed loop that succeeded), 1 a loop that failed or an unknown id, 2 a rejected spec or bad
flags.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

_REDIS = (("--redis-url",), dict(dest="redis_url", default=None,
                                 help="Redis (jobs, loops, the trainer's broker)"))


def add_loop_parser(sub) -> None:
    """`rlhf loop ...` on the rlhf CLI's subparsers (imports nothing heavy)."""
    lp = sub.add_parser("loop", help="online / iterative alignment loops: start, status, follow, "
                        "plot", description=__doc__.split("\n\n")[0])
    lsub = lp.add_subparsers(dest="loop_command", required=True)
    st = lsub.add_parser("start", help="validate a loop spec (YAML or JSON) and queue it")
    st.add_argument("file", type=Path, help="the spec (type 'iterate' is implied)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                    help="override a field by its dotted path (repeatable)")
    st.add_argument("--follow", action="store_true", help="then follow it (as `loop follow`)")
    st.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    st.add_argument("--timeout", type=float, default=None, help=argparse.SUPPRESS)
    ss = lsub.add_parser("status", help="the loop's rounds")
    ss.add_argument("loop_id")
    ss.add_argument("--json", action="store_true", help="print JSON")
    sf = lsub.add_parser("follow", help="a live table of the loop's rounds until it ends")
    sf.add_argument("loop_id")
    sf.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    sf.add_argument("--timeout", type=float, default=None, help="give up after this long")
    sp = lsub.add_parser("plot", help="plot the loop's rounds into a PNG")
    sp.add_argument("loop_id")
    sp.add_argument("out", type=Path)
    for p in (st, ss, sf, sp):
        p.add_argument(*_REDIS[0], **_REDIS[1])


# ------------------------------------------------------------------------------------------------
# The spec file
# ------------------------------------------------------------------------------------------------


class SpecFileError(ValueError):
    pass


def load_spec_file(path: Path, overrides: list[str]) -> dict[str, Any]:
    """The spec in `path` (YAML or JSON) with `--set KEY=VALUE` overrides applied, read as
    `rlhf jobs submit` reads a job spec (rlhf_client.cli.load_spec); `type` defaults to
    `iterate`."""
    from rlhf_client.cli import CliError, load_spec

    try:
        spec = load_spec(str(path), overrides)
    except CliError as exc:
        raise SpecFileError(str(exc)) from None
    spec.setdefault("type", "iterate")
    return spec


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def rounds_table(status):
    """A rich Table of the loop's rounds (round 0: the starting version, measured)."""
    from rich.table import Table

    rec = status.record
    m = rec.metrics if rec is not None else {}
    title = f"loop {rec.id if rec else '?'}: {rec.status if rec else 'unknown'}"
    if rec is not None and rec.status == "running" and "round" in m:
        title += f" (round {m['round']}, {m.get('stage', '')})"
    if status.state.get("stop_reason"):
        title += f", stopped: {status.state['stop_reason']}"
    metric = status.rounds[0].get("held_out_metric", "mean_reward") if status.rounds else ""
    t = Table(title=title)
    for col in ("round", "start → new", "pairs m/h", "held-out " + (
            "reward" if metric == "mean_reward" else "P(≻ orig)"), "KL", "win rate", "seconds",
            "state"):
        t.add_column(col, justify="right" if col not in ("start → new", "state") else "left")
    for r in status.rounds:
        k = r["round"]
        versions = r.get("new_version", "") if k == 0 else \
            f"{r.get('start_version', '?')} → {r.get('new_version', '…')}"
        pairs = "-" if k == 0 else f"{r.get('pairs_machine', r.get('samples', 0))}/" \
                                   f"{r.get('pairs_human', 0)}"
        state = "done" if r.get("done") else ("trained" if r.get("new_version") and k else
                                              "collected" if r.get("collected") else "started")
        if r.get("stop_reason"):
            state += f" (stop: {r['stop_reason']})"
        t.add_row(str(k), versions, pairs, _num(r.get("held_out_score"), ".4f"),
                  _num(r.get("kl"), ".3f"), _num(r.get("win_rate"), ".2f"),
                  f"{sum(r.get('seconds', {}).values()):.1f}", state)
    return t


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------


def cmd_loop(args) -> int:
    from rlhf.cli import _settings_or_exit_code

    prog = f"rlhf loop {args.loop_command}"
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    url = settings.redis_url.get_secret_value()
    if args.loop_command == "start":
        return _start(args, url, prog)
    from rlhf_client.redis_conn import connect

    r = connect(url, decode_responses=True)
    try:
        if args.loop_command == "status":
            return _status(r, args.loop_id, args.json, prog)
        if args.loop_command == "follow":
            return follow(r, args.loop_id, interval=args.interval, timeout=args.timeout, prog=prog)
        return _plot(r, args.loop_id, args.out, prog)
    finally:
        r.close()


def _start(args, url: str, prog: str) -> int:
    from rlhf_client.training import TrainingClient

    from rlhf.trainer.jobs import JobRejected

    try:
        spec = load_spec_file(args.file, args.overrides)
    except SpecFileError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    with TrainingClient(url) as tc:
        try:
            loop_id = tc.submit(spec)
        except JobRejected as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return 2
    print(loop_id, flush=True)
    if not args.follow:
        return 0
    from rlhf_client.redis_conn import connect

    r = connect(url, decode_responses=True)
    try:
        return follow(r, loop_id, interval=args.interval, timeout=args.timeout, prog=prog)
    finally:
        r.close()


def _read(r, loop_id: str, prog: str):
    from rlhf.trainer.loop import read_loop

    status = read_loop(r, loop_id)
    if status.record is None or status.record.type != "iterate":
        print(f"{prog}: no loop {loop_id!r}", file=sys.stderr)
        return None
    return status


def _status(r, loop_id: str, as_json: bool, prog: str) -> int:
    status = _read(r, loop_id, prog)
    if status is None:
        return 1
    if as_json:
        print(json.dumps(status.to_dict(), indent=2, sort_keys=True, default=str))
        return 0
    from rich.console import Console

    console = Console()
    console.print(rounds_table(status))
    if status.record.error:
        console.print(f"[red]error:[/] {status.record.error}")
    return 0


def follow(r, loop_id: str, *, interval: float = 2.0, timeout: float | None = None,
           prog: str = "rlhf loop follow") -> int:
    """A live table of the loop until its record is terminal: 0 when it succeeded, 1 when it
    failed (or is unknown, or `timeout` passed)."""
    from rich.console import Console
    from rich.live import Live

    status = _read(r, loop_id, prog)
    if status is None:
        return 1
    console = Console()
    deadline = None if timeout is None else time.monotonic() + timeout
    with Live(rounds_table(status), console=console, refresh_per_second=4) as live:
        while not status.record.done:
            if deadline is not None and time.monotonic() >= deadline:
                break
            time.sleep(interval)
            status = _read(r, loop_id, prog) or status
            live.update(rounds_table(status))
    if not status.record.done:
        print(f"{prog}: loop {loop_id} still {status.record.status} after {timeout:g}s",
              file=sys.stderr)
        return 1
    if status.record.status != "succeeded":
        console.print(f"[red]loop failed:[/] {status.record.error}")
        return 1
    return 0


def _plot(r, loop_id: str, out: Path, prog: str) -> int:
    from rlhf.trainer.loop import plot_loop

    status = _read(r, loop_id, prog)
    if status is None:
        return 1
    try:
        model = status.record.spec.get("model_name")
        plot_loop(status.rounds, out, title=f"loop {loop_id} ({model})")
    except (OSError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    print(f"plot written to {out}", file=sys.stderr)
    return 0


__all__ = ["add_loop_parser", "cmd_loop", "follow", "load_spec_file", "rounds_table"]
