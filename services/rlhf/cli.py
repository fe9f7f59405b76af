"""The `rlhf` command. Flags that share a name with a setting override it (env: RLHF_<NAME>)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
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

    demo = sub.add_parser("demo", help="the main job on the embedded default")
    demo.add_argument("--workdir", type=Path, default=Path(".cache/demo"))
    demo.add_argument("--pairs", type=int, default=300, help="synthetic preference pairs to push")

    from rlhf.trainer.cli import add_parsers as add_trainer_parsers

    add_trainer_parsers(sub)  # worker, jobs, models
    return p


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
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"rlhf serve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
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
    asyncio.run(make(settings).run_forever())
    return 0


def _tiny(args) -> int:
    from rlhf.models.tiny import make_tiny_model

    path = make_tiny_model(args.kind, args.out, size=args.size, seed=args.seed, tie_embeddings=not args.untied)
    print(path)
    return 0


def _demo(args) -> int:
    from rlhf.demo import run_demo

    return run_demo(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"tiny-model": _tiny, "serve": _serve, "demo": _demo}
    if args.command in ("worker", "jobs", "models"):
        return _trainer(args)
    return handlers[args.command](args)


def _trainer(args) -> int:
    from pydantic import ValidationError

    from rlhf.trainer.cli import HANDLERS

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        print(f"rlhf {args.command}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level if args.command == "worker" else "WARNING")
    if args.command == "worker":
        logging.getLogger("rlhf").info("settings: %s", json.dumps(settings.redacted(), default=str))
    return HANDLERS[args.command](args, settings)


if __name__ == "__main__":
    sys.exit(main())
