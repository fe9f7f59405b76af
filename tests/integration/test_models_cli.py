"""`rlhf models import` and `rlhf models export` as a person runs them: real processes, real Redis
(DB 4), the tiny models of conftest.py.

- import: a Hugging Face directory becomes the model's next version: files copied with their
  sha256, golden probes that a fresh load of the stored version reproduces (what a service
  replays before it swaps), registered, activated on request; the kind read from the config;
- refused, one line each, nothing stored: weights that can run code (.bin, also below the top
  level), remote code (auto_map), a symlink out of the directory, a missing directory, no
  safetensors, Redis away (said before the model is loaded);
- export: a verified copy (every file equal to its manifest sha256, the manifest with them),
  into a new or empty directory only; a tampered version is refused and nothing is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from rlhf_client.registry import Registry
from test_cli_jobs import URL, assert_one_line, r, rlhf  # noqa: F401 - r: DB 4, flushed

from rlhf.models.store import ModelStore, sha256_file
from rlhf.procs import free_port


def models(*args: str, store: Path) -> subprocess.CompletedProcess:
    return rlhf("models", *args, "--store", str(store), "--redis-url", URL)


def test_import_publishes_a_verified_version_with_golden_probes(r, tmp_path, tiny_policy_dir,
                                                                tiny_reward_dir):
    from rlhf.models.probes import compute_probes

    store = tmp_path / "store"
    src = tmp_path / "mine"
    shutil.copytree(tiny_policy_dir, src)
    (src / "README.md").write_text("my model")  # not a model file: not copied, said so
    out = models("import", str(src), "--name", "mine", "--activate", store=store)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"imported {src} as mine v0001 (policy, 5 files, checksums and "
                                  "golden probes recorded, active); not copied: README.md")
    manifest = ModelStore(store).verify("mine", "v0001")  # every file matches its sha256
    assert manifest.kind == "policy" and manifest.parent is None
    assert set(manifest.files) == {p.name for p in tiny_policy_dir.iterdir()}
    assert Registry(r).active("mine") == "v0001" and Registry(r).versions("mine") == ["v0001"]
    # What a service checks before swapping: a fresh load of the stored version answers the
    # probes as the manifest says.
    fresh = compute_probes("policy", store / "mine" / "v0001")
    assert fresh["greedy"] == manifest.probes["greedy"] and manifest.probes["greedy"]
    for got, want in zip(fresh["logprobs"], manifest.probes["logprobs"]):
        assert got == pytest.approx(want, abs=1e-5)
    shown = json.loads(models("show", "mine", "v0001", store=store).stdout)
    assert shown["verified"] is True and shown["active"] is True

    # A reward model (its config says ForSequenceClassification): kind reward, not activated.
    got = models("import", str(tiny_reward_dir), "--name", "mine", "--json", store=store)
    assert got.returncode == 0, got.stderr
    data = json.loads(got.stdout)
    assert (data["version"], data["kind"], data["active"], data["probes"]) == ("v0002", "reward",
                                                                               False, True)
    assert ModelStore(store).verify("mine", "v0002").probes["kind"] == "reward"
    assert Registry(r).active("mine") == "v0001" and Registry(r).versions("mine") == ["v0001",
                                                                                      "v0002"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["bin", "nested-bin", "auto_map", "symlink", "missing",
                                  "no-safetensors"])
def test_import_refuses_unsafe_or_missing_directories(r, tmp_path, tiny_policy_dir, case):
    d = tmp_path / "ckpt"
    if case != "missing":
        _copy(tiny_policy_dir, d)
    if case == "bin":
        (d / "pytorch_model.bin").write_bytes(b"pickle")
        why = (f"{d} holds weights in a format that can run code when loaded (pytorch_model.bin); "
               "only safetensors checkpoints are accepted — convert them and remove these files")
    elif case == "nested-bin":
        (d / "value").mkdir()
        (d / "value" / "model.pt").write_bytes(b"pickle")
        why = (f"{d}: value/model.pt holds weights in a format that can run code when loaded; "
               "only safetensors checkpoints are accepted")
    elif case == "auto_map":
        config = json.loads((d / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.MineForCausalLM"}
        (d / "config.json").write_text(json.dumps(config))
        why = (f"{d / 'config.json'} has auto_map: the model needs its own code "
               "(trust_remote_code), which rlhf never runs")
    elif case == "symlink":
        secret = tmp_path / "outside.txt"
        secret.write_text("not the model's")
        (d / "vocab.txt").symlink_to(secret)
        why = f"{d}: vocab.txt is a symlink to {secret}, outside the directory"
    elif case == "missing":
        why = f"checkpoint directory not found: {d}"
    else:
        (d / "model.safetensors").unlink()
        why = f"{d} holds no *.safetensors weights"
    out = models("import", str(d), "--name", "mine", store=tmp_path / "store")
    assert_one_line(out, f"rlhf models import: failed: {why}", code=1)
    assert not (tmp_path / "store" / "mine").exists() and Registry(r).versions("mine") == []


def test_import_with_redis_away_or_a_bad_name_says_so_in_one_line(tmp_path, tiny_policy_dir):
    port = free_port()
    down = f"redis://127.0.0.1:{port}/0"
    out = rlhf("models", "import", str(tiny_policy_dir), "--name", "m", "--redis-url", down,
               "--store", str(tmp_path / "store"))
    assert_one_line(out, f"rlhf models import: failed: Redis at {down} is unreachable (Error 111 "
                    f"connecting to 127.0.0.1:{port}. Connection refused.) (set --redis-url / "
                    "RLHF_REDIS_URL)", code=1)
    assert not (tmp_path / "store").exists()
    out = models("import", str(tiny_policy_dir), "--name", "../escape", store=tmp_path / "store")
    assert out.returncode == 2 and "--name: '../escape': letters, digits" in out.stderr


def test_export_is_a_verified_copy_into_a_new_or_empty_directory(tmp_path, tiny_policy_dir):
    store = ModelStore(tmp_path / "store")
    m = store.publish("mine", tiny_policy_dir, kind="policy", metrics={"x": 1})
    dest = tmp_path / "exported"
    out = models("export", "mine", m.version, str(dest), store=store.root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"exported mine v0001 to {dest} ({len(m.files)} files, "
                                  "checksums verified)")
    assert {p.name for p in dest.iterdir()} == {*m.files, "manifest.json"}
    assert {rel: sha256_file(dest / rel) for rel in m.files} == m.files
    assert json.loads((dest / "manifest.json").read_text())["metrics"] == {"x": 1}
    # The copy is a complete version: it verifies as one, and loads.
    from rlhf.models.loading import load_causal_lm
    from rlhf.models.store import verify

    assert verify(dest).files == m.files and load_causal_lm(dest) is not None

    empty = tmp_path / "empty"
    empty.mkdir()
    assert models("export", "mine", "v0001", str(empty), "--json", store=store.root).returncode == 0
    assert_one_line(models("export", "mine", "v0001", str(dest), store=store.root),
                    f"rlhf models export: {dest} exists and is not an empty directory", code=2)
    assert_one_line(models("export", "mine", "v0009", str(tmp_path / "x"), store=store.root),
                    f"rlhf models export: the store at {store.root} has no version 'v0009' of "
                    "'mine' (set --store / RLHF_STORE_DIR)", code=1)
    (store.path("mine", "v0001") / "config.json").write_text("{}")  # tampered in the store
    assert_one_line(models("export", "mine", "v0001", str(tmp_path / "y"), store=store.root),
                    f"rlhf models export: {store.path('mine', 'v0001')}: config.json does not "
                    "match its sha256 in the manifest", code=1)
    assert not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
