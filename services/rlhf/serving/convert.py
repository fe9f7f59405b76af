"""Protobuf ↔ plain-data helpers shared by the servicers."""

from __future__ import annotations

from rlhfpb.v1 import common_pb2

from rlhf.models.info import ModelInfo, ModelRef


def model_ref_pb(ref: ModelRef) -> common_pb2.ModelRef:
    return common_pb2.ModelRef(name=ref.name, version=ref.version)


def get_model_response(info: ModelInfo, swapper=None) -> common_pb2.GetModelResponse:
    """`follows_registry`: the model's own flag, or whether a registry follower drives `swapper`."""
    return common_pb2.GetModelResponse(
        model=model_ref_pb(info.ref),
        backend=info.backend,
        max_context=info.max_context,
        vocab_size=info.vocab_size,
        kind=info.kind,
        follows_registry=info.follows_registry or bool(getattr(swapper, "follows_registry", False)),
        base=model_ref_pb(info.base) if getattr(info, "base", None) is not None else None,
    )


def opt(msg, name: str):
    """The value of an `optional` proto3 field, or None when unset."""
    return getattr(msg, name) if msg.HasField(name) else None
