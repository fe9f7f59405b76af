"""The model store: atomic versions, manifests with checksums, and refusal of tampered ones."""

from __future__ import annotations

import json
import os

import pytest
from trainer_helpers import fake_hf_dir

from rlhf.models.loading import UnsafeCheckpoint
from rlhf.models.store import MANIFEST, Manifest, ModelStore, TamperedCheckpoint, sha256_file, verify


@pytest.fixture
def store(tmp_path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def test_publish_writes_a_whole_version_with_its_manifest(store, tmp_path):
    src = fake_hf_dir(tmp_path / "src")
    m = store.publish("rm", src, parent=None, job_id="job-1", kind="reward",
                      metrics={"eval_accuracy": 0.93}, extra={"applied_ids": ["a", "b"]})
    assert m.version == "v0001" and store.versions("rm") == ["v0001"]
    d = store.path("rm", "v0001")
    on_disk = Manifest.read(d)
    assert on_disk == m
    assert set(on_disk.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    for rel, digest in on_disk.files.items():
        assert sha256_file(d / rel) == digest
    assert on_disk.job_id == "job-1" and on_disk.metrics == {"eval_accuracy": 0.93}
    assert on_disk.extra["applied_ids"] == ["a", "b"] and on_disk.created > 0
    assert verify(d) == on_disk
    # Nothing half-written is left beside it, and the next version is a new directory.
    m2 = store.publish("rm", fake_hf_dir(tmp_path / "src2", b"weights-2"), parent="v0001")
    assert (m2.version, m2.parent) == ("v0002", "v0001")
    assert sorted(p.name for p in (store.root / "rm").iterdir()) == ["v0001", "v0002"]


def test_a_temp_directory_is_never_listed_as_a_version(store, tmp_path):
    store.publish("rm", fake_hf_dir(tmp_path / "src"))
    half = store.root / "rm" / ".tmp-crashed"
    fake_hf_dir(half)  # what a publisher killed before its rename leaves
    (store.root / "rm" / "v0009").mkdir()  # a directory with no manifest is not a version
    assert store.versions("rm") == ["v0001"]


@pytest.mark.parametrize("tamper", ["change", "add", "remove", "manifest-edit"])
def test_a_tampered_version_is_refused(store, tmp_path, tamper):
    store.publish("rm", fake_hf_dir(tmp_path / "src"))
    d = store.path("rm", "v0001")
    if tamper == "change":
        (d / "model.safetensors").write_bytes(b"weights-X")
    elif tamper == "add":
        (d / "extra.safetensors").write_bytes(b"more")
    elif tamper == "remove":
        os.remove(d / "tokenizer.json")
    else:  # the manifest names a different digest than the file has
        data = json.loads((d / MANIFEST).read_text())
        data["files"]["config.json"] = "0" * 64
        (d / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(TamperedCheckpoint):
        store.verify("rm", "v0001")


def test_unsafe_formats_are_refused_on_publish_and_verify(store, tmp_path):
    src = fake_hf_dir(tmp_path / "src")
    (src / "pytorch_model.bin").write_bytes(b"code runs when this loads")
    with pytest.raises(UnsafeCheckpoint):
        store.publish("rm", src)
    assert store.versions("rm") == []
    os.remove(src / "pytorch_model.bin")
    store.publish("rm", src)
    (store.path("rm", "v0001") / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(UnsafeCheckpoint):
        store.verify("rm", "v0001")


def test_a_directory_without_manifest_is_not_a_store_version(tmp_path):
    with pytest.raises(TamperedCheckpoint, match="manifest"):
        verify(fake_hf_dir(tmp_path / "bare"))


def test_the_trainer_refuses_a_tampered_base_version(store, tmp_path):
    """Jobs that start from a store version check its checksums before loading it."""
    from rlhf.trainer.publish import resolve_base

    class OneVersion:  # the registry's read side, as resolve_base uses it
        def active(self, name):
            return "v0001"

    store.publish("rm", fake_hf_dir(tmp_path / "src"))
    base = resolve_base(store, OneVersion(), "rm", base_dir=None, base_version=None)
    assert (base.model_dir, base.version) == (store.path("rm", "v0001"), "v0001")
    (store.path("rm", "v0001") / "model.safetensors").write_bytes(b"swapped weights")
    with pytest.raises(TamperedCheckpoint):
        resolve_base(store, OneVersion(), "rm", base_dir=None, base_version=None)
