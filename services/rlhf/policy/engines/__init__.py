"""Policy engines behind one protocol; `ENGINES` picks one by the `backend` setting."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rlhf.config import Settings
    from rlhf.policy.engines.base import PolicyEngine


def _hf(settings: "Settings", model_dir, ref) -> "PolicyEngine":
    from rlhf.policy.engines.hf import HFEngine

    return HFEngine(settings, model_dir, ref)


def _vllm(settings: "Settings", model_dir, ref) -> "PolicyEngine":
    from rlhf.policy.engines.vllm import VLLMEngine  # heavy import stays inside the backend

    return VLLMEngine(settings, model_dir, ref)


ENGINES: dict[str, Callable[..., "PolicyEngine"]] = {"hf": _hf, "vllm": _vllm}


def make_engine(settings: "Settings", model_dir, ref) -> "PolicyEngine":
    """The engine the settings ask for, not started yet."""
    return ENGINES[settings.backend](settings, model_dir, ref)
