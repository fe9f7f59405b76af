"""protobuf → client dataclasses for messages every service shares."""

from __future__ import annotations

from rlhf_client.types import ModelInfo, ModelRef, SwapResult


def model_ref(msg) -> ModelRef:
    return ModelRef(msg.name, msg.version)


def model_info(msg) -> ModelInfo:
    return ModelInfo(
        model=model_ref(msg.model),
        backend=msg.backend,
        kind=msg.kind,
        max_context=msg.max_context,
        vocab_size=msg.vocab_size,
        follows_registry=msg.follows_registry,
        base=model_ref(msg.base) if msg.HasField("base") else None,
    )


def swap_result(msg) -> SwapResult:
    return SwapResult(previous=model_ref(msg.previous), model=model_ref(msg.model), load_seconds=msg.load_seconds)
