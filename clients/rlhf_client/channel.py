"""Channels with the platform's defaults: retries on UNAVAILABLE (service config), round-robin
across replicas for `dns:///` targets, keepalive that the servers permit, message-size limits."""

from __future__ import annotations

import json
import uuid

import grpc

DEFAULT_TIMEOUT_S = 30.0
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_SERVICES = ("rlhfpb.v1.PolicyService", "rlhfpb.v1.RewardService", "rlhfpb.v1.ReferenceService")

SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": s} for s in _SERVICES],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    return [
        ("grpc.service_config", SERVICE_CONFIG),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def sync_channel(target: str) -> grpc.Channel:
    return grpc.insecure_channel(target, options=channel_options())


def aio_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=channel_options())


def call_metadata(token: str | None, request_id: str | None) -> tuple[tuple[tuple[str, str], ...], str]:
    """Metadata for one call (bearer token, request id) and the request id used."""
    rid = request_id or uuid.uuid4().hex
    md: list[tuple[str, str]] = [("x-request-id", rid)]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md), rid
