"""The swapper: checksums computed while the target loads, and still required before a switch;
what each phase cost, per swap."""

from __future__ import annotations

from pathlib import Path

import pytest
from trainer_helpers import fake_hf_dir

from rlhf.errors import FailedPrecondition
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.store import ModelStore
from rlhf.serving.swap import PHASES, Swapper, swap_phase


class FakeTarget:
    """Loads nothing; records what it saw and switches after `check` like a real engine."""

    def __init__(self, ref: ModelRef, *, fail_load: bool = False):
        self.info = ModelInfo(ref=ref, backend="fake", kind="policy", max_context=8, vocab_size=8)
        self.fail_load = fail_load
        self.loaded: list[Path] = []

    async def load_version(self, model_dir: Path, ref: ModelRef, check=None) -> None:
        with swap_phase("load"):
            self.loaded.append(model_dir)
            if self.fail_load:
                raise ValueError("cannot parse the weights")
        await check(self._greedy)
        self.info = ModelInfo(ref=ref, backend="fake", kind="policy", max_context=8, vocab_size=8)

    async def _greedy(self, prompts, max_new_tokens):  # no probes in these manifests
        raise AssertionError("not called")


@pytest.fixture
def store(tmp_path) -> ModelStore:
    s = ModelStore(tmp_path / "store")
    s.publish("m", fake_hf_dir(tmp_path / "a", b"weights-a"))
    s.publish("m", fake_hf_dir(tmp_path / "b", b"weights-b"))
    return s


async def test_a_swap_reports_every_phase_and_the_event_delivery(store):
    target = FakeTarget(ModelRef("m", "v0001"))
    result = await Swapper(target, store.root, "policy").load_version("v0002", event_time=0.0)
    assert target.info.ref == ModelRef("m", "v0002") == result.current
    assert {"event", "verify", "load", "switch"} <= set(result.phases) <= {*PHASES, "verify-total"}
    assert result.phases["event"] > 1e9  # seconds since the epoch: an event from 1970
    assert all(v >= 0 for v in result.phases.values())
    assert result.phases["verify-total"] > 0  # the checksums ran (the wait for them may be 0)


async def test_a_tampered_file_is_refused_though_the_load_ran_beside_the_checksums(store):
    (store.path("m", "v0002") / "model.safetensors").write_bytes(b"weights-x")  # same size, new bytes
    target = FakeTarget(ModelRef("m", "v0001"))
    with pytest.raises(FailedPrecondition, match="refused.*sha256"):
        await Swapper(target, store.root, "policy").load_version("v0002")
    assert target.loaded and target.info.ref == ModelRef("m", "v0001")  # loaded, never switched


async def test_a_tampered_file_that_breaks_the_load_is_still_reported_as_tampered(store):
    (store.path("m", "v0002") / "model.safetensors").write_bytes(b"garbage")
    target = FakeTarget(ModelRef("m", "v0001"), fail_load=True)
    with pytest.raises(FailedPrecondition, match="refused.*sha256"):
        await Swapper(target, store.root, "policy").load_version("v0002")
    assert target.info.ref == ModelRef("m", "v0001")


async def test_a_listing_that_differs_is_refused_before_anything_is_loaded(store):
    (store.path("m", "v0002") / "extra.bin").write_bytes(b"pickle?")
    target = FakeTarget(ModelRef("m", "v0001"))
    with pytest.raises(FailedPrecondition, match="refused"):
        await Swapper(target, store.root, "policy").load_version("v0002")
    assert target.loaded == []

