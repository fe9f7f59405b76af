"""LoRA adapters in the model store: a version that holds only an adapter and names its base.

Format (followed by the trainer, which writes adapters, and the services, which serve them):

- An adapter version is a version of the SAME model name as its base, with manifest
  `kind = "adapter"` and `extra["base"] = {"name", "version", "files": {rel_path: sha256}}` (the
  sha256 of the base's weight files, `*.safetensors`, as its manifest lists them) and
  `extra["lora"] = {"r", "alpha", "dropout", "target_modules", "task_type", "modules_to_save"}`.
- Its directory holds peft's `adapter_config.json` + `adapter_model.safetensors` (safetensors
  only: a `.bin` adapter is refused) and copies of the base's tokenizer files; no `config.json`
  (it is not a model on its own: `load_causal_lm` refuses it).
- Its golden probes (`manifest.probes`) are those of base + adapter, computed as for a full
  version (fp32, CPU, fresh load): `kind` "policy" for a causal-LM adapter, "reward" for a
  sequence-classification one.

Serving: the policy services keep base and adapters apart (`rlhf.policy.engines.lora`); the
reward and reference services load an adapter version merged (`load_for_serving`: the verified
base + the adapter, `merge_and_unload`, one plain model), the base read again on each swap.

A job that names an adapter version as its starting point is refused at start
(`refuse_adapter_base`): merge it first (`rlhf models merge`, which writes a full version) and
train from that, or train from the adapter's base.

Nothing here runs code from a checkpoint: peft reads `adapter_config.json` (plain JSON) and the
safetensors weights; the base is loaded by `rlhf.models.loading` (no remote code).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from rlhf.models.info import ModelRef
from rlhf.models.loading import REFUSED_SUFFIXES, CheckpointNotFound, UnsafeCheckpoint

if TYPE_CHECKING:
    from rlhf.models.store import Manifest, ModelStore

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_KIND",
    "ADAPTER_WEIGHTS",
    "AdapterBaseMismatch",
    "AdapterVersion",
    "ServingModel",
    "adapter_base",
    "adapter_version",
    "base_weight_files",
    "check_safe_adapter_dir",
    "is_adapter",
    "is_adapter_dir",
    "lora_config",
    "lora_record",
    "load_adapter_model",
    "load_for_serving",
    "merge_to_dir",
    "publish_adapter",
    "refuse_adapter_base",
]

ADAPTER_KIND = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Files of a base directory that are not its tokenizer (left out of an adapter version).
_NOT_TOKENIZER = {"config.json", "generation_config.json", "manifest.json",
                  "model.safetensors.index.json", ADAPTER_CONFIG}
_TOKENIZER_SUFFIXES = (".json", ".txt", ".model", ".jinja")


class AdapterBaseMismatch(UnsafeCheckpoint):
    """An adapter's base version is missing, is itself an adapter, or its weight files differ
    from the checksums the adapter version recorded."""


# --- what a version / directory is ---------------------------------------------------------


def is_adapter(manifest: "Manifest | dict[str, Any] | None") -> bool:
    """Whether a manifest (a `Manifest` or its dict) is an adapter version."""
    if manifest is None:
        return False
    kind = manifest.get("kind") if isinstance(manifest, dict) else getattr(manifest, "kind", None)
    return kind == ADAPTER_KIND


def is_adapter_dir(d: str | Path) -> bool:
    """A directory holding a peft adapter (an `adapter_config.json`) and no full model."""
    d = Path(d)
    return (d / ADAPTER_CONFIG).is_file() and not (d / "config.json").is_file()


def check_safe_adapter_dir(adapter_dir: str | Path) -> None:
    """Raise unless the directory is a peft adapter in safetensors: `adapter_config.json` (a JSON
    object) and `adapter_model.safetensors`, and no file in a format that runs code when read."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise CheckpointNotFound(f"adapter directory not found: {d}")
    if not (d / ADAPTER_CONFIG).is_file():
        raise CheckpointNotFound(f"no {ADAPTER_CONFIG} in adapter directory {d}")
    names = sorted(p.name for p in d.iterdir() if p.is_file())
    refused = [n for n in names if n.lower().endswith(REFUSED_SUFFIXES)]
    if refused:
        raise UnsafeCheckpoint(f"{d} holds adapter weights in a format that can run code when "
                               f"loaded ({', '.join(refused)}); only {ADAPTER_WEIGHTS} is accepted")
    if ADAPTER_WEIGHTS not in names:
        raise UnsafeCheckpoint(f"{d} holds no {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    except ValueError as e:
        raise UnsafeCheckpoint(f"{d / ADAPTER_CONFIG} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise UnsafeCheckpoint(f"{d / ADAPTER_CONFIG}: not a LoRA adapter (peft_type "
                               f"{cfg.get('peft_type') if isinstance(cfg, dict) else None!r})")


def lora_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json` (checked safe first)."""
    check_safe_adapter_dir(adapter_dir)
    return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())


def lora_record(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a manifest / job metrics record of a LoRA config (`adapter_config.json` keys)."""
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": targets, "task_type": cfg.get("task_type"),
            "modules_to_save": sorted(cfg.get("modules_to_save") or [])}


def base_weight_files(manifest: "Manifest") -> dict[str, str]:
    """The sha256 of a full version's weight files (`*.safetensors`), from its manifest."""
    return {rel: digest for rel, digest in sorted(manifest.files.items())
            if rel.endswith(".safetensors") and "/" not in rel}


# --- the base of an adapter version --------------------------------------------------------


def adapter_base(store: "ModelStore", manifest: "Manifest") -> Path:
    """The directory of an adapter version's base, after checking it: the base version exists, is
    intact (`store.verify`: every file against its own manifest) and its weight files are the
    ones the adapter was trained on (`extra["base"]["files"]`). Raises `AdapterBaseMismatch`
    (an `UnsafeCheckpoint`) or `TamperedCheckpoint`."""
    from rlhf.models.store import Manifest as _Manifest

    if not is_adapter(manifest):
        raise AdapterBaseMismatch(f"{manifest.name} {manifest.version} is not an adapter version")
    base = (manifest.extra or {}).get("base") or {}
    name, version, files = base.get("name"), base.get("version"), base.get("files")
    if not name or not version or not isinstance(files, dict) or not files:
        raise AdapterBaseMismatch(f"{manifest.name} {manifest.version}: the manifest does not "
                                  "name its base (extra.base.name / version / files)")
    d = store.path(name, version)
    if not (d / "manifest.json").is_file():
        raise AdapterBaseMismatch(f"{manifest.name} {manifest.version}: its base {name} {version} "
                                  "is not in the store")
    base_manifest: _Manifest = store.verify(name, version)  # TamperedCheckpoint if changed
    if is_adapter(base_manifest):
        raise AdapterBaseMismatch(f"{manifest.name} {manifest.version}: its base {name} {version} "
                                  "is itself an adapter")
    have = base_weight_files(base_manifest)
    if have != dict(sorted(files.items())):
        raise AdapterBaseMismatch(
            f"{manifest.name} {manifest.version}: the weights of its base {name} {version} differ "
            f"from those the adapter was trained on (recorded {sorted(files)}, found "
            f"{sorted(have)}, or their sha256 differ)")
    return d


def refuse_adapter_base(store: "ModelStore", name: str, version: str) -> None:
    """Raise `ValueError` when a job would start from an adapter version (see the module doc)."""
    try:
        manifest = store.manifest(name, version)
    except (OSError, ValueError, TypeError):
        return
    if is_adapter(manifest):
        base = (manifest.extra or {}).get("base") or {}
        raise ValueError(
            f"base_version: {name} {version} is a LoRA adapter (of {base.get('name')} "
            f"{base.get('version')}); a job cannot start from an adapter: merge it first "
            f"(`rlhf models merge {name} {version}`) and train from the merged version, or train "
            f"from its base {base.get('version')}")


@dataclass(frozen=True)
class AdapterVersion:
    """An adapter version to serve: where it is, its verified base, its LoRA rank."""

    adapter_dir: Path
    base_dir: Path
    base: ModelRef
    rank: int


def adapter_version(model_dir: str | Path) -> AdapterVersion | None:
    """None for a full version (or a pinned directory); for an adapter version of the store
    (`<store>/<name>/<version>/`), its base, verified: `UnsafeCheckpoint` (a subclass) when the
    base is missing or its weights are not those the adapter was trained on."""
    from rlhf.models.store import Manifest, ModelStore

    d = Path(model_dir)
    if not (d / "manifest.json").is_file():
        return None
    try:
        manifest = Manifest.read(d)
    except (OSError, ValueError, TypeError) as exc:
        raise UnsafeCheckpoint(f"{d}: unreadable manifest: {exc}") from exc
    if not is_adapter(manifest):
        return None
    base = (manifest.extra or {}).get("base") or {}
    base_dir = Path(adapter_base(ModelStore(d.parent.parent), manifest))
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text())
        rank = int(cfg["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UnsafeCheckpoint(f"{d}: no usable {ADAPTER_CONFIG} (LoRA rank 'r'): {exc}") from exc
    base_ref = ModelRef(str(base.get("name", manifest.name)), str(base.get("version")))
    return AdapterVersion(d, base_dir, base_ref, rank)


# --- loading and merging -------------------------------------------------------------------


def load_adapter_model(base_model, adapter_dir: str | Path, adapter_name: str = "default", *,
                       is_trainable: bool = False, strict: bool = False):
    """`base_model` (a transformers model, or a `PeftModel` to add one more adapter to) with the
    adapter of `adapter_dir` loaded as `adapter_name` and active; safetensors only. Returns the
    `PeftModel` (eval mode unless `is_trainable`). `strict`: an adapter whose tensors do not
    match the model's LoRA layers (keys missing or unexpected) raises instead of a warning."""
    from peft import PeftModel

    check_safe_adapter_dir(adapter_dir)
    more = {"strict_adapter_check": "error"} if strict else {}
    if isinstance(base_model, PeftModel):
        base_model.load_adapter(str(adapter_dir), adapter_name=adapter_name,
                                is_trainable=is_trainable, use_safetensors=True, **more)
        base_model.set_adapter(adapter_name)
        model = base_model
    else:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=adapter_name,
                                          is_trainable=is_trainable, use_safetensors=True, **more)
    return model if is_trainable else model.eval()


#: The peft task types an adapter may have to be served as each kind of model
#: (`publish_adapter` treats an adapter without one as a causal-LM adapter too).
SERVING_TASK_TYPES: dict[str, tuple[str | None, ...]] = {
    "reward": ("SEQ_CLS",),
    "causal": ("CAUSAL_LM", None),
}


class ServingModel(NamedTuple):
    """What `load_for_serving` returns: one plain transformers model (eval mode, no grad) and,
    for an adapter version, the base version it was merged onto (None for a full version)."""

    model: Any
    base: ModelRef | None


def load_for_serving(model_dir: str | Path, kind: str, *, dtype: str = "float32",
                     device: str = "cpu") -> ServingModel:
    """The model a reward (`kind` "reward") or reference (`kind` "causal") service serves for
    `model_dir`: a full version through the ordinary loader (`load_reward_model` /
    `load_causal_lm`); an adapter version of the store on its verified base (`adapter_version`:
    a missing base, or one whose weights are not those the adapter was trained on, raises
    `UnsafeCheckpoint`), the base loaded with the same `dtype` and `device`, the adapter
    (safetensors only, every tensor matching the base's layers) merged into it
    (`merge_and_unload`): one plain model, as fast as the base. An adapter whose peft
    `task_type` does not fit `kind` (a CAUSAL_LM adapter on the reward service, a SEQ_CLS one
    on the reference service) raises `UnsafeCheckpoint` naming it, before the base is read."""
    import torch

    from rlhf.models.loading import load_causal_lm, load_reward_model

    if kind not in SERVING_TASK_TYPES:
        raise ValueError(f"load_for_serving: kind must be one of {sorted(SERVING_TASK_TYPES)}, "
                         f"not {kind!r}")
    adapter = adapter_version(model_dir)
    if adapter is None:
        load = load_reward_model if kind == "reward" else load_causal_lm
        model, base = load(model_dir, dtype=dtype, device=device), None
    else:
        task = lora_config(adapter.adapter_dir).get("task_type")
        if task not in SERVING_TASK_TYPES[kind]:
            wanted = " or ".join(str(t) for t in SERVING_TASK_TYPES[kind] if t is not None)
            raise UnsafeCheckpoint(
                f"{adapter.adapter_dir}: a LoRA adapter of peft task_type {task!r} cannot be "
                f"served as a {kind} model (it needs task_type {wanted})")
        with torch.no_grad():  # the loader the task type names: the kind's, checked above
            model = load_base_and_adapter(adapter.base_dir, adapter.adapter_dir, dtype=dtype,
                                          device=device, strict=True).merge_and_unload()
        base = adapter.base
    model.eval()
    model.requires_grad_(False)
    return ServingModel(model, base)


def _load_base(base_dir: str | Path, task_type: str | None, *, dtype: str = "float32",
               device: str = "cpu"):
    from rlhf.models.loading import load_causal_lm, load_reward_model

    if task_type == "SEQ_CLS":
        return load_reward_model(base_dir, dtype=dtype, device=device)
    return load_causal_lm(base_dir, dtype=dtype, device=device)


def load_base_and_adapter(base_dir: str | Path, adapter_dir: str | Path, *,
                          dtype: str = "float32", device: str = "cpu", strict: bool = False):
    """A fresh base + adapter model (a reward model for a SEQ_CLS adapter), eval mode;
    `strict` as in `load_adapter_model`."""
    cfg = lora_config(adapter_dir)
    return load_adapter_model(_load_base(base_dir, cfg.get("task_type"), dtype=dtype,
                                         device=device), adapter_dir, strict=strict)


def _copy_tokenizer_files(base_dir: Path, out: Path) -> None:
    for p in sorted(Path(base_dir).iterdir()):
        if p.is_file() and p.suffix in _TOKENIZER_SUFFIXES and p.name not in _NOT_TOKENIZER:
            shutil.copy2(p, out / p.name)


def merge_to_dir(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Write base + adapter merged into one full Hugging Face directory (fp32, safetensors,
    the base's config, generation config and tokenizer files). Returns `out_dir`."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        model = load_base_and_adapter(base_dir, adapter_dir)
        merged = model.merge_and_unload()
        merged.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer_files(Path(base_dir), out)
    return out


# --- publishing ------------------------------------------------------------------------------


def _stage_adapter(src, tmp: Path) -> None:
    if isinstance(src, (str, Path)):  # all of it (a PPO job's critic and state go along)
        check_safe_adapter_dir(src)
        shutil.copytree(src, tmp, dirs_exist_ok=True,
                        ignore=lambda _d, names: [n for n in names if n.startswith(".")])
        return
    src.save_pretrained(str(tmp), safe_serialization=True)  # a PeftModel: the adapter alone
    check_safe_adapter_dir(tmp)


def publish_adapter(
    store: "ModelStore",
    name: str,
    peft_model_or_dir,
    *,
    base_version: str,
    base_name: str | None = None,
    registry=None,
    parent: str | None = None,
    job_id: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> "Manifest":
    """Publish an adapter (a `PeftModel`, or a directory holding `adapter_config.json` +
    `adapter_model.safetensors`) as the next version of `name`, on base `base_name`
    (default `name`) `base_version`: the base is verified first, its weight checksums and the
    LoRA config go in `extra`, golden probes are computed on base + adapter, the base's tokenizer
    files are copied in. With `registry`, the version is published and registered through
    `rlhf.trainer.publish.publish_version` (idempotent per `job_id`; needs `job_id`), else
    written to the store only. `parent` defaults to `base_version`. Returns its manifest."""
    from rlhf.models.probes import compute_probes

    base_name = base_name or name
    base_manifest = store.verify(base_name, base_version)
    if is_adapter(base_manifest):
        raise AdapterBaseMismatch(f"{base_name} {base_version} is an adapter, not a base model")
    base_dir = store.path(base_name, base_version)
    with tempfile.TemporaryDirectory(prefix="rlhf-adapter-") as t:
        tmp = Path(t)
        _stage_adapter(peft_model_or_dir, tmp)
        _copy_tokenizer_files(base_dir, tmp)
        cfg = lora_config(tmp)
        lora = lora_record(cfg)
        probe_kind = "reward" if cfg.get("task_type") == "SEQ_CLS" else "policy"
        probes = compute_probes(probe_kind, base_dir, adapter_dir=tmp)
        more = dict(extra or {})
        more["base"] = {**(more.get("base") or {}), "name": base_name, "version": base_version,
                        "files": base_weight_files(base_manifest)}
        more["lora"] = lora
        more.setdefault("adapter_of_kind", probe_kind)
        metrics = {"lora": lora, **(metrics or {})}  # a job's metrics keep its spec's `lora`
        if registry is not None:
            from rlhf.trainer.publish import publish_version

            if job_id is None:
                raise ValueError("publish_adapter: registering a version needs its job_id")
            return publish_version(store, registry, name, tmp, parent=parent or base_version,
                                   job_id=job_id, kind=ADAPTER_KIND, metrics=metrics, extra=more,
                                   probes=probes)
        return store.publish(name, tmp, parent=parent or base_version, job_id=job_id,
                             kind=ADAPTER_KIND, metrics=metrics, probes=probes, extra=more)
