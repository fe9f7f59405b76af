"""Call mechanics shared by every client: deadline, request id, token, error wrapping, and a
client span per call when tracing is on (`rlhf_client.tracing`)."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import grpc

from rlhf_client import tracing
from rlhf_client.channel import DEFAULT_TIMEOUT_S, TlsArg, aio_channel, call_metadata, sync_channel
from rlhf_client.errors import RpcError


class SyncBase:
    """Owns a channel; every call carries a deadline and a request id.

    `tls`: TlsOptions (TLS / mutual TLS), False (plaintext), True, or None (default: the
    RLHF_TLS_* environment decides; see rlhf_client.channel)."""

    def __init__(self, target: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 admin_token: str | None = None, channel: grpc.Channel | None = None,
                 tls: TlsArg = None):
        self._channel = channel or sync_channel(target, tls=tls)
        self._own_channel = channel is None
        self.token = token
        self.admin_token = admin_token
        self.timeout = timeout

    def _unary(self, rpc, request, *, timeout=None, request_id=None, admin=False) -> Any:
        md, rid = call_metadata(self.admin_token if admin else self.token, request_id)
        with tracing.rpc_span(rpc, md) as md:
            try:
                return rpc(request, timeout=timeout or self.timeout, metadata=md)
            except grpc.RpcError as err:
                raise RpcError.wrap(err, rid) from None

    def _stream(self, rpc, request, *, timeout=None, request_id=None) -> Iterator[Any]:
        md, rid = call_metadata(self.token, request_id)
        with tracing.rpc_span(rpc, md) as md:
            try:
                yield from rpc(request, timeout=timeout or self.timeout, metadata=md)
            except grpc.RpcError as err:
                raise RpcError.wrap(err, rid) from None

    def close(self) -> None:
        if self._own_channel:
            self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncBase:
    """Async twin of SyncBase (grpc.aio)."""

    def __init__(self, target: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 admin_token: str | None = None, channel: grpc.aio.Channel | None = None,
                 tls: TlsArg = None):
        self._channel = channel or aio_channel(target, tls=tls)
        self._own_channel = channel is None
        self.token = token
        self.admin_token = admin_token
        self.timeout = timeout

    async def _unary(self, rpc, request, *, timeout=None, request_id=None, admin=False) -> Any:
        md, rid = call_metadata(self.admin_token if admin else self.token, request_id)
        with tracing.rpc_span(rpc, md) as md:
            try:
                return await rpc(request, timeout=timeout or self.timeout, metadata=md)
            except grpc.RpcError as err:
                raise RpcError.wrap(err, rid) from None

    async def _stream(self, rpc, request, *, timeout=None, request_id=None) -> AsyncIterator[Any]:
        md, rid = call_metadata(self.token, request_id)
        with tracing.rpc_span(rpc, md) as md:
            call = rpc(request, timeout=timeout or self.timeout, metadata=md)
            try:
                async for item in call:
                    yield item
            except grpc.RpcError as err:
                raise RpcError.wrap(err, rid) from None
            finally:
                call.cancel()  # no-op when finished; aborts the server-side work when we stop early

    async def close(self) -> None:
        if self._own_channel:
            await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
