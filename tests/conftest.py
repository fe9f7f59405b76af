"""Shared fixtures: tiny models made on the spot, real servers on 127.0.0.1, real Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ThreadedApp, make_settings


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_policy_dir(model_root) -> Path:
    from rlhf.models.tiny import make_tiny_model

    return make_tiny_model("policy", model_root / "policy", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_policy_dir_b(model_root) -> Path:
    """A second policy checkpoint (other seed): another version to swap to."""
    from rlhf.models.tiny import make_tiny_model

    return make_tiny_model("policy", model_root / "policy-b", size="tiny", seed=1)


@pytest.fixture(scope="session")
def tiny_reward_dir(model_root) -> Path:
    from rlhf.models.tiny import make_tiny_model

    return make_tiny_model("reward", model_root / "reward", size="tiny", seed=0)


@pytest.fixture(scope="session")
def policy_server(tiny_policy_dir, tmp_path_factory):
    """The transformers-backed policy service on the tiny model (own thread), metrics on."""
    from rlhf.policy.app import make_policy_app

    store = tmp_path_factory.mktemp("store")
    app = make_policy_app(make_settings(model_dir=tiny_policy_dir, metrics_port=0, store_dir=store))
    with ThreadedApp(app) as served:
        yield served


@pytest.fixture(scope="session")
def policy_target(policy_server) -> str:
    return f"127.0.0.1:{policy_server.port}"
