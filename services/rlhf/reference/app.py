"""Assembles the reference service: reference model (+ micro-batcher) → servicer → server."""

from __future__ import annotations

from rlhfpb.v1 import reference_pb2_grpc

from rlhf.config import Settings
from rlhf.reference.logprobs import SERVICE_LABEL, ReferenceModel
from rlhf.reference.servicer import SERVICE_NAME, ReferenceServicer
from rlhf.serving.app import ServiceApp, resolve_model
from rlhf.serving.server import ServiceBinding
from rlhf.serving.swap import Swapper


def make_reference_app(settings: Settings) -> ServiceApp:
    model_dir, ref = resolve_model(settings)
    model = ReferenceModel(settings, model_dir, ref)
    swapper = Swapper(model, settings.store_dir, SERVICE_LABEL, settings.dtype)
    servicer = ReferenceServicer(model, swapper)
    binding = ServiceBinding(
        SERVICE_NAME, servicer, reference_pb2_grpc.add_ReferenceServiceServicer_to_server, ("LoadVersion",)
    )
    return ServiceApp(settings, SERVICE_LABEL, model, [binding], swapper)
