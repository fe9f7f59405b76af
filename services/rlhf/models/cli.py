"""`rlhf models import DIR --name NAME [--kind K] [--activate]`: a checkpoint into the store.

The command a person runs where the demo publishes its first version in Python: the directory
is checked (safetensors weights only, nothing that needs remote code, no symlink leading out of
it), loaded once the safe way to record its golden probes (what every service replays before it
swaps to the version), copied into the store as the model's next version with the sha256 of
every file, verified, registered, and activated on request.

(`rlhf models export` is the client's: `rlhf_client.cli`.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.models.loading import UnsafeCheckpoint

if TYPE_CHECKING:
    from rlhf_client.registry import Registry

    from rlhf.models.store import Manifest, ModelStore

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # as job specs name models
#: Config files that may name code for transformers to fetch and run (`auto_map`).
_CODE_CONFIGS = ("config.json", "tokenizer_config.json", "generation_config.json",
                 "processor_config.json", "preprocessor_config.json")


class ImportRefused(UnsafeCheckpoint):
    """The directory is not put into the store (the message says why)."""


def add_import_parser(sub, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """`import` under `rlhf models` (`sub`: its subparsers; `common` adds the shared flags)."""
    p = sub.add_parser("import", help="put a Hugging Face directory into the store as a new "
                       "version (checksums, golden probes)",
                       description="Check a Hugging Face model directory (safetensors only, no "
                       "remote code, no symlink out of it), record its golden probes, and "
                       "publish it as the next version of NAME in the store (sha256 of every "
                       "file in its manifest), registered in Redis.")
    p.add_argument("dir", type=Path, metavar="DIR", help="the model directory (config.json, "
                   "*.safetensors, tokenizer files)")
    p.add_argument("--name", required=True, type=_model_name, help="model name (store + registry)")
    p.add_argument("--kind", choices=["policy", "reward", "reference"], default=None,
                   help="what the checkpoint is (default: reward for a "
                   "*ForSequenceClassification config, else policy)")
    p.add_argument("--activate", action="store_true", help="make the new version the active one")
    common(p)


def _model_name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, '_', '.', '-' (first a "
                                         "letter or digit), at most 128 characters")
    return text


def check_importable(model_dir: Path) -> None:
    """Raise unless `model_dir` may go into the store: `check_safe_dir` (config.json, safetensors
    weights, no refused weight format at its top level), no refused weight format below it, no
    `auto_map` (remote code) in its configs, no symlink that leads out of it."""
    from rlhf.models.loading import REFUSED_SUFFIXES, check_safe_dir

    check_safe_dir(model_dir)
    root = model_dir.resolve()
    for path in sorted(model_dir.rglob("*")):
        rel = path.relative_to(model_dir)
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ImportRefused(f"{model_dir}: {rel} is a symlink to {path.resolve()}, outside "
                                "the directory")
        if path.is_file() and path.name.lower().endswith(REFUSED_SUFFIXES):
            raise ImportRefused(f"{model_dir}: {rel} holds weights in a format that can run code "
                                "when loaded; only safetensors checkpoints are accepted")
    for name in _CODE_CONFIGS:
        path = model_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ImportRefused(f"{path} is not readable JSON: {exc}") from None
        if isinstance(data, dict) and data.get("auto_map"):
            raise ImportRefused(f"{path} has auto_map: the model needs its own code "
                                "(trust_remote_code), which rlhf never runs")


def guess_kind(model_dir: Path) -> str:
    """reward for a sequence-classification config (the reward head), else policy."""
    config = json.loads((model_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    reward = any(str(a).endswith("ForSequenceClassification") for a in archs)
    return "reward" if reward else "policy"


def skipped_files(model_dir: Path) -> list[str]:
    """Files of `model_dir` the store does not copy (only weights, configs, tokenizer files)."""
    from rlhf.models.store import _COPY_SUFFIXES

    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*")
                  if p.is_file() and (p.suffix not in _COPY_SUFFIXES
                                      or p.relative_to(model_dir).parts[0].startswith(".")))


def import_model(model_dir: Path, name: str, *, store: "ModelStore", registry: "Registry",
                 kind: str | None = None, activate: bool = False) -> "Manifest":
    """Check `model_dir`, record its golden probes, publish it as `name`'s next version
    (verified after the copy), register it and, with `activate`, make it the active one."""
    from rlhf.models.probes import compute_probes

    model_dir = Path(model_dir)
    check_importable(model_dir)
    kind = kind or guess_kind(model_dir)
    probes = compute_probes(kind, model_dir)  # loads it the safe way: a broken model stops here
    manifest = store.publish(name, model_dir, kind=kind, probes=probes,
                             extra={"imported_from": str(model_dir.resolve())})
    store.verify(name, manifest.version)
    registry.register(name, manifest.version, manifest.created)
    if activate:
        registry.activate(name, manifest.version)
    return manifest


def _with_registry(settings, work: Callable[["ModelStore", "Registry"], "Manifest"]
                   ) -> tuple["ModelStore", "Manifest"]:
    """`work(store, registry)` on the settings' store and Redis, which is pinged first (Redis
    away: said before any model is loaded); the store and what `work` returned."""
    from rlhf_client.redis_conn import connect
    from rlhf_client.registry import Registry

    from rlhf.models.store import ModelStore

    store = ModelStore(settings.store_dir)
    client = connect(settings.redis_url.get_secret_value(), decode_responses=True)
    try:
        client.ping()
        return store, work(store, Registry(client))
    finally:
        client.close()


def cmd_import(args, settings) -> int:
    """Run `rlhf models import`; failures propagate (the caller prints them as one line)."""
    store, manifest = _with_registry(settings, lambda store, registry: import_model(
        args.dir, args.name, store=store, registry=registry, kind=args.kind,
        activate=args.activate))
    skipped = skipped_files(Path(args.dir))
    out: dict[str, Any] = {"name": manifest.name, "version": manifest.version,
                           "kind": manifest.kind, "files": sorted(manifest.files),
                           "probes": bool(manifest.probes), "active": bool(args.activate),
                           "store": str(store.path(manifest.name, manifest.version)),
                           "skipped": skipped}
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"imported {args.dir} as {manifest.name} {manifest.version} ({manifest.kind}, "
              f"{len(manifest.files)} files, checksums and golden probes recorded"
              f"{', active' if args.activate else ''})"
              + (f"; not copied: {', '.join(skipped)}" if skipped else ""))
    sys.stdout.flush()
    return 0


# ---------------------------------------------------------------------------------------------
# rlhf models merge (issue 20: LoRA adapters)
# ---------------------------------------------------------------------------------------------


def add_merge_parser(sub, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """`merge` under `rlhf models`: an adapter version merged into a full version."""
    p = sub.add_parser("merge", help="merge a LoRA adapter version into its base: a new full "
                       "version (checksums, golden probes)",
                       description="Load an adapter version's base (verified against the "
                       "checksums the adapter recorded) with the adapter, merge the adapter into "
                       "the weights, and publish the result as a full version (safetensors, "
                       "sha256 of every file, golden probes) that names the adapter it came from.")
    p.add_argument("name", type=_model_name, metavar="NAME", help="the adapter's model")
    p.add_argument("version", metavar="VERSION", help="the adapter version")
    p.add_argument("--as", dest="as_name", type=_model_name, default=None, metavar="NAME2",
                   help="publish the merged version under this model name (default: NAME)")
    p.add_argument("--activate", action="store_true", help="make the merged version active")
    common(p)


class NotAnAdapter(UnsafeCheckpoint):
    """`rlhf models merge` was given a version that is not an adapter."""


def merge_version(name: str, version: str, *, store: "ModelStore", registry: "Registry",
                  as_name: str | None = None, activate: bool = False) -> "Manifest":
    """Merge adapter version `name` `version` into its base and publish the merged full version
    as the next version of `as_name` (default `name`), registered (and activated on request).
    Its manifest: the kind of the adapter's model (policy / reward), golden probes of the merged
    weights, `extra.merged_from` = the adapter (name, version, base, lora)."""
    import shutil
    import tempfile

    from rlhf.models.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base, is_adapter,
                                      merge_to_dir)
    from rlhf.models.probes import compute_probes
    from rlhf.models.store import MANIFEST

    manifest = store.verify(name, version)  # TamperedCheckpoint: nothing merged
    if not is_adapter(manifest):
        raise NotAnAdapter(f"{name} {version} is not an adapter version (kind "
                           f"{manifest.kind!r}): nothing to merge")
    base_dir = adapter_base(store, manifest)  # AdapterBaseMismatch: wrong / changed base
    adapter_dir = store.path(name, version)
    kind = manifest.extra.get("adapter_of_kind") or manifest.probes.get("kind") or "policy"
    with tempfile.TemporaryDirectory(prefix="rlhf-merge-") as t:
        out = merge_to_dir(base_dir, adapter_dir, Path(t) / "merged")
        for p in sorted(adapter_dir.iterdir()):  # what else the version carries (a critic ...)
            if p.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST) or (out / p.name).exists():
                continue
            if p.is_dir():
                shutil.copytree(p, out / p.name)
            else:
                shutil.copy2(p, out / p.name)
        probes = compute_probes(kind, out)
        base = manifest.extra.get("base") or {}
        merged = store.publish(
            as_name or name, out, parent=version if (as_name or name) == name else None,
            kind=kind, metrics=dict(manifest.metrics), probes=probes,
            extra={"merged_from": {"name": name, "version": version,
                                   "base": {"name": base.get("name"),
                                            "version": base.get("version")},
                                   "lora": manifest.extra.get("lora")}})
    store.verify(merged.name, merged.version)
    registry.register(merged.name, merged.version, merged.created)
    if activate:
        registry.activate(merged.name, merged.version)
    return merged


def cmd_merge(args, settings) -> int:
    """Run `rlhf models merge`; failures propagate (the caller prints them as one line)."""
    store, manifest = _with_registry(settings, lambda store, registry: merge_version(
        args.name, args.version, store=store, registry=registry, as_name=args.as_name,
        activate=args.activate))
    out: dict[str, Any] = {"name": manifest.name, "version": manifest.version,
                           "kind": manifest.kind, "merged_from": f"{args.name} {args.version}",
                           "files": sorted(manifest.files), "active": bool(args.activate),
                           "store": str(store.path(manifest.name, manifest.version))}
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(f"merged {args.name} {args.version} into {manifest.name} {manifest.version} "
              f"({manifest.kind}, {len(manifest.files)} files, checksums and golden probes "
              f"recorded{', active' if args.activate else ''})")
    sys.stdout.flush()
    return 0
