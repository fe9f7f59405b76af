"""PolicyClient / AsyncPolicyClient: generate completions with the current policy."""

from __future__ import annotations

from typing import AsyncIterator, Iterator, Mapping, Sequence

from rlhfpb.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from rlhf_client._base import AsyncBase, SyncBase
from rlhf_client.convert import model_info, model_ref, swap_result
from rlhf_client.types import (
    Completion,
    FinishReason,
    GenerateResult,
    ModelInfo,
    SamplingParams,
    StreamChunk,
    SwapResult,
)

#: A prompt: text, token ids, or a conversation as [{"role": ..., "content": ...}, ...]
#: (rendered by the server with the model's chat template).
PromptLike = str | Sequence[int] | Sequence[Mapping[str, str]]


def _params_pb(p: SamplingParams) -> policy_pb2.SamplingParams:
    msg = policy_pb2.SamplingParams(
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        return_logprobs=p.return_logprobs,
        reset_token=p.reset_token,
        return_prompt_logprobs=p.return_prompt_logprobs,
    )
    for name in ("temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "seed"):
        value = getattr(p, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def _prompt_pb(prompt: PromptLike) -> policy_pb2.Prompt:
    if isinstance(prompt, str):
        return policy_pb2.Prompt(text=prompt)
    if prompt and all(isinstance(m, Mapping) for m in prompt):
        msg = policy_pb2.Prompt()
        msg.chat.SetInParent()
        msg.chat.messages.extend(
            policy_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt
        )
        return msg
    msg = policy_pb2.Prompt()
    msg.token_ids.SetInParent()  # an empty id list is still a token-id prompt (and invalid)
    msg.token_ids.ids.extend(prompt)
    return msg


def _request(cls, prompts: Sequence[PromptLike], params: SamplingParams | None, n: int | None):
    if isinstance(prompts, str) or (prompts and all(isinstance(m, Mapping) for m in prompts)):
        prompts = [prompts]  # one text prompt, or one conversation
    req = cls(prompts=[_prompt_pb(p) for p in prompts], params=_params_pb(params or SamplingParams()))
    if n is not None:
        req.n = n
    return req


def _completion(c: policy_pb2.Completion) -> Completion:
    # the wire carries the trajectory only when a reset made it differ from the kept part
    reset = len(c.trajectory_token_ids) > 0
    return Completion(
        prompt_index=c.prompt_index,
        sample_index=c.sample_index,
        text=c.text,
        token_ids=list(c.token_ids),
        logprobs=list(c.logprobs),
        finish_reason=FinishReason(c.finish_reason),
        prompt_token_ids=list(c.prompt_token_ids),
        trajectory_token_ids=list(c.trajectory_token_ids if reset else c.token_ids),
        trajectory_logprobs=list(c.trajectory_logprobs if reset else c.logprobs),
        prompt_logprobs=list(c.prompt_logprobs),
    )


def _result(resp: policy_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        completions=[_completion(c) for c in resp.completions],
        model=model_ref(resp.model),
    )


def _chunk(c: policy_pb2.GenerateStreamResponse) -> StreamChunk:
    return StreamChunk(
        prompt_index=c.prompt_index,
        sample_index=c.sample_index,
        text=c.text,
        token_ids=list(c.token_ids),
        logprobs=list(c.logprobs),
        finish_reason=FinishReason(c.finish_reason),
        reset=c.reset,
        prompt_token_ids=list(c.prompt_token_ids),
        model=model_ref(c.model),
        dropped_token_ids=list(c.dropped_token_ids),
        dropped_logprobs=list(c.dropped_logprobs),
        kept_logprobs=list(c.kept_logprobs),
    )


class PolicyClient(SyncBase):
    """Blocking client. `target`: "host:port" or "dns:///svc.ns:50051" (round-robin)."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    def generate(self, prompts: Sequence[PromptLike] | str, params: SamplingParams | None = None, *,
                 n: int | None = None, timeout: float | None = None, request_id: str | None = None) -> GenerateResult:
        req = _request(policy_pb2.GenerateRequest, prompts, params, n)
        return _result(self._unary(self._stub.Generate, req, timeout=timeout, request_id=request_id))

    def generate_stream(self, prompts: Sequence[PromptLike] | str, params: SamplingParams | None = None, *,
                        n: int | None = None, timeout: float | None = None,
                        request_id: str | None = None) -> Iterator[StreamChunk]:
        req = _request(policy_pb2.GenerateStreamRequest, prompts, params, n)
        for msg in self._stream(self._stub.GenerateStream, req, timeout=timeout, request_id=request_id):
            yield _chunk(msg)

    def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                           timeout=timeout, admin=True)
        return swap_result(resp)


class AsyncPolicyClient(AsyncBase):
    """asyncio client (grpc.aio); same methods as PolicyClient, awaited."""

    def __init__(self, target: str, **kwargs):
        super().__init__(target, **kwargs)
        self._stub = policy_pb2_grpc.PolicyServiceStub(self._channel)

    async def generate(self, prompts: Sequence[PromptLike] | str, params: SamplingParams | None = None, *,
                       n: int | None = None, timeout: float | None = None,
                       request_id: str | None = None) -> GenerateResult:
        req = _request(policy_pb2.GenerateRequest, prompts, params, n)
        return _result(await self._unary(self._stub.Generate, req, timeout=timeout, request_id=request_id))

    async def generate_stream(self, prompts: Sequence[PromptLike] | str, params: SamplingParams | None = None,
                              *, n: int | None = None, timeout: float | None = None,
                              request_id: str | None = None) -> AsyncIterator[StreamChunk]:
        req = _request(policy_pb2.GenerateStreamRequest, prompts, params, n)
        async for msg in self._stream(self._stub.GenerateStream, req, timeout=timeout, request_id=request_id):
            yield _chunk(msg)

    async def get_model(self, *, timeout: float | None = None) -> ModelInfo:
        return model_info(await self._unary(self._stub.GetModel, common_pb2.GetModelRequest(), timeout=timeout))

    async def load_version(self, version: str, *, timeout: float | None = None) -> SwapResult:
        resp = await self._unary(self._stub.LoadVersion, common_pb2.LoadVersionRequest(version=version),
                                 timeout=timeout, admin=True)
        return swap_result(resp)
