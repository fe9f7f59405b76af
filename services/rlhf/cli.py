"""The `rlhf` command. Flags that share a name with a setting override it (env: RLHF_<NAME>).

`rlhf jobs` and `rlhf models` are the client's (`rlhf_client.cli`, the base install): `main`
hands them over before this package's parser is built; their server-side leaves (`jobs reap`,
`models add-token`, `models import`) and every other command run here. On an install without
a command's extra (`serve`, `train`), the command says so in one line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import traceback
from pathlib import Path

from rlhf import __version__

# Flags mapped onto Settings fields: dest == field name. Each is also readable from RLHF_<FIELD>.
_SERVE_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--model",), dict(dest="model_dir", type=Path, help="serve this HF directory, pinned")),
    (("--model-name",), dict(dest="model_name", help="serve and follow this model's active version")),
    (("--store",), dict(dest="store_dir", type=Path, help="model store root")),
    (("--host",), dict(dest="host")),
    (("--port",), dict(dest="port", type=int)),
    (("--metrics-port",), dict(dest="metrics_port", type=int)),
    (("--device",), dict(dest="device", help="torch device (hf backend)")),
    (("--dtype",), dict(dest="dtype", choices=["float32", "bfloat16", "float16", "auto"])),
    (("--max-batch-size",), dict(dest="batch_max_size", type=int)),
    (("--max-batch-tokens",), dict(dest="batch_max_tokens", type=int)),
    (("--max-wait-ms",), dict(dest="batch_max_wait_ms", type=float)),
    (("--drain-grace",), dict(dest="drain_grace_s", type=float, help="SIGTERM grace seconds")),
    (("--redis-url",), dict(dest="redis_url")),
    (("--log-level",), dict(dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])),
    (("--torch-threads",), dict(dest="torch_threads", type=int, help="torch intra-op threads")),
    # gRPC TLS (issue 18): cert + key = TLS; + client CA = mutual TLS; health port: plaintext probes
    (("--tls-cert",), dict(dest="tls_cert_file", type=Path, help="PEM server certificate (TLS)")),
    (("--tls-key",), dict(dest="tls_key_file", type=Path, help="PEM key of --tls-cert")),
    (("--tls-client-ca",), dict(dest="tls_client_ca_file", type=Path,
                                help="PEM CA: require client certificates it signed (mutual TLS)")),
    (("--health-port",), dict(dest="health_port", type=int,
                              help="plaintext port serving only grpc.health.v1 (probes)")),
]
_VLLM_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--backend",), dict(dest="backend", choices=["hf", "vllm"], help="policy engine")),
    (("--max-model-len",), dict(dest="vllm_max_model_len", type=int)),
    (("--gpu-memory-utilization",), dict(dest="vllm_gpu_memory_utilization", type=float)),
    (("--kv-cache-space-gb",), dict(dest="vllm_kv_cache_space_gb", type=float)),
    (("--tensor-parallel-size",), dict(dest="vllm_tensor_parallel_size", type=int)),
    (("--enforce-eager",), dict(dest="vllm_enforce_eager", action="store_const", const=True)),
    (("--max-num-seqs",), dict(dest="vllm_max_num_seqs", type=int)),
]
# `rlhf rollout`: the settings it reads (the rest of its flags are rollout options, below).
_ROLLOUT_SETTINGS_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--redis-url",), dict(dest="redis_url", help="Redis of the streams and the registry")),
    (("--max-deliveries",), dict(dest="queue_max_deliveries", type=int,
                                 help="a prompt delivered more often is dead-lettered")),
    (("--claim-idle-ms",), dict(dest="rollout_claim_idle_ms", type=int,
                                help="a prompt pending this long is retried / taken over")),
    (("--host",), dict(dest="host", help="address the /metrics endpoint binds")),
    (("--metrics-port",), dict(dest="metrics_port", type=int, help="/metrics port (0: any)")),
    (("--log-level",), dict(dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])),
]
# Policy-only: the OpenAI-compatible HTTP front (rlhf.policy.http) beside the gRPC API.
_POLICY_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--http-port",), dict(dest="http_port", type=int,
                            help="port of the OpenAI-compatible HTTP front (0: a free one; unset: off)")),
]


def _add(parser: argparse.ArgumentParser, flags) -> None:
    for names, kwargs in flags:
        parser.add_argument(*names, default=None, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The whole CLI; deploy manifests are tested against this parser."""
    p = argparse.ArgumentParser(prog="rlhf", description="RLHF as services.")
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="make a small random-init HF model with its tokenizer")
    tiny.add_argument("--kind", choices=["policy", "reward"], required=True)
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--size", choices=["tiny", "small"], default="tiny")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--untied", action="store_true", help="untied input/output embeddings")

    serve = sub.add_parser("serve", help="run a model service")
    serve_sub = serve.add_subparsers(dest="service", required=True)
    for name, help_ in (
        ("policy", "PolicyService: generation"),
        ("reward", "RewardService: Bradley–Terry scores"),
        ("reference", "ReferenceService: reference log-probs"),
    ):
        sp = serve_sub.add_parser(name, help=help_)
        _add(sp, _SERVE_FLAGS)
        if name == "policy":
            _add(sp, _VLLM_FLAGS)
            _add(sp, _POLICY_FLAGS)
        _add_debug(sp)
    try:
        from rlhf.labels.app import add_serve_labels_parser
    except ImportError:  # the base install: listed; `main` says which extra runs it
        serve_sub.add_parser("labels", help="the labelling web app (rlhf[serve])")
    else:
        add_serve_labels_parser(serve_sub)  # the labelling web app (its own flags)

    _add_rollout_parser(sub)
    try:
        from rlhf.trainer.backtracking import add_backtracking_parser
    except ImportError:  # the base install: listed; `main` says which extra runs it
        sub.add_parser("backtracking", help="the reset-token recipe's data and evaluations "
                       "(rlhf[serve])")
    else:
        add_backtracking_parser(sub)
    from rlhf.labels.cli import add_labels_parser

    add_labels_parser(sub)  # rlhf labels leaderboard | agreement | annotators
    from rlhf.trainer.judge import add_judge_parser

    add_judge_parser(sub)  # rlhf judge compare
    from rlhf.trainer.loop_cli import add_loop_parser

    add_loop_parser(sub)  # rlhf loop start | status | follow | plot

    demo = sub.add_parser("demo", help="the main job on the embedded default")
    demo.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    demo.add_argument("--pairs", type=int, default=300, help="synthetic preference pairs to push")
    demo.add_argument("--recipe", choices=["banana", "backtracking"], default="banana",
                      help="banana: teach the policy to say banana (--algo picks DPO, PPO or GRPO); "
                      "backtracking: the reset-token recipe's four rows (SFT / SFT + DPO, with "
                      "and without backtracking)")
    from rlhf.backtracking_demo import add_arguments as add_backtracking_arguments
    from rlhf.demo import add_demo_arguments

    add_demo_arguments(demo)
    add_backtracking_arguments(demo)
    _add_debug(demo)

    from rlhf.trainer.cli import add_parsers as add_trainer_parsers

    add_trainer_parsers(sub)  # worker, jobs, models
    _add_debug(sub.choices["worker"])
    return p


