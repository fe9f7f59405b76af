"""Python clients of the rlhf platform (base install: grpcio + protobuf, no torch)."""

from rlhf_client.errors import RpcError
from rlhf_client.policy import AsyncPolicyClient, PolicyClient
from rlhf_client.types import (
    Completion,
    FinishReason,
    GenerateResult,
    ModelInfo,
    ModelRef,
    SamplingParams,
    StreamChunk,
    SwapResult,
    assemble_stream,
)

__all__ = [
    "AsyncPolicyClient",
    "Completion",
    "FinishReason",
    "GenerateResult",
    "ModelInfo",
    "ModelRef",
    "PolicyClient",
    "RpcError",
    "SamplingParams",
    "StreamChunk",
    "SwapResult",
    "assemble_stream",
]
