"""RewardService: protobuf in, plain data to the scorer, protobuf out. Nothing else."""

from __future__ import annotations

from rlhfpb.v1 import common_pb2, reward_pb2, reward_pb2_grpc

from rlhf.reward.scorer import CompareInput, RewardScorer, ScoreItemInput
from rlhf.serving.convert import get_model_response, model_ref_pb
from rlhf.serving.swap import Swapper

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name


def _item(x: reward_pb2.ScoreItem) -> ScoreItemInput:
    kind = x.WhichOneof("input")
    if kind == "text":
        return ScoreItemInput.text(x.text.prompt, x.text.response)
    if kind == "tokens":
        return ScoreItemInput.tokens(x.tokens.prompt_ids, x.tokens.response_ids)
    return ScoreItemInput()


def _ids(msg, name: str) -> tuple[int, ...] | None:
    return tuple(getattr(msg, name).ids) if msg.HasField(name) else None


def to_compare(req: reward_pb2.CompareRequest) -> CompareInput:
    return CompareInput(
        prompt=req.prompt,
        response_a=req.response_a,
        response_b=req.response_b,
        prompt_ids=_ids(req, "prompt_ids"),
        response_a_ids=_ids(req, "response_a_ids"),
        response_b_ids=_ids(req, "response_b_ids"),
    )


class RewardServicer(reward_pb2_grpc.RewardServiceServicer):
    def __init__(self, scorer: RewardScorer, swapper: Swapper):
        self._scorer = scorer
        self._swapper = swapper

    async def Score(self, request, context):
        rewards, ref = await self._scorer.score([_item(x) for x in request.items])
        return reward_pb2.ScoreResponse(rewards=rewards, model=model_ref_pb(ref))

    async def Compare(self, request, context):
        r = await self._scorer.compare(to_compare(request))
        return reward_pb2.CompareResponse(
            probability_a=r.probability_a, reward_a=r.reward_a, reward_b=r.reward_b, model=model_ref_pb(r.ref)
        )

    async def GetModel(self, request, context):
        return get_model_response(self._scorer.info, self._swapper)

    async def LoadVersion(self, request: common_pb2.LoadVersionRequest, context):
        result = await self._swapper.load_version(request.version)
        return common_pb2.LoadVersionResponse(
            previous=model_ref_pb(result.previous),
            model=model_ref_pb(result.current),
            load_seconds=result.seconds,
        )
