"""OpenTelemetry tracing of the rlhf processes: optional (the `otel` extra), off by default.

On with `RLHF_OTEL=1` (`Settings.otel`). Each process then installs an SDK tracer provider
(`setup`): `service.name` = `rlhf-<service>` (rlhf-policy, rlhf-reward, rlhf-reference,
rlhf-trainer, rlhf-rollout; OTEL_SERVICE_NAME overrides it), spans batched to an OTLP/gRPC
exporter that the standard variables configure (OTEL_EXPORTER_OTLP_ENDPOINT, ..._HEADERS,
OTEL_TRACES_SAMPLER, OTEL_BSP_*: read by the OpenTelemetry SDK, not by rlhf).

Spans of the server side (the client side and the primitives are `rlhf_client.tracing`):

- `server_traced`: every data RPC is a SERVER span `rlhfpb.v1.<Service>/<Method>`, the child of
  the caller's span when the call's metadata carries a `traceparent`, with the final status code
  (`rpc.grpc.status_code`) and the request id;
- `job_span`: every delivery of a training job is a CONSUMER span `rlhf.job <type>`, the child of
  the submit span whose `traceparent` the job's Celery message carries in its headers; the
  job's stream reads (`rlhf.trainer.queues.StreamConsumer.read`) are its children, linked to
  the pushes that produced the entries.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Callable

from rlhf_client import tracing

from rlhf.config import Settings
from rlhf.errors import StartupError

log = logging.getLogger(__name__)

SERVICE_PREFIX = "rlhf-"


def setup(settings: Settings, service: str) -> bool:
    """Install this process's tracer provider when `settings.otel`; True when tracing is on.
    StartupError (naming `otel`) when it is asked for but the extra is not installed."""
    if not settings.otel:
        return False
    try:
        installed = tracing.configure(SERVICE_PREFIX + service)
    except ImportError as exc:
        raise StartupError(f"tracing is on but OpenTelemetry is missing ({exc}): "
                           "pip install 'rlhf[otel]'", "otel") from exc
    log.info("tracing on: spans of %s%s go to the OTLP exporter%s", SERVICE_PREFIX, service,
             "" if installed else " of the tracer provider already installed")
    return True


def setup_worker(settings: Settings) -> None:
    """`rlhf worker`: tracing in the processes that run the jobs. A prefork pool's children set
    it up for themselves (the exporter's gRPC channel and the batch thread do not survive a
    fork), and flush what they hold when they stop; the solo pool sets it up here."""
    if not settings.otel:
        return
    from celery import signals

    if settings.worker_pool == "prefork":
        _require_otel()
        signals.worker_process_init.connect(lambda **_: setup(settings, "trainer"), weak=False)
        signals.worker_process_shutdown.connect(lambda **_: tracing.flush(), weak=False)
    else:
        setup(settings, "trainer")


def _require_otel() -> None:
    try:
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise StartupError(f"tracing is on but OpenTelemetry is missing ({exc}): "
                           "pip install 'rlhf[otel]'", "otel") from exc


def server_traced(behavior: Callable, method: str, metadata: dict[str, str],
                  request_id: str) -> Callable:
    """`behavior` (an RPC handler: coroutine or async generator function) run inside its SERVER
    span; `behavior` itself while tracing is off."""
    if not tracing.enabled():
        return behavior
    name = method.lstrip("/")
    service, _, short = name.rpartition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": short,
                  "rlhf.request_id": request_id}
    parent = metadata.get(tracing.TRACEPARENT)

    if inspect.isasyncgenfunction(behavior):
        async def traced_stream(request, context):
            with tracing.span(name, kind="SERVER", attributes=attributes, traceparent=parent):
                async for item in behavior(request, context):
                    yield item

        return traced_stream

    async def traced(request, context):
        with tracing.span(name, kind="SERVER", attributes=attributes, traceparent=parent):
            return await behavior(request, context)

    return traced


def rpc_code(code: Any) -> None:
    """Record an RPC's final grpc.StatusCode on the current (server) span."""
    if tracing.enabled():
        tracing.set_attribute("rpc.grpc.status_code", code.value[0])


def job_span(task: Any, job_type: str):
    """A context manager: the span of one delivery of a job's Celery task (`task` is the bound
    task), the child of the submit whose `traceparent` the message headers carry."""
    if not tracing.enabled():
        return contextlib.nullcontext()
    req = task.request
    return tracing.span(
        f"rlhf.job {job_type}", kind="CONSUMER",
        traceparent=getattr(req, tracing.TRACEPARENT, None),
        attributes={"rlhf.job_id": req.id or "", "rlhf.job_type": job_type,
                    "messaging.system": "celery", "messaging.operation.type": "process",
                    "celery.task_name": task.name, "celery.retries": int(req.retries or 0),
                    "celery.hostname": req.hostname or ""})
