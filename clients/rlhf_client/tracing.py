"""OpenTelemetry tracing on the client side: optional, off by default.

Tracing is on in a process when the environment has `RLHF_OTEL=1` (read once, on first use) or
after `enable()`, and only where opentelemetry-api is installed (`pip install 'rlhf[otel]'`).
Off, every hook below costs one flag check and nothing of OpenTelemetry is imported.

On, the context travels as a W3C `traceparent` (https://www.w3.org/TR/trace-context/):

- every RPC of the clients is a CLIENT span `rlhfpb.v1.<Service>/<Method>` whose context goes to
  the server in the call's `traceparent` metadata (the services' interceptor continues it);
- every queue push (`QueueProducer.push*`, a rollout worker's push) is a PRODUCER span
  `<stream> publish`, and each stream entry carries its `traceparent` as an extra field (readers
  ignore fields they do not know; the trainer's read span links to it);
- a job submission is a PRODUCER span `rlhf.job submit` whose `traceparent` rides in the job's
  Celery message headers; the worker's job span is its child.

Spans go to the global tracer provider: an application configures the OpenTelemetry SDK as it
usually does, or calls `configure(service_name)` (OTLP over gRPC, set by the standard
`OTEL_EXPORTER_OTLP_*` variables). The rlhf processes do that themselves (`rlhf.tracing`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

ENV_FLAG = "RLHF_OTEL"
TRACEPARENT = "traceparent"  # gRPC metadata key, Celery message header
TRACEPARENT_FIELD = b"traceparent"  # stream entry field
_TRUE = frozenset({"1", "true", "yes", "on"})
_MAX_LINKS = 128  # the SDK's default span link limit

_enabled: bool | None = None  # None: not decided yet (RLHF_OTEL is read on first use)
_otel: Any = None  # the loaded API pieces (`_load`)


class _Otel:
    """The opentelemetry API pieces the hooks use, imported once tracing is turned on."""

    def __init__(self):
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.SpanKind = trace.SpanKind
        self.Status = trace.Status
        self.StatusCode = trace.StatusCode
        self.Link = trace.Link
        self.propagator = TraceContextTextMapPropagator()
        self.tracer = trace.get_tracer("rlhf_client")  # follows the global provider, even later


def _load() -> _Otel:
    global _otel
    if _otel is None:
        _otel = _Otel()
    return _otel


def enabled() -> bool:
    """Whether this process traces (decided from RLHF_OTEL on the first call)."""
    global _enabled
    if _enabled is None:
        wanted = os.environ.get(ENV_FLAG, "").strip().lower() in _TRUE
        try:
            _enabled = wanted and _load() is not None
        except ImportError:  # asked for, but the otel extra is not installed: stay off
            _enabled = False
    return _enabled


def enable(on: bool = True) -> bool:
    """Turn tracing on (needs opentelemetry-api: ImportError without it) or off in this process."""
    global _enabled
    if on:
        _load()
    _enabled = on
    return on


def configure(service_name: str, *, exporter: Any = None) -> bool:
    """Install an SDK tracer provider and turn tracing on; False when one was installed already
    (the application's own: it is kept, tracing is turned on).

    The resource's `service.name` is `service_name` unless OTEL_SERVICE_NAME /
    OTEL_RESOURCE_ATTRIBUTES say otherwise. Spans go through a batch processor (OTEL_BSP_*) to
    `exporter`, by default OTLP over gRPC (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, ...;
    default localhost:4317); the sampler follows OTEL_TRACES_SAMPLER. Needs the SDK and the
    exporter: `pip install 'rlhf[otel]'`.
    """
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    enable()
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return False
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    resource = Resource.create({SERVICE_NAME: service_name}).merge(OTELResourceDetector().detect())
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans the provider still holds (before a process exits without atexit)."""
    if _otel is None:
        return
    force_flush = getattr(_otel.trace.get_tracer_provider(), "force_flush", None)
    if force_flush is not None:
        force_flush(int(timeout_s * 1000))


# ---------------------------------------------------------------------------------------------
# spans
# ---------------------------------------------------------------------------------------------


class _Off:
    """The hooks' answer while tracing is off: a reusable context manager that does nothing."""

    __slots__ = ("value",)

    def __init__(self, value: Any = None):
        self.value = value

    def __enter__(self) -> Any:
        return self.value

    def __exit__(self, *exc) -> bool:
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        pass


_OFF = _Off()


class _Span:
    """A span for the length of a `with` block: current inside it unless `current=False`,
    exceptions recorded (a cancelled call or a stream closed early is not an error).
    `__enter__` returns `value`, or what `on_start(span)` makes of it."""

    __slots__ = ("name", "kind", "attributes", "parent", "links", "current", "value", "on_start",
                 "span", "_token")

    def __init__(self, name: str, kind: str, *, attributes: Mapping[str, Any] | None = None,
                 parent: Any = None, links: Sequence[Any] = (), current: bool = True,
                 value: Any = None, on_start=None):
        self.name, self.kind, self.attributes = name, kind, dict(attributes or {})
        self.parent, self.links, self.current = parent, links, current
        self.value, self.on_start = value, on_start
        self.span = None
        self._token = None

    def __enter__(self) -> Any:
        o = _load()
        self.span = o.tracer.start_span(self.name, context=self.parent,
                                        kind=getattr(o.SpanKind, self.kind),
                                        attributes=self.attributes, links=self.links)
        if self.current:
            self._token = o.context.attach(o.trace.set_span_in_context(self.span))
        return self.on_start(self.span) if self.on_start is not None else self.value

    def __exit__(self, exc_type, exc, tb) -> bool:
        o = _otel
        span = self.span
        try:
            if exc is not None and not _benign(exc):
                span.record_exception(exc)
                span.set_status(o.Status(o.StatusCode.ERROR, f"{exc_type.__name__}: {exc}"[:500]))
            if self.kind == "CLIENT":  # an RPC: its final status (rlhf_client.RpcError.code)
                code = 0 if exc is None else getattr(getattr(exc, "code", None), "value", None)
                if isinstance(code, tuple):
                    code = code[0]
                if isinstance(code, int):
                    span.set_attribute("rpc.grpc.status_code", code)
        finally:
            if self._token is not None:
                o.context.detach(self._token)
                self._token = None
            span.end()
        return False

    def set_attribute(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)


def _benign(exc: BaseException) -> bool:
    return isinstance(exc, (GeneratorExit, asyncio.CancelledError, KeyboardInterrupt))


def span(name: str, *, kind: str = "INTERNAL", attributes: Mapping[str, Any] | None = None,
         traceparent: str | bytes | None = None, links: Iterable[str | bytes | None] = ()):
    """A context manager: a span made current for the block (a no-op while tracing is off).

    `kind`: INTERNAL, SERVER, CLIENT, PRODUCER or CONSUMER. `traceparent`: continue that remote
    context (its span becomes the parent) instead of the current one. `links`: traceparents to
    link to (the spans whose work this one consumes)."""
    if not enabled():
        return _OFF
    return _Span(name, kind, attributes=attributes,
                 parent=_context(traceparent) if traceparent else None, links=_links(links))


def rpc_span(rpc: Any, metadata: Sequence[tuple[str, str]]):
    """The CLIENT span of one RPC: `with rpc_span(stub.Method, md) as md:` gives the metadata
    to send (with the span's `traceparent` added). The span is not made current (nothing in this
    process runs inside a call), so it is safe around a stream that a caller leaves early."""
    if not enabled():
        return _Off(metadata)
    path = getattr(rpc, "_method", b"")  # grpc's multicallables keep their method path here
    name = (path.decode() if isinstance(path, bytes) else str(path or "")).lstrip("/") or "rpc"
    service, _, method = name.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    rid = next((v for k, v in metadata if k == "x-request-id"), None)
    if rid:
        attributes["rlhf.request_id"] = rid

    def with_traceparent(s) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        _otel.propagator.inject(carrier, context=_otel.trace.set_span_in_context(s))
        return (*metadata, *carrier.items())

    return _Span(name, "CLIENT", attributes=attributes, current=False, on_start=with_traceparent)


def producer_span(destination: str | Callable[[], str], *, count: int = 1,
                  operation: str = "publish", attributes: Mapping[str, Any] | None = None):
    """A PRODUCER span `<destination> <operation>` made current: what is encoded inside it
    (`traceparent()`, `encode_entry`'s field) carries its context. `destination` may be a
    function that names it (called only while tracing is on)."""
    if not enabled():
        return _OFF
    if callable(destination):
        destination = destination()
    attrs = {"messaging.system": "redis", "messaging.destination.name": destination,
             "messaging.operation.type": "send", "messaging.batch.message_count": count}
    attrs.update(attributes or {})
    return _Span(f"{destination} {operation}", "PRODUCER", attributes=attrs)


def consumer_span(source: str, traceparents: Iterable[str | bytes | None], *,
                  start_time_ns: int | None = None, attributes: Mapping[str, Any] | None = None,
                  operation: str = "receive") -> None:
    """Record a finished CONSUMER span `<source> <operation>` (a child of the current span,
    linked to each message's producer), from `start_time_ns` to now."""
    if not enabled():
        return
    o = _load()
    tps = list(traceparents)
    attrs = {"messaging.system": "redis", "messaging.destination.name": source,
             "messaging.operation.type": operation, "messaging.batch.message_count": len(tps)}
    attrs.update(attributes or {})
    s = o.tracer.start_span(f"{source} {operation}", kind=o.SpanKind.CONSUMER, attributes=attrs,
                            links=_links(tps), start_time=start_time_ns)
    s.end()


def set_attribute(key: str, value: Any) -> None:
    """Set an attribute on the current span (nothing while tracing is off or none is current)."""
    if enabled():
        _otel.trace.get_current_span().set_attribute(key, value)


def traceparent() -> str | None:
    """The current span's `traceparent` (None while tracing is off or no span is current)."""
    if not enabled():
        return None
    carrier: dict[str, str] = {}
    _otel.propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def message_headers() -> dict[str, str]:
    """Headers that carry the current context in a message (`{}` while off)."""
    tp = traceparent()
    return {TRACEPARENT: tp} if tp else {}


def _context(tp: str | bytes):
    if isinstance(tp, bytes):
        tp = tp.decode("ascii", "replace")
    return _otel.propagator.extract({TRACEPARENT: tp})


def _links(traceparents: Iterable[str | bytes | None]) -> list:
    out, seen = [], set()
    for tp in traceparents:
        if not tp or tp in seen:
            continue
        seen.add(tp)
        ctx = _otel.trace.get_current_span(_context(tp)).get_span_context()
        if ctx.is_valid:
            out.append(_otel.Link(ctx))
            if len(out) >= _MAX_LINKS:
                break
    return out


__all__ = [
    "ENV_FLAG",
    "TRACEPARENT",
    "TRACEPARENT_FIELD",
    "configure",
    "consumer_span",
    "enable",
    "enabled",
    "flush",
    "message_headers",
    "producer_span",
    "rpc_span",
    "set_attribute",
    "span",
    "traceparent",
]
