"""PolicyService: protobuf in, plain data to the generator, protobuf out. Nothing else.

`SamplingParams.return_prompt_logprobs` is honoured by `Generate` only (`Completion.prompt_logprobs`);
`GenerateStream` has no field for them and ignores the flag (the engine is not asked for them).
"""

from __future__ import annotations

from rlhfpb.v1 import common_pb2, policy_pb2, policy_pb2_grpc

from rlhf.policy.generator import ChatTurn, GenerateInput, Generator, PromptInput
from rlhf.serving.convert import get_model_response, model_ref_pb, opt
from rlhf.serving.swap import Swapper

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name


def _prompt(p: policy_pb2.Prompt) -> PromptInput:
    kind = p.WhichOneof("input")
    if kind == "text":
        return PromptInput(text=p.text)
    if kind == "token_ids":
        return PromptInput(token_ids=tuple(p.token_ids.ids))
    if kind == "chat":
        return PromptInput(chat=tuple(ChatTurn(m.role, m.content) for m in p.chat.messages))
    return PromptInput()


def to_input(req) -> GenerateInput:
    """GenerateRequest / GenerateStreamRequest → GenerateInput."""
    p = req.params
    return GenerateInput(
        prompts=tuple(_prompt(x) for x in req.prompts),
        n=opt(req, "n"),
        temperature=opt(p, "temperature"),
        top_p=opt(p, "top_p"),
        top_k=opt(p, "top_k"),
        max_new_tokens=opt(p, "max_new_tokens"),
        min_new_tokens=opt(p, "min_new_tokens"),
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        seed=opt(p, "seed"),
        return_logprobs=p.return_logprobs,
        reset_token=p.reset_token,
        return_prompt_logprobs=p.return_prompt_logprobs,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, generator: Generator, swapper: Swapper):
        self._gen = generator
        self._swapper = swapper

    async def Generate(self, request, context):
        completions, ref = await self._gen.generate(to_input(request))
        return policy_pb2.GenerateResponse(
            completions=[
                policy_pb2.Completion(
                    prompt_index=c.prompt_index,
                    sample_index=c.sample_index,
                    text=c.text,
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    finish_reason=int(c.finish),
                    prompt_token_ids=c.prompt_token_ids,
                    # the trajectory goes on the wire only where it differs from the kept part
                    trajectory_token_ids=c.trajectory_token_ids if c.reset else [],
                    trajectory_logprobs=c.trajectory_logprobs if c.reset else [],
                    prompt_logprobs=c.prompt_logprobs,
                )
                for c in completions
            ],
            model=model_ref_pb(ref),
        )

    async def GenerateStream(self, request, context):
        async for chunk, ref in self._gen.stream(to_input(request)):
            yield policy_pb2.GenerateStreamResponse(
                prompt_index=chunk.prompt_index,
                sample_index=chunk.sample_index,
                text=chunk.text,
                token_ids=chunk.token_ids,
                logprobs=chunk.logprobs,
                finish_reason=int(chunk.finish or 0),
                reset=chunk.reset,
                prompt_token_ids=chunk.prompt_token_ids,
                model=model_ref_pb(ref),
                dropped_token_ids=chunk.dropped_token_ids,
                dropped_logprobs=chunk.dropped_logprobs,
                kept_logprobs=chunk.kept_logprobs,
            )

    async def GetModel(self, request, context):
        return get_model_response(self._gen.engine.info, self._swapper)

    async def LoadVersion(self, request: common_pb2.LoadVersionRequest, context):
        result = await self._swapper.load_version(request.version)
        return common_pb2.LoadVersionResponse(
            previous=model_ref_pb(result.previous),
            model=model_ref_pb(result.current),
            load_seconds=result.seconds,
        )
