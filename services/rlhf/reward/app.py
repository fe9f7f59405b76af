"""Assembles the reward service: scorer (+ micro-batcher) → servicer → server."""

from __future__ import annotations

from rlhfpb.v1 import reward_pb2_grpc

from rlhf.config import Settings
from rlhf.reward.scorer import SERVICE_LABEL, RewardScorer
from rlhf.reward.servicer import SERVICE_NAME, RewardServicer
from rlhf.serving.app import ServiceApp, resolve_model
from rlhf.serving.server import ServiceBinding
from rlhf.serving.swap import Swapper


def make_reward_app(settings: Settings) -> ServiceApp:
    model_dir, ref = resolve_model(settings)
    scorer = RewardScorer(settings, model_dir, ref)
    swapper = Swapper(scorer, settings.store_dir, SERVICE_LABEL, settings.dtype)
    servicer = RewardServicer(scorer, swapper)
    binding = ServiceBinding(
        SERVICE_NAME, servicer, reward_pb2_grpc.add_RewardServiceServicer_to_server, ("LoadVersion",)
    )
    return ServiceApp(settings, SERVICE_LABEL, scorer, [binding], swapper)
