"""`rlhf labels`: the leaderboard and agreement from the votes stream, and annotator tokens.

    rlhf labels leaderboard [--stream S] [--bootstrap N] [--seed N] [--anchor MODEL=RATING]
                            [--plot OUT.png] [--json]
    rlhf labels agreement [--stream S] [--json]
    rlhf labels annotators add NAME [--replace] [--json]   # prints the new token, once
    rlhf labels annotators list [--stream S] [--json]
    rlhf labels annotators remove NAME [--json]

Every command takes --redis-url (env RLHF_REDIS_URL) and --debug. The votes come from the votes
stream the labelling app writes (`rlhf.labels.votes.VOTES_STREAM`). Annotator tokens live in the
Redis hash `TOKENS_KEY`: field sha256(token) hex → annotator id; the token itself is printed
once by `add` and stored nowhere. The labelling app also takes tokens from a file.

Exit codes: 0 done; 1 a failure (Redis unreachable, nothing to remove, the plot could not be
drawn), one line on stderr; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# Redis hash of annotator tokens (field sha256(token) hex → annotator id) and the annotator id
# rule: the app's login reads what these commands write.
from rlhf.labels.auth import ANNOTATOR_RE, TOKENS_KEY, new_token
from rlhf.labels.auth import token_digest as token_hash


def add_labels_parser(sub) -> None:
    """Add `labels` to the rlhf CLI's subparsers (imports nothing heavy)."""
    from rlhf.labels.votes import VOTES_STREAM

    labels = sub.add_parser("labels", help="human votes: leaderboard, agreement, annotator tokens")
    lsub = labels.add_subparsers(dest="labels_command", required=True)

    def leaf(parent, name: str, help_: str, *, stream: bool = True) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_)
        p.add_argument("--redis-url", dest="redis_url", default=None,
                       help="Redis of the votes stream and the tokens (env RLHF_REDIS_URL)")
        if stream:
            p.add_argument("--stream", default=VOTES_STREAM,
                           help=f"the votes stream (default {VOTES_STREAM})")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.add_argument("--debug", action="store_true",
                       help="on failure print the traceback (default: one line naming the cause)")
        return p

    lb = leaf(lsub, "leaderboard", "Bradley–Terry ratings (ties half) with bootstrap intervals, "
              "and Elo, of the models the votes compare")
    lb.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="bootstrap rounds for the 95%% intervals (0: none; default 1000)")
    lb.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    lb.add_argument("--anchor", default=None, metavar="MODEL=RATING",
                    help="shift the ratings so MODEL has RATING (default: they average 1000)")
    lb.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                    help="also draw the ratings with their intervals into this PNG")
    leaf(lsub, "agreement", "agreement and Cohen's kappa on items labelled by two or more "
         "annotators")

    ann = lsub.add_parser("annotators", help="annotator tokens in Redis: add, list, remove")
    asub = ann.add_subparsers(dest="annotators_command", required=True)
    add = leaf(asub, "add", "make a token for an annotator (printed once; its sha256 is stored)",
               stream=False)
    add.add_argument("name", help="annotator id (letters, digits, . _ @ + -)")
    add.add_argument("--replace", action="store_true",
                     help="revoke the annotator's existing tokens (default: refuse when it "
                     "has one)")
    leaf(asub, "list", "annotators with tokens in Redis, and every annotator's vote count")
    rm = leaf(asub, "remove", "revoke every token of an annotator", stream=False)
    rm.add_argument("name")


def cmd_labels(args) -> int:
    """Run `rlhf labels …` (exit codes in the module docstring)."""
    import redis

    from rlhf.cli import _report, _settings_or_exit_code

    command = args.labels_command
    if command == "annotators":
        command = f"annotators {args.annotators_command}"
    prog = f"rlhf labels {command}"
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    try:
        options = _check(args)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    from rlhf_client.redis_conn import connect

    try:
        client = connect(settings.redis_url.get_secret_value())
    except ValueError as exc:  # not a Redis URL
        print(f"{prog}: --redis-url: {exc}", file=sys.stderr)
        return 2
    try:
        return _HANDLERS[command](args, client, options)
    except redis.RedisError as exc:  # unreachable, timed out, a key of the wrong type ...
        return _report(prog, exc, args.debug, started=True)
    except _Failure as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()


class _Failure(Exception):
    """A command that cannot do what was asked (exit 1, the message on stderr)."""


def _check(args) -> dict[str, Any]:
    """Arguments argparse cannot check; ValueError naming the flag."""
    out: dict[str, Any] = {}
    if args.labels_command == "leaderboard":
        if args.bootstrap < 0:
            raise ValueError(f"--bootstrap: must be ≥ 0, got {args.bootstrap}")
        if args.anchor is not None:
            model, sep, value = args.anchor.rpartition("=")
            try:
                rating = float(value)
            except ValueError:
                rating = math.nan
            if not sep or not model or not math.isfinite(rating):
                raise ValueError(f"--anchor: expected MODEL=RATING (e.g. policy@v3=1000), got "
                                 f"{args.anchor!r}")
            out["anchor"] = (model, rating)
    if getattr(args, "name", None) is not None and not ANNOTATOR_RE.fullmatch(args.name):
        raise ValueError(f"NAME: an annotator id is 1-64 letters, digits or . _ @ + - (starting "
                         f"with a letter or digit), got {args.name!r}")
    return out


def _print(payload: Any, as_json: bool, text: str) -> None:
    print(json.dumps(payload, indent=2, ensure_ascii=False) if as_json else text)


def _read(client, stream: str):
    from rlhf.labels.votes import read_votes

    return read_votes(client, stream)


# ------------------------------------------------------------------------------------------------
# leaderboard, agreement
# ------------------------------------------------------------------------------------------------


