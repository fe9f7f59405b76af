"""ReferenceService: protobuf in, plain data to the reference model, protobuf out. Nothing else."""

from __future__ import annotations

from rlhfpb.v1 import common_pb2, reference_pb2, reference_pb2_grpc

from rlhf.reference.logprobs import LogProbsItemInput, ReferenceModel
from rlhf.serving.convert import get_model_response, model_ref_pb
from rlhf.serving.swap import Swapper

SERVICE_NAME = reference_pb2.DESCRIPTOR.services_by_name["ReferenceService"].full_name


class ReferenceServicer(reference_pb2_grpc.ReferenceServiceServicer):
    def __init__(self, model: ReferenceModel, swapper: Swapper):
        self._model = model
        self._swapper = swapper

    async def LogProbs(self, request, context):
        items = [LogProbsItemInput(tuple(x.prompt_ids), tuple(x.completion_ids)) for x in request.items]
        results, ref, dtype = await self._model.logprobs(items)
        return reference_pb2.LogProbsResponse(
            results=[reference_pb2.LogProbsResult(logprobs=r.logprobs, sum=r.sum) for r in results],
            model=model_ref_pb(ref),
            dtype=dtype,
        )

    async def GetModel(self, request, context):
        return get_model_response(self._model.info, self._swapper)

    async def LoadVersion(self, request: common_pb2.LoadVersionRequest, context):
        result = await self._swapper.load_version(request.version)
        return common_pb2.LoadVersionResponse(
            previous=model_ref_pb(result.previous),
            model=model_ref_pb(result.current),
            load_seconds=result.seconds,
        )
