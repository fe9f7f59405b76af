"""One server interceptor: request id, bearer-token auth, error → status mapping, metrics, and
the RPC's server span while tracing is on (rlhf.tracing).

Health and reflection RPCs pass without a token (Kubernetes probes carry none). Data RPCs need
the auth token when one is set; admin RPCs always need the admin token (none set: refused).
A `ServiceError` becomes its status (INVALID_ARGUMENT with `google.rpc.BadRequest` field
violations in `grpc-status-details-bin`); any other exception is a bug, logged with the request id
and reported as INTERNAL — never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import logging
import time
import uuid
from typing import Awaitable, Callable, Iterable

import grpc

from rlhf.errors import ServiceError, Unauthenticated, status_of_error
from rlhf.serving.metrics import RPC_COUNT, RPC_LATENCY
from rlhf.tracing import rpc_code, server_traced

log = logging.getLogger(__name__)

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
_OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record (use %(request_id)s in the format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def _token_ok(metadata: dict[str, str], token: str | None) -> bool:
    if token is None:
        return False
    got = metadata.get("authorization", "")
    return hmac.compare_digest(got.encode(), f"Bearer {token}".encode())


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler of one server."""

    def __init__(
        self,
        service_label: str,
        *,
        auth_token: str | None,
        admin_token: str | None,
        admin_methods: Iterable[str],
    ):
        self._label = service_label
        self._auth = auth_token
        self._admin = admin_token
        self._admin_methods = frozenset(admin_methods)

    def _auth_error(self, method: str, metadata: dict[str, str]) -> str | None:
        if method.startswith(_OPEN_PREFIXES):
            return None
        if method in self._admin_methods:
            if self._admin is None:
                return "admin RPCs are disabled: the server has no admin token set"
            return None if _token_ok(metadata, self._admin) else "missing or wrong admin token"
        if self._auth is None:
            return None
        if _token_ok(metadata, self._auth) or _token_ok(metadata, self._admin):
            return None
        return "missing or wrong token"

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_PREFIXES):
            return handler
        method = details.method
        short = method.rsplit("/", 1)[-1]
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        request_id = metadata.get("x-request-id") or uuid.uuid4().hex
        auth_error = self._auth_error(method, metadata)

        def observe(code: grpc.StatusCode, started: float) -> None:
            RPC_COUNT.labels(self._label, short, code.name).inc()
            RPC_LATENCY.labels(self._label, short, code.name).observe(time.perf_counter() - started)
            rpc_code(code)  # on the RPC's server span, while tracing is on

        async def guard(context: grpc.aio.ServicerContext) -> None:
            REQUEST_ID.set(request_id)
            context.set_trailing_metadata((("x-request-id", request_id),))  # cheap: no extra frame
            if auth_error is not None:
                raise Unauthenticated(auth_error)

        async def fail(context, exc: BaseException, started: float):
            if not isinstance(exc, ServiceError):
                log.exception("bug: unhandled error in %s (request %s)", method, request_id)
                exc = ServiceError(f"internal error (request id {request_id})")  # INTERNAL
            observe(exc.code, started)
            # the one abort: INVALID_ARGUMENT carries its google.rpc.BadRequest field violations
            await context.abort_with_status(
                status_of_error(exc, trailing_metadata=(("x-request-id", request_id),)))

        if handler.unary_unary is not None:
            behavior: Callable[..., Awaitable] = handler.unary_unary

            async def unary_unary(request, context):
                started = time.perf_counter()
                try:
                    await guard(context)
                    response = await behavior(request, context)
                except grpc.aio.AbortError:  # the servicer aborted itself (or fail() did)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    observe(grpc.StatusCode.CANCELLED, started)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await fail(context, exc, started)
                else:
                    observe(grpc.StatusCode.OK, started)
                    return response

            return grpc.unary_unary_rpc_method_handler(
                server_traced(unary_unary, method, metadata, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request, context):
                started = time.perf_counter()
                try:
                    await guard(context)
                    async for item in stream_behavior(request, context):
                        yield item
                except grpc.aio.AbortError:  # the servicer aborted itself (or fail() did)
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    observe(grpc.StatusCode.CANCELLED, started)
                    raise
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    await fail(context, exc, started)
                else:
                    observe(grpc.StatusCode.OK, started)

            return grpc.unary_stream_rpc_method_handler(
                server_traced(unary_stream, method, metadata, request_id),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # client/bidi streaming: none in this contract