def _leaderboard(args, client, options) -> int:
    from rlhf.labels.leaderboard import battles_from_votes, leaderboard_from_battles

    votes = _read(client, args.stream)
    battles = battles_from_votes(votes)
    try:
        rows = leaderboard_from_battles(battles, bootstrap_rounds=args.bootstrap, seed=args.seed,
                                        anchor=options.get("anchor"))
    except ValueError as exc:  # the anchor names no model of the votes
        raise _Failure(str(exc)) from None
    payload = {"stream": args.stream, "votes": len(votes), "battles": len(battles),
               "bootstrap": args.bootstrap, "seed": args.seed,
               "rows": [r.as_dict() for r in rows]}
    head = (f"{len(votes)} votes, {len(battles)} battles between {len(rows)} models "
            f"({args.bootstrap} bootstrap rounds)")
    lines = [head]
    if rows:
        width = max(5, *(len(r.model) for r in rows))
        lines.append(f"{'rank':>4}  {'model':{width}}  {'rating':>7}  {'95% CI':>17}  {'elo':>7}  "
                     f"{'battles':>7}  {'won':>5}  {'lost':>5}  {'tied':>5}")
        for r in rows:
            ci = "-" if r.ci_low is None else f"[{r.ci_low:7.1f}, {r.ci_high:7.1f}]"
            lines.append(f"{r.rank:>4}  {r.model:{width}}  {r.rating:7.1f}  {ci:>17}  "
                         f"{r.elo:7.1f}  {r.battles:>7}  {r.wins:>5}  {r.losses:>5}  {r.ties:>5}")
    else:
        lines.append("(no votes compare two different models yet)")
    _print(payload, args.json, "\n".join(lines))
    if args.plot is not None:
        from rlhf.labels.leaderboard import plot_leaderboard

        try:
            plot_leaderboard(rows, args.plot)
        except ImportError as exc:
            raise _Failure(f"--plot needs matplotlib (the rlhf[train] extra): {exc}") from None
        except OSError as exc:
            raise _Failure(f"--plot {args.plot}: {exc}") from None
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _agreement(args, client, options) -> int:
    from rlhf.labels.leaderboard import agreement

    votes = _read(client, args.stream)
    got = agreement(votes)

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"{len(votes)} votes; {got.items} items labelled by two or more annotators "
             f"({got.label_pairs} label pairs)",
             f"agreement {num(got.agreement)}  Cohen's kappa {num(got.kappa)}"]
    if got.by_annotators:
        width = max(10, *(len(" / ".join(p.annotators)) for p in got.by_annotators))
        lines.append(f"{'annotators':{width}}  {'items':>5}  {'agree':>6}  {'kappa':>6}")
        lines += [f"{' / '.join(p.annotators):{width}}  {p.items:>5}  {num(p.agreement):>6}  "
                  f"{num(p.kappa):>6}" for p in got.by_annotators]
    _print({"stream": args.stream, "votes": len(votes), **got.as_dict()}, args.json,
           "\n".join(lines))
    return 0


# ------------------------------------------------------------------------------------------------
# annotators
# ------------------------------------------------------------------------------------------------


def _tokens_by_annotator(client) -> dict[str, list[bytes]]:
    """annotator id → the token hashes (fields of TOKENS_KEY) that log it in."""
    out: dict[str, list[bytes]] = defaultdict(list)
    for field, name in client.hgetall(TOKENS_KEY).items():
        out[name.decode("utf-8", "replace")].append(field)
    return out


def _annotators_add(args, client, options) -> int:
    old = _tokens_by_annotator(client).get(args.name, [])
    if old and not args.replace:
        raise _Failure(f"annotator {args.name!r} already has {len(old)} token(s); pass --replace "
                       "to revoke them and make a new one")
    token = new_token()
    with client.pipeline(transaction=True) as pipe:  # revoke and add in one MULTI/EXEC
        if old:
            pipe.hdel(TOKENS_KEY, *old)
        pipe.hset(TOKENS_KEY, token_hash(token), args.name)
        pipe.execute()
    if args.json:
        _print({"annotator": args.name, "token": token, "revoked": len(old)}, True, "")
    else:
        print(token)
        print(f"token for annotator {args.name!r} (shown once; Redis keeps only its sha256"
              f"{f'; {len(old)} old token(s) revoked' if old else ''})", file=sys.stderr)
    return 0


def _annotators_list(args, client, options) -> int:
    tokens = _tokens_by_annotator(client)
    votes = Counter(v.annotator for v in _read(client, args.stream))
    names = sorted(set(tokens) | set(votes))
    rows = [{"annotator": n, "tokens": len(tokens.get(n, ())), "votes": votes.get(n, 0)}
            for n in names]
    width = max(9, *(len(n) for n in names)) if names else 9
    text = "\n".join([f"{'annotator':{width}}  {'tokens':>6}  {'votes':>6}"]
                     + [f"{r['annotator']:{width}}  {r['tokens']:>6}  {r['votes']:>6}"
                        for r in rows]) if rows else "(no annotators)"
    _print(rows, args.json, text)
    return 0


def _annotators_remove(args, client, options) -> int:
    fields = _tokens_by_annotator(client).get(args.name, [])
    removed = client.hdel(TOKENS_KEY, *fields) if fields else 0
    if not removed:
        raise _Failure(f"annotator {args.name!r} has no token in Redis ({TOKENS_KEY})")
    _print({"annotator": args.name, "revoked": removed}, args.json,
           f"revoked {removed} token(s) of annotator {args.name!r}")
    return 0


_HANDLERS = {
    "leaderboard": _leaderboard,
    "agreement": _agreement,
    "annotators add": _annotators_add,
    "annotators list": _annotators_list,
    "annotators remove": _annotators_remove,
}
