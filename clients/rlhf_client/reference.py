"""ReferenceClient / AsyncReferenceClient: the frozen reference model's log-probs of completions."""

from __future__ import annotations

from typing import Sequence

from rlhfpb.v1 import common_pb2, reference_pb2, reference_pb2_grpc

from rlhf_client._base import AsyncBase, SyncBase
from rlhf_client.convert import model_info, model_ref, swap_result
from rlhf_client.types import LogProbsResult, ModelInfo, SequenceLogProbs, SwapResult

#: One item: (prompt_ids, completion_ids).
LogProbsItemLike = tuple[Sequence[int], Sequence[int]]


def _request(items: Sequence[LogProbsItemLike]) -> reference_pb2.LogProbsRequest:
    out = []
    for i, item in enumerate(items):
        if len(item) != 2 or any(isinstance(part, (str, bytes)) for part in item):
            raise TypeError(f"items[{i}]: expected a (prompt_ids, completion_ids) pair of token-id lists")
        prompt, completion = item
        out.append(reference_pb2.LogProbsItem(prompt_ids=list(prompt), completion_ids=list(completion)))
    return reference_pb2.LogProbsRequest(items=out)


def _result(resp: reference_pb2.LogProbsResponse) -> LogProbsResult:
    return LogProbsResult(
        results=[SequenceLogProbs(logprobs=list(r.logprobs), sum=r.sum) for r in resp.results],
        model=model_ref(resp.model),
        dtype=resp.dtype,
    )


class ReferenceClient(SyncBase):
    """Blocking client. `target`: "host:port" or "dns:///svc.ns:50051" (round-robin)."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = reference_pb2_grpc.ReferenceServiceStub(self._channel)

    def logprobs(self, items: Sequence[LogProbsItemLike], *, timeout: float | None = None,
                 request_id: str | None = None) -> LogProbsResult:
        """log π_ref of every completion token of every (prompt_ids, completion_ids) item. Send the
        completions of one prompt (a DPO pair, a group of samples) in one request: the service
        computes that prompt once."""
        resp = self._unary(self._stub.LogProbs, _request(items), timeout=timeout, request_id=request_id)
        return _result(resp)

    def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                           timeout=timeout, admin=True)
        return swap_result(resp)


class AsyncReferenceClient(AsyncBase):
    """asyncio client (grpc.aio); same methods as ReferenceClient, awaited."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = reference_pb2_grpc.ReferenceServiceStub(self._channel)

    async def logprobs(self, items: Sequence[LogProbsItemLike], *, timeout: float | None = None,
                       request_id: str | None = None) -> LogProbsResult:
        resp = await self._unary(self._stub.LogProbs, _request(items), timeout=timeout, request_id=request_id)
        return _result(resp)

    async def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(await self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    async def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = await self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                                 timeout=timeout, admin=True)
        return swap_result(resp)
