"""The one exception the clients raise for a failed RPC."""

from __future__ import annotations

from typing import Sequence

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class RpcError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `details` the server's message.

    `field_violations` lists (field, description) for each bad field of an INVALID_ARGUMENT
    (the `google.rpc.BadRequest` in the status details; field paths as in the proto request,
    e.g. `prompts[0].token_ids.ids[2]`, `params.top_p`); empty for other codes.
    """

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str,
                 field_violations: Sequence[tuple[str, str]] = ()):
        super().__init__(f"{code.name}: {details} (request id {request_id})")
        self.code = code
        self.details = details
        self.request_id = request_id
        self.field_violations: list[tuple[str, str]] = list(field_violations)

    @classmethod
    def wrap(cls, err: grpc.RpcError, request_id: str) -> "RpcError":
        return cls(err.code(), err.details() or "", request_id, field_violations(err))


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) of every `google.rpc.BadRequest` field violation a failed call carries.

    Works on sync errors (a `grpc.Call`) and on `grpc.aio.AioRpcError` alike: both answer
    `code()`, `details()` and `trailing_metadata()` without awaiting, which is all
    `rpc_status.from_call` reads (the `grpc-status-details-bin` trailer). Empty when absent.
    """
    try:
        status = rpc_status.from_call(err)
    except (AttributeError, ValueError):  # not a call, or a trailer that contradicts the status
        return []
    if status is None:
        return []
    found: list[tuple[str, str]] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            found.extend((v.field, v.description) for v in bad.field_violations)
    return found