def _add_rollout_parser(sub) -> None:
    ro = sub.add_parser(
        "rollout", help="rollout worker: prompts → policy → reward → reference → ScoredSamples",
        description="Answer prompts with n scored samples each (ScoredSample, pushed to the "
        "samples stream). Prompts come from a stream (long-running; SIGTERM finishes the "
        "batches in flight and exits), a JSONL file of {\"id\", \"prompt\"} rows, or --prompt "
        "flags (both exit when every prompt is done).")
    ro.add_argument("--policy", required=True, metavar="TARGET", help="PolicyService host:port")
    ro.add_argument("--reward", required=True, metavar="TARGET", help="RewardService host:port")
    ro.add_argument("--reference", required=True, metavar="TARGET", help="ReferenceService host:port")
    ro.add_argument("--model-name", dest="rollout_model_name", metavar="NAME", default=None,
                    help="registry name the policy follows (default: none, unless the policy says "
                    "it follows one); "
                    "samples of a version that is no longer active are discarded and regenerated")
    add_prompt_source_flags(
        ro, stream="read RolloutPrompts from this stream (the default source: rlhf:queue:prompts)",
        file='JSONL rows {"id": ..., "prompt": "..."}; sample ids derive from the ids',
        prompt="a prompt (repeatable)")
    ro.add_argument("--group", default=None, help="consumer group on the prompts stream (rollout)")
    ro.add_argument("--consumer", default=None, help="consumer name (default host-pid-random)")
    ro.add_argument("--samples-stream", default=None, help="where ScoredSamples go "
                    "(default rlhf:queue:samples)")
    ro.add_argument("--n", type=int, default=4, help="samples per prompt (the group size)")
    ro.add_argument("--batch-prompts", type=int, default=8, help="prompts per Generate call")
    ro.add_argument("--concurrency", type=int, default=2, help="batches in flight at once")
    ro.add_argument("--max-new-tokens", type=int, default=None, help="default: the policy's")
    ro.add_argument("--temperature", type=float, default=1.0)
    ro.add_argument("--top-p", type=float, default=None)
    ro.add_argument("--top-k", type=int, default=None)
    ro.add_argument("--seed", type=int, default=0, help="base seed of the batches' request seeds")
    ro.add_argument("--rpc-timeout", type=float, default=120.0, help="deadline of each RPC (s)")
    _add(ro, _ROLLOUT_SETTINGS_FLAGS)
    _add_debug(ro)


