"""RewardClient / AsyncRewardClient: Bradley–Terry rewards of (prompt, response) pairs."""

from __future__ import annotations

from typing import Sequence

from rlhfpb.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from rlhf_client._base import AsyncBase, SyncBase
from rlhf_client.convert import model_info, model_ref, swap_result
from rlhf_client.types import CompareResult, ModelInfo, ScoreResult, SwapResult

TextOrIds = str | Sequence[int]
#: One item: (prompt, response), both text or both token ids.
ScoreItemLike = tuple[TextOrIds, TextOrIds]


def _item_pb(i: int, item: ScoreItemLike) -> reward_pb2.ScoreItem:
    if isinstance(item, (str, bytes)) or len(item) != 2:
        raise TypeError(f"items[{i}]: expected a (prompt, response) pair, got {item!r}")
    prompt, response = item
    if isinstance(prompt, str) and isinstance(response, str):
        return reward_pb2.ScoreItem(text=reward_pb2.TextPair(prompt=prompt, response=response))
    if isinstance(prompt, str) or isinstance(response, str):
        raise TypeError(f"items[{i}]: prompt and response must both be text or both token ids")
    return reward_pb2.ScoreItem(
        tokens=reward_pb2.TokenPair(prompt_ids=list(prompt), response_ids=list(response))
    )


def _score_request(items: Sequence[ScoreItemLike]) -> reward_pb2.ScoreRequest:
    return reward_pb2.ScoreRequest(items=[_item_pb(i, x) for i, x in enumerate(items)])


def _compare_request(prompt: TextOrIds, response_a: TextOrIds, response_b: TextOrIds) -> reward_pb2.CompareRequest:
    parts = (prompt, response_a, response_b)
    if all(isinstance(p, str) for p in parts):
        return reward_pb2.CompareRequest(prompt=prompt, response_a=response_a, response_b=response_b)
    if any(isinstance(p, str) for p in parts):
        raise TypeError("prompt, response_a and response_b must all be text or all token ids")
    return reward_pb2.CompareRequest(
        prompt_ids=common_pb2.TokenIds(ids=list(prompt)),
        response_a_ids=common_pb2.TokenIds(ids=list(response_a)),
        response_b_ids=common_pb2.TokenIds(ids=list(response_b)),
    )


def _score_result(resp: reward_pb2.ScoreResponse) -> ScoreResult:
    return ScoreResult(rewards=list(resp.rewards), model=model_ref(resp.model))


def _compare_result(resp: reward_pb2.CompareResponse) -> CompareResult:
    return CompareResult(
        probability_a=resp.probability_a, reward_a=resp.reward_a, reward_b=resp.reward_b, model=model_ref(resp.model)
    )


class RewardClient(SyncBase):
    """Blocking client. `target`: "host:port" or "dns:///svc.ns:50051" (round-robin)."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    def score(self, items: Sequence[ScoreItemLike], *, timeout: float | None = None,
              request_id: str | None = None) -> ScoreResult:
        """One reward per (prompt, response) item, in order. Send the responses to one prompt (a
        pair, a group of samples) in one request: the service computes that prompt once."""
        resp = self._unary(self._stub.Score, _score_request(items), timeout=timeout, request_id=request_id)
        return _score_result(resp)

    def compare(self, prompt: TextOrIds, response_a: TextOrIds, response_b: TextOrIds, *,
                timeout: float | None = None, request_id: str | None = None) -> CompareResult:
        """P(a ≻ b) = σ(r_a − r_b) and both rewards (all text, or all token ids); one request, the
        prompt computed once."""
        req = _compare_request(prompt, response_a, response_b)
        return _compare_result(self._unary(self._stub.Compare, req, timeout=timeout, request_id=request_id))

    def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                           timeout=timeout, admin=True)
        return swap_result(resp)


class AsyncRewardClient(AsyncBase):
    """asyncio client (grpc.aio); same methods as RewardClient, awaited."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = reward_pb2_grpc.RewardServiceStub(self._channel)

    async def score(self, items: Sequence[ScoreItemLike], *, timeout: float | None = None,
                    request_id: str | None = None) -> ScoreResult:
        resp = await self._unary(self._stub.Score, _score_request(items), timeout=timeout, request_id=request_id)
        return _score_result(resp)

    async def compare(self, prompt: TextOrIds, response_a: TextOrIds, response_b: TextOrIds, *,
                      timeout: float | None = None, request_id: str | None = None) -> CompareResult:
        req = _compare_request(prompt, response_a, response_b)
        return _compare_result(await self._unary(self._stub.Compare, req, timeout=timeout, request_id=request_id))

    async def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(await self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    async def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = await self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                                 timeout=timeout, admin=True)
        return swap_result(resp)
