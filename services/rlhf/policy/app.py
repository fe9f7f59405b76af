"""Assembles the policy service: engine → generator → servicer → server (+ the HTTP front)."""

from __future__ import annotations

from rlhfpb.v1 import policy_pb2_grpc

from rlhf.config import Settings
from rlhf.policy.engines import make_engine
from rlhf.policy.generator import Generator
from rlhf.policy.servicer import SERVICE_NAME, PolicyServicer
from rlhf.serving.app import ServiceApp, resolve_model
from rlhf.serving.server import ServiceBinding
from rlhf.serving.swap import Swapper


def make_policy_app(settings: Settings) -> ServiceApp:
    model_dir, ref = resolve_model(settings)
    engine = make_engine(settings, model_dir, ref)
    swapper = Swapper(engine, settings.store_dir, "policy", settings.dtype)
    generator = Generator(engine, settings)
    servicer = PolicyServicer(generator, swapper)
    binding = ServiceBinding(
        SERVICE_NAME, servicer, policy_pb2_grpc.add_PolicyServiceServicer_to_server, ("LoadVersion",)
    )
    fronts = []
    if settings.http_port is not None:  # the OpenAI-compatible front: same generator, same loop
        from rlhf.policy.http import HttpFront

        fronts.append(HttpFront(settings, generator))
    return ServiceApp(settings, "policy", engine, [binding], swapper, fronts=fronts)