def add_prompt_source_flags(parser: argparse.ArgumentParser, *, stream: str, file: str,
                            prompt: str) -> None:
    """Where prompts come from, one of: `--prompts-stream STREAM`, `--prompts-file JSONL`,
    `--prompt TEXT` (repeatable; dest `prompts`), with these help texts."""
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--prompts-stream", metavar="STREAM", default=None, help=stream)
    src.add_argument("--prompts-file", type=Path, metavar="JSONL", default=None, help=file)
    src.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT", default=None,
                     help=prompt)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="on failure print the traceback (default: one line naming the cause)")


def settings_from_args(args: argparse.Namespace):
    from rlhf.config import Settings

    overrides = {
        k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None
    }
    return Settings(**overrides)


def setup_logging(level: str) -> None:
    from rlhf.serving.interceptors import RequestIdFilter

    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _serve(args) -> int:
    if args.service == "labels":
        from rlhf.labels.app import serve_labels

        return serve_labels(args)
    prog = f"rlhf serve {args.service}"
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    setup_logging(settings.log_level)
    logging.getLogger("rlhf").info("settings: %s", json.dumps(settings.redacted(), default=str))
    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if args.service == "policy":
        from rlhf.policy.app import make_policy_app as make
    elif args.service == "reward":
        from rlhf.reward.app import make_reward_app as make
    else:
        from rlhf.reference.app import make_reference_app as make
    app = None
    try:
        from rlhf.tracing import setup as setup_tracing

        setup_tracing(settings, args.service)  # off unless RLHF_OTEL
        app = make(settings)
        asyncio.run(app.run_forever())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - reported as one line (the traceback with --debug)
        return _report(prog, exc, args.debug, started=app is not None and app.started)
    return 0


# ------------------------------------------------------------------------------------------------
# Failures as one line: the cause and the setting to change
# ------------------------------------------------------------------------------------------------

_SECRET_FIELDS = ("auth_token", "admin_token", "redis_url")


