"""The model store: `<root>/<name>/<version>/` = a Hugging Face directory + `manifest.json`.

A version is written to a hidden temp directory beside its final place and renamed into place
with one `rename`, so readers see it whole or not at all. The rename also allocates the version
id: two publishers racing for the same id cannot both win. The manifest records the sha256 of
every file; `verify` refuses a directory whose files do not match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlhf.models.loading import UnsafeCheckpoint, check_safe_dir

MANIFEST = "manifest.json"
_COPY_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja")


class TamperedCheckpoint(UnsafeCheckpoint):
    """A version's files do not match its manifest (changed, missing, or extra)."""


@dataclass
class Manifest:
    name: str
    version: str
    parent: str | None
    created: float
    files: dict[str, str]  # relative path → sha256
    job_id: str | None = None
    kind: str | None = None  # "policy" | "reward" | "reference"
    metrics: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, model_dir: Path) -> "Manifest":
        data = json.loads((Path(model_dir) / MANIFEST).read_text())
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(4 << 20)  # one buffer, filled in place (hashlib drops the GIL on big blocks)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(model_dir: str | Path) -> Manifest:
    """Check a version directory against its manifest; returns the manifest or raises.

    Raises `TamperedCheckpoint` when a file's sha256 differs, a listed file is missing, or a file
    not in the manifest is present; `UnsafeCheckpoint` for unsafe formats (see check_safe_dir).
    The two halves, `verify_listing` (cheap) and `verify_checksums` (reads every byte), can run
    apart: the swapper loads a version while its checksums are computed, and serves it only
    after both passed.
    """
    manifest = verify_listing(model_dir)
    verify_checksums(model_dir, manifest)
    return manifest


def verify_listing(model_dir: str | Path) -> Manifest:
    """The manifest, once the directory holds exactly its files, all in safe formats."""
    d = Path(model_dir)
    if not (d / MANIFEST).is_file():
        raise TamperedCheckpoint(f"{d}: no {MANIFEST} (not a complete store version)")
    _check_safe(d)
    manifest = Manifest.read(d)
    present = {p.relative_to(d).as_posix() for p in _files(d)}
    missing = sorted(set(manifest.files) - present)
    extra = sorted(present - set(manifest.files))
    if missing or extra:
        raise TamperedCheckpoint(f"{d}: files differ from the manifest (missing {missing}, extra {extra})")
    return manifest


def verify_checksums(model_dir: str | Path, manifest: Manifest) -> None:
    """Every file's sha256 against the manifest (`TamperedCheckpoint` at the first mismatch)."""
    d = Path(model_dir)
    for rel, digest in manifest.files.items():
        if sha256_file(d / rel) != digest:
            raise TamperedCheckpoint(f"{d}: {rel} does not match its sha256 in the manifest")


def same_but_weights(a: str | Path, b: str | Path) -> bool:
    """Whether two model directories hold byte-identical files apart from the weights
    (`*.safetensors`) and the manifest: same config, generation config and tokenizer, so a swap
    between them may keep the serving model's structure and tokenizer."""

    def others(d: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())
                if p.is_file() and p.suffix != ".safetensors" and p.name != MANIFEST}

    return others(Path(a)) == others(Path(b))


class ModelStore:
    """Versions of named models under one root directory (a shared volume in production)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def versions(self, name: str) -> list[str]:
        d = self.root / name
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
                      and (p / MANIFEST).is_file())

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def manifest(self, name: str, version: str) -> Manifest:
        return Manifest.read(self.path(name, version))

    def verify(self, name: str, version: str) -> Manifest:
        return verify(self.path(name, version))

    def _next_version(self, name: str) -> str:
        numbers = [int(v[1:]) for v in self.versions(name) if v[:1] == "v" and v[1:].isdigit()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def publish(
        self,
        name: str,
        src_dir: str | Path,
        *,
        parent: str | None = None,
        job_id: str | None = None,
        kind: str | None = None,
        metrics: dict[str, Any] | None = None,
        probes: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Copy a Hugging Face directory in as the next version of `name`; returns its manifest."""
        src = Path(src_dir)
        _check_safe(src)
        parent_dir = self.root / name
        parent_dir.mkdir(parents=True, exist_ok=True)
        tmp = parent_dir / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for path in _files(src):
                rel = path.relative_to(src)
                if path.suffix not in _COPY_SUFFIXES or rel.parts[0].startswith("."):
                    continue
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, tmp / rel)
            files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in _files(tmp)}
            for attempt in range(100):
                version = self._next_version(name)
                manifest = Manifest(name=name, version=version, parent=parent, created=time.time(),
                                    files=files, job_id=job_id, kind=kind, metrics=metrics or {},
                                    probes=probes or {}, extra=extra or {})
                (tmp / MANIFEST).write_text(manifest.to_json())
                _fsync_tree(tmp)
                try:
                    os.rename(tmp, self.path(name, version))  # atomic; fails if the id was taken
                    return manifest
                except OSError:
                    continue
            raise RuntimeError(f"could not allocate a version id for {name}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _check_safe(d: Path) -> None:
    """`check_safe_dir`, or for a LoRA adapter directory (no config.json, an adapter_config.json:
    `rlhf.models.adapters`) `check_safe_adapter_dir`."""
    from rlhf.models.adapters import check_safe_adapter_dir, is_adapter_dir  # imports this module

    if is_adapter_dir(d):
        check_safe_adapter_dir(d)
    else:
        check_safe_dir(d)


def _fsync_tree(d: Path) -> None:
    for p in _files(d) + [d / MANIFEST]:
        with p.open("rb") as f:
            os.fsync(f.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
