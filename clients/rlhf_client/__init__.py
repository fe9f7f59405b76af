"""Python clients of the rlhf platform (base install: grpcio + protobuf, no torch)."""

from rlhf_client.channel import TlsOptions
from rlhf_client.errors import RpcError
from rlhf_client.policy import AsyncPolicyClient, PolicyClient
from rlhf_client.reference import AsyncReferenceClient, ReferenceClient
from rlhf_client.reward import AsyncRewardClient, RewardClient
from rlhf_client.types import (
    CompareResult,
    Completion,
    FinishReason,
    GenerateResult,
    LogProbsResult,
    ModelInfo,
    ModelRef,
    SamplingParams,
    ScoreResult,
    SequenceLogProbs,
    StreamChunk,
    SwapResult,
    assemble_stream,
)

__all__ = [
    "AsyncPolicyClient",
    "AsyncReferenceClient",
    "AsyncRewardClient",
    "CompareResult",
    "Completion",
    "FinishReason",
    "GenerateResult",
    "LogProbsResult",
    "ModelInfo",
    "ModelRef",
    "PolicyClient",
    "ReferenceClient",
    "RewardClient",
    "RpcError",
    "SamplingParams",
    "ScoreResult",
    "SequenceLogProbs",
    "StreamChunk",
    "SwapResult",
    "TlsOptions",
    "assemble_stream",
]

# Queues, training jobs and model versions (Redis only; job specs: rlhf_client.jobspecs).
from rlhf_client.queues import (  # noqa: E402
    PREFERENCES_STREAM,
    SAMPLES_STREAM,
    SFT_STREAM,
    PayloadError,
    QueueProducer,
)
from rlhf_client.registry import Registry, RegistryError  # noqa: E402
from rlhf_client.training import (  # noqa: E402
    JobCancelled,
    JobFailed,
    JobNotCancellable,
    JobNotFound,
    JobRecord,
    ModelsClient,
    TrainingClient,
)

__all__ += [
    "JobCancelled",
    "JobFailed",
    "JobNotCancellable",
    "JobNotFound",
    "JobRecord",
    "ModelsClient",
    "PREFERENCES_STREAM",
    "PayloadError",
    "QueueProducer",
    "Registry",
    "RegistryError",
    "SAMPLES_STREAM",
    "SFT_STREAM",
    "TrainingClient",
]