def _flags() -> dict[str, str]:
    """Settings field → its CLI flag."""
    from rlhf.trainer.cli import _COMMON, _WORKER

    out: dict[str, str] = {}
    for names, kwargs in [*_SERVE_FLAGS, *_VLLM_FLAGS, *_POLICY_FLAGS, *_COMMON, *_WORKER,
                          *_ROLLOUT_SETTINGS_FLAGS]:
        out.setdefault(kwargs["dest"], names[0])
    return out


def setting_hint(fields) -> str:
    """"set --port / RLHF_PORT or --host / RLHF_HOST" for the given Settings fields."""
    flags = _flags()
    ways = [f"{flags[f]} / RLHF_{f.upper()}" if f in flags else f"RLHF_{f.upper()}" for f in fields]
    return f"set {' or '.join(ways)}" if ways else ""


def _one_line(text: str) -> str:
    from rlhf_client.cli import one_line

    return one_line(text)


def describe_failure(exc: BaseException, *, redis_url: str | None = None) -> str:
    """One line for a failure: a StartupError's cause and settings; a failure the client's CLI
    knows (Redis unreachable, a bad Redis URL, an unknown job / model / version, a missing or
    unsafe checkpoint directory, ...: `rlhf_client.cli.known_failure`); otherwise the
    exception's type and first line."""
    from rlhf_client.cli import known_failure

    from rlhf.errors import StartupError

    if isinstance(exc, StartupError):
        hint = setting_hint(exc.settings)
        return _one_line(f"{exc.cause} ({hint})" if hint else exc.cause)
    known = known_failure(exc, redis_url=redis_url)
    if known is not None:
        return known[0]
    first = next((ln for ln in str(exc).splitlines() if ln.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return _one_line(f"{text} (run with --debug for the traceback)")


def _report(prog: str, exc: BaseException, debug: bool, *, started: bool = False,
            redis_url: str | None = None) -> int:
    """Print the failure as one line on stderr (after the traceback with --debug); exit code 1.
    `redis_url`: the Redis the command used (named, without credentials, when unreachable)."""
    if debug:
        traceback.print_exception(exc)
    logging.shutdown()  # flush log lines first: the cause is the last line
    print(f"{prog}: {'failed' if started else 'cannot start'}: "
          f"{describe_failure(exc, redis_url=redis_url)}", file=sys.stderr)
    return 1


def _settings_or_exit_code(prog: str, args):
    """The settings, or exit code 2 after one line naming each bad setting."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError
    from rlhf_client.cli import redis_url_problem

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"{prog}: {describe_validation(exc)}", file=sys.stderr)
    except SettingsError as exc:
        print(f"{prog}: invalid settings: {_one_line(str(exc))}", file=sys.stderr)
    else:
        problem = redis_url_problem(settings.redis_url.get_secret_value())
        if problem is None:
            return settings
        print(f"{prog}: {problem}", file=sys.stderr)
    return 2


def describe_validation(exc) -> str:
    """A pydantic ValidationError of Settings as one line: each bad value, why, what to set."""
    problems, fields = [], []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        field = str(err["loc"][0]) if err.get("loc") else None
        if field is None:
            problems.append(msg)
            continue
        fields.append(field)
        value = "***" if field in _SECRET_FIELDS else repr(err.get("input"))
        problems.append(f"{field}={value}: {msg}")
    hint = setting_hint(dict.fromkeys(fields))
    return _one_line(f"invalid setting: {'; '.join(problems)}" + (f" ({hint})" if hint else ""))


def _tiny(args) -> int:
    from rlhf.models.tiny import make_tiny_model

    path = make_tiny_model(args.kind, args.out, size=args.size, seed=args.seed, tie_embeddings=not args.untied)
    print(path)
    return 0


def _demo(args) -> int:
    import redis

    from rlhf.demo import run_demo
    from rlhf.errors import StartupError

    try:
        if args.recipe == "backtracking":
            from rlhf.backtracking_demo import run_backtracking_demo

            return run_backtracking_demo(args)
        return run_demo(args)
    except KeyboardInterrupt:
        return 130
    except redis.ConnectionError as exc:
        from rlhf_client.redis_conn import redact_url

        cause = StartupError(f"Redis at {redact_url(args.redis_url)} is unreachable ({exc}); the demo needs a "
                             "redis-server there")
        cause.__traceback__ = exc.__traceback__
        return _report("rlhf demo", cause, args.debug, started=True)
    except Exception as exc:  # noqa: BLE001 - reported as one line (the traceback with --debug)
        return _report("rlhf demo", exc, args.debug, started=True)


#: Sub-commands whose handler lives in its own module (imported only when the command runs).
_COMMAND_MODULES: dict[str, tuple[str, str]] = {
    "backtracking": ("rlhf.trainer.backtracking", "cmd_backtracking"),
    "labels": ("rlhf.labels.cli", "cmd_labels"),
    "judge": ("rlhf.trainer.judge", "cmd_judge"),
    "loop": ("rlhf.trainer.loop_cli", "cmd_loop"),
}


#: What a command needs beyond the base install: an extra, checked by a few of its modules.
_EXTRA_MODULES = {"serve": ("torch", "transformers", "pydantic_settings", "prometheus_client"),
                  "train": ("celery",)}
_TRAIN_COMMANDS = frozenset({"worker", "worker-probe", "demo"})


def main(argv: list[str] | None = None) -> int:
    """`rlhf ...`: `jobs` / `models` go to the client's CLI (no server import), the rest here."""
    from rlhf_client import cli as client

    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # top level: flags only
    if command in client.GROUPS:
        return client.main(argv, server=_server_main)
    return _server_main(argv, command)


def _server_main(argv: list[str], command: str | None = None, leaf: str | None = None) -> int:
    """A command of this package (`leaf`: a server-side leaf of jobs / models). One line and
    exit 1 when the command's extra is not installed; known failures as one line."""
    from rlhf_client.cli import SERVER_LEAVES, known_failure

    parser = build_parser()
    if command in _subcommands(parser) and not {"-h", "--help"} & set(argv):
        extra = (SERVER_LEAVES[command][leaf][1] if command in SERVER_LEAVES
                 else "train" if command in _TRAIN_COMMANDS else "serve")
        missing = _missing_module(extra)
        if missing is not None:
            if command == "serve":  # name the service
                rest = argv[argv.index(command) + 1:]
                leaf = next((a for a in rest if not a.startswith("-")), None)
            where = " ".join(x for x in ("rlhf", command, leaf) if x)
            print(f"{where}: needs the {extra} extra ({missing} is not installed): "
                  f"pip install 'rlhf[{extra}]'", file=sys.stderr)
            return 1
    args = parser.parse_args(argv)
    handlers = {"tiny-model": _tiny, "serve": _serve, "demo": _demo, "rollout": _rollout}
    try:
        if args.command in ("worker", "worker-probe", "jobs", "models"):
            return _trainer(args)
        if args.command in _COMMAND_MODULES:
            import importlib

            module, name = _COMMAND_MODULES[args.command]
            return getattr(importlib.import_module(module), name)(args)
        return handlers[args.command](args)
    except Exception as exc:  # a known cause (Redis away, a bad URL ...) as one line
        if known_failure(exc) is None:
            raise
        return _report(f"rlhf {args.command}", exc, getattr(args, "debug", False), started=True,
                       redis_url=getattr(args, "redis_url", None))


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:  # noqa: SLF001 - the parser's own subcommand table
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return set(action.choices)
    return set()


def _missing_module(extra: str) -> str | None:
    """The first module of `extra` (train: and serve's) that is not installed, or None."""
    import importlib.util

    needs = _EXTRA_MODULES["serve"] + (_EXTRA_MODULES["train"] if extra == "train" else ())
    for name in needs:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def _rollout(args) -> int:
    """`rlhf rollout`: exit 0 when done (stream: stopped), 1 when prompts failed for good or the
    worker could not run, 2 for bad flags."""
    from rlhf_client.queues import PROMPTS_STREAM, SAMPLES_STREAM

    from rlhf.errors import StartupError
    from rlhf.trainer.rollout import (
        DEFAULT_GROUP,
        OptionError,
        RolloutOptions,
        prompts_from_flags,
        run_rollout,
    )

    prog = "rlhf rollout"
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    try:
        options = RolloutOptions(
            n=args.n, batch_prompts=args.batch_prompts, concurrency=args.concurrency,
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, samples_stream=args.samples_stream or SAMPLES_STREAM,
            model_name=args.rollout_model_name, rpc_timeout_s=args.rpc_timeout,
            max_attempts=settings.queue_max_deliveries,
        ).check(settings.max_prompts_per_request)
        items = prompts_from_flags(args.prompts_file, args.prompts)
        if items is not None and (args.group or args.consumer):
            raise ValueError(f"--{'group' if args.group else 'consumer'}: applies to a prompts "
                             "stream, not to --prompts-file / --prompt")
    except OptionError as exc:
        print(f"{prog}: --{exc.option.replace('_', '-')}: {exc.problem}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"{prog}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    logging.getLogger("rlhf").info("settings: %s", json.dumps(settings.redacted(), default=str))
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    try:
        from rlhf.tracing import setup as setup_tracing

        setup_tracing(settings, "rollout")  # off unless RLHF_OTEL
        if settings.metrics_port is not None:
            from prometheus_client import start_http_server

            from rlhf.serving.server import check_bindable

            check_bindable(settings.host, settings.metrics_port, "metrics_port", what="metrics: ")
            server, _ = start_http_server(settings.metrics_port, addr=settings.host)
            logging.getLogger("rlhf").info("metrics listening on %s:%d", settings.host, server.server_port)
        stats = asyncio.run(run_rollout(
            options, policy=args.policy, reward=args.reward, reference=args.reference,
            redis_url=settings.redis_url.get_secret_value(), token=token, items=items,
            prompts_stream=args.prompts_stream or PROMPTS_STREAM, group=args.group or DEFAULT_GROUP,
            consumer=args.consumer, max_deliveries=settings.queue_max_deliveries,
            claim_idle_ms=settings.rollout_claim_idle_ms))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - reported as one line (the traceback with --debug)
        return _report(prog, exc, args.debug, started=not isinstance(exc, StartupError))
    print(json.dumps(stats.as_dict()), flush=True)
    if stats.gave_up or stats.left:
        logging.shutdown()
        print(f"{prog}: {len(stats.gave_up)} prompt(s) failed every attempt, {stats.left} left "
              f"unanswered", file=sys.stderr)
        return 1
    return 0


def _trainer(args) -> int:
    from rlhf.trainer.cli import HANDLERS

    leaf = getattr(args, f"{args.command}_command", None)
    prog = f"rlhf {args.command}" + (f" {leaf}" if leaf else "")
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    setup_logging(settings.log_level if args.command == "worker" else "WARNING")
    if args.command != "worker":
        try:
            return HANDLERS[args.command](args, settings)
        except KeyboardInterrupt:
            return 130
        except Exception as exc:  # noqa: BLE001 - one line (the traceback with --debug)
            return _report(prog, exc, getattr(args, "debug", False), started=True,
                           redis_url=settings.redis_url.get_secret_value())
    logging.getLogger("rlhf").info("settings: %s", json.dumps(settings.redacted(), default=str))
    started = False
    try:
        from rlhf.serving.server import check_bindable

        check_bindable(settings.host, settings.metrics_port, "metrics_port", what="metrics: ")
        started = True
        return HANDLERS[args.command](args, settings)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - reported as one line (the traceback with --debug)
        return _report(prog, exc, args.debug, started=started)


if __name__ == "__main__":
    sys.exit(main())
