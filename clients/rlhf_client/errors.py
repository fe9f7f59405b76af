"""The one exception the clients raise for a failed RPC."""

from __future__ import annotations

import grpc


class RpcError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str):
        super().__init__(f"{code.name}: {details} (request id {request_id})")
        self.code = code
        self.details = details
        self.request_id = request_id

    @classmethod
    def wrap(cls, err: grpc.RpcError, request_id: str) -> "RpcError":
        return cls(err.code(), err.details() or "", request_id)
