"""The registry on real Redis: versions, activate / rollback and their events, from the client,
the `rlhf models` CLI, and the trainer's publish step."""

from __future__ import annotations

import json
import threading

import pytest
import redis
from rlhf_client.redis_conn import connect
from rlhf_client import ModelsClient, Registry, RegistryError
from rlhf_client.registry import EVENTS_CHANNEL
from trainer_helpers import REDIS_URL, fake_hf_dir, forget_model, unique, wait_for

from rlhf.cli import main as rlhf_main
from rlhf.models.store import ModelStore


@pytest.fixture
def r():
    client = connect(REDIS_URL, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def name(r):
    model = unique("rm")
    yield model
    forget_model(r, model)


class Events:
    """Collects registry events for one model name (the channel is shared by every test)."""

    def __init__(self, name: str):
        self.name = name
        self.seen: list[dict] = []
        self._client = connect(REDIS_URL, decode_responses=True)
        self._pubsub = self._client.pubsub()
        self._pubsub.subscribe(EVENTS_CHANNEL)
        self._pubsub.get_message(timeout=5)  # the subscribe confirmation
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            msg = self._pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                event = json.loads(msg["data"])
                if event["name"] == self.name:
                    self.seen.append(event)

    def wait(self, n: int) -> list[dict]:
        wait_for(lambda: len(self.seen) >= n, timeout=10, what=f"{n} registry events")
        return [(e["event"], e["version"], e["previous"]) for e in self.seen]

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self._pubsub.close()
        self._client.close()


@pytest.fixture
def events(name):
    ev = Events(name)
    yield ev
    ev.close()


def test_activate_and_rollback_publish_events(r, name, events):
    reg = Registry(r)
    for v in ("v0001", "v0002", "v0003"):
        reg.register(name, v)
    assert reg.versions(name) == ["v0001", "v0002", "v0003"] and name in reg.models()
    assert reg.active(name) is None
    with pytest.raises(RegistryError):
        reg.activate(name, "v0042")
    with pytest.raises(RegistryError):
        reg.rollback(name)  # nothing was ever active

    reg.activate(name, "v0001")
    reg.activate(name, "v0002")
    reg.activate(name, "v0003")
    assert reg.active(name) == "v0003" and reg.history(name) == ["v0002", "v0001"]
    assert reg.rollback(name).version == "v0002"
    assert reg.rollback(name).version == "v0001"
    assert reg.active(name) == "v0001"
    with pytest.raises(RegistryError, match="no earlier active version"):
        reg.rollback(name)
    assert events.wait(5) == [
        ("activated", "v0001", None),
        ("activated", "v0002", "v0001"),
        ("activated", "v0003", "v0002"),
        ("rolled_back", "v0002", "v0003"),
        ("rolled_back", "v0001", "v0002"),
    ]


def test_models_client_and_cli(r, name, events, tmp_path, capsys):
    store = ModelStore(tmp_path / "store")
    for i in range(2):
        m = store.publish(name, fake_hf_dir(tmp_path / f"src{i}", f"w{i}".encode()),
                          metrics={"eval_accuracy": 0.5 + i / 10})
        Registry(r).register(name, m.version, m.created)
    mc = ModelsClient.from_url(REDIS_URL, store_dir=store.root)
    assert name in mc.models() and mc.versions(name) == ["v0001", "v0002"]
    mc.activate(name, "v0001")
    shown = mc.show(name, "v0001")
    assert shown["active"] is True and shown["manifest"]["metrics"] == {"eval_accuracy": 0.5}

    def cli(*argv) -> tuple[int, str]:
        code = rlhf_main(["models", *argv, "--redis-url", REDIS_URL, "--store", str(store.root)])
        return code, capsys.readouterr()

    code, out = cli("activate", name, "v0002")
    assert code == 0 and out.out.strip() == f"{name}: v0001 -> v0002"
    code, out = cli("list", "--json")
    assert {"name": name, "active": "v0002", "versions": 2} in json.loads(out.out)
    code, out = cli("show", name, "v0002")
    info = json.loads(out.out)
    assert info["active"] is True and info["verified"] is True
    assert info["manifest"]["metrics"] == {"eval_accuracy": 0.6}
    code, out = cli("show", name)
    assert json.loads(out.out)["history"] == ["v0001"]
    code, out = cli("rollback", name)
    assert code == 0 and "-> v0001" in out.out and mc.active(name) == "v0001"
    code, out = cli("activate", name, "v0099")
    assert code == 1 and "no registered version" in out.err
    (store.path(name, "v0002") / "model.safetensors").write_bytes(b"tampered")
    code, out = cli("show", name, "v0002")
    assert json.loads(out.out)["verified"] is False
    assert [e[0] for e in events.wait(3)] == ["activated", "activated", "rolled_back"]


def test_publish_registers_once_per_job_and_activates_behind_the_gate(r, name, tmp_path):
    from rlhf.trainer.publish import maybe_activate, publish_version

    store, reg = ModelStore(tmp_path / "store"), Registry(r)
    src = fake_hf_dir(tmp_path / "src")
    m1 = publish_version(store, reg, name, src, parent=None, job_id="job-1", kind="reward",
                         metrics={"eval_accuracy": 0.8}, extra={})
    again = publish_version(store, reg, name, src, parent=None, job_id="job-1", kind="reward",
                            metrics={"eval_accuracy": 0.8}, extra={})
    assert again == m1 and store.versions(name) == ["v0001"] and reg.versions(name) == ["v0001"]
    assert maybe_activate(reg, m1, activate=True, min_eval_accuracy=0.9)[0] is False
    assert reg.active(name) is None
    assert maybe_activate(reg, m1, activate=False, min_eval_accuracy=None) == (False, "not requested")
    assert maybe_activate(reg, m1, activate=True, min_eval_accuracy=0.75) == (True, "activated")
    assert reg.active(name) == "v0001"
