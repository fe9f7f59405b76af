"""OpenTelemetry tracing on real parts: one trace follows a call, a rollout and a job.

In this process spans go to the SDK's in-memory exporter (the global tracer provider the module
installs, tracing turned on with `rlhf_client.tracing.enable()`): the clients, the in-process
gRPC servers (tiny models) and the queue reads all record into it. The job test runs a real
`rlhf worker` process with RLHF_OTEL=1, whose spans come over OTLP/gRPC to a collector this test
serves (opentelemetry-proto's TraceService): the worker's own setup (`rlhf.tracing`) is what is
tested there. Redis: db 15 (the observability tests' own), names of their own.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from helpers import TEST_REDIS, ThreadedApp, make_settings
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from job_bench import job_bench
from trainer_helpers import delete_matching, unique, wait_for

from rlhf_client import (
    AsyncPolicyClient,
    AsyncReferenceClient,
    AsyncRewardClient,
    PolicyClient,
    QueueProducer,
    RpcError,
    SamplingParams,
    tracing,
)
from rlhf_client.queues import encode_entry
from rlhf_client.redis_conn import connect
from rlhfpb.v1 import samples_pb2

from rlhf.trainer.queues import StreamConsumer
from rlhf.trainer.rollout import ListSource, PromptItem, RolloutOptions, RolloutWorker

REDIS_URL = f"{TEST_REDIS}/15"
GENERATE = "rlhfpb.v1.PolicyService/Generate"


@pytest.fixture(scope="module")
def exporter():
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.enable()
    yield memory
    tracing.enable(False)
    memory.clear()


@pytest.fixture
def spans(exporter):
    exporter.clear()
    yield exporter
    tracing.enable()  # a test that turned it off


@pytest.fixture
def r():
    client = connect(REDIS_URL)
    made: list[str] = []
    yield client, made
    for name in made:
        delete_matching(client, f"{name}*")
    client.close()


def finished(exporter, *, name: str | None = None, kind: SpanKind | None = None) -> list:
    return [s for s in exporter.get_finished_spans()
            if (name is None or s.name == name) and (kind is None or s.kind == kind)]


def wait_span(exporter, name: str, kind: SpanKind, n: int = 1) -> list:
    return wait_for(lambda: len(finished(exporter, name=name, kind=kind)) >= n
                    and finished(exporter, name=name, kind=kind), timeout=30,
                    what=f"{n} {kind.name} span(s) {name}")


def child_of(span, parent) -> bool:
    return (span.parent is not None and span.parent.span_id == parent.context.span_id
            and span.context.trace_id == parent.context.trace_id)


def traceparent_of(span) -> str:
    c = span.context
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


# ------------------------------------------------------------------------------------------------
# one call
# ------------------------------------------------------------------------------------------------


def test_a_call_is_one_trace_from_the_client_span_to_the_server_span(spans, policy_target):
    with PolicyClient(policy_target) as client:
        client.generate("hello there", SamplingParams(max_new_tokens=2), request_id="trace-call-1")
        chunks = list(client.generate_stream("hello", SamplingParams(max_new_tokens=2)))
        assert chunks
        with pytest.raises(RpcError) as bad:
            client.generate("hello", SamplingParams(max_new_tokens=10**6))
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT

    servers = wait_span(spans, GENERATE, SpanKind.SERVER, 2)
    clients = finished(spans, name=GENERATE, kind=SpanKind.CLIENT)
    assert len(clients) == 2
    for client_span in clients:
        (server_span,) = [s for s in servers if child_of(s, client_span)]  # one trace, linked
        assert client_span.attributes["rpc.system"] == "grpc"
        assert server_span.attributes["rpc.system"] == "grpc"
        assert server_span.attributes["rpc.method"] == "Generate"
        assert (server_span.attributes["rlhf.request_id"]
                == client_span.attributes["rlhf.request_id"])
        assert (client_span.attributes["rpc.grpc.status_code"]
                == server_span.attributes["rpc.grpc.status_code"])
    ok, failed = sorted(clients, key=lambda s: s.attributes["rpc.grpc.status_code"])
    assert ok.attributes["rlhf.request_id"] == "trace-call-1"
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status.status_code == StatusCode.UNSET
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.status.status_code == StatusCode.ERROR

    (stream_client,) = finished(spans, name="rlhfpb.v1.PolicyService/GenerateStream",
                                kind=SpanKind.CLIENT)
    (stream_server,) = wait_span(spans, "rlhfpb.v1.PolicyService/GenerateStream", SpanKind.SERVER)
    assert child_of(stream_server, stream_client)
    assert stream_server.attributes["rpc.grpc.status_code"] == 0


def test_tracing_off_makes_no_spans_and_adds_no_field(spans, policy_target):
    tracing.enable(False)
    with PolicyClient(policy_target) as client:
        client.generate("hello", SamplingParams(max_new_tokens=1))
    pair = samples_pb2.PreferencePair(id="x", prompt="p", chosen="a", rejected="b")
    assert set(encode_entry(pair)) == {b"type", b"id", b"data"}
    assert tracing.traceparent() is None and tracing.message_headers() == {}
    md = (("x-request-id", "r"),)
    with tracing.rpc_span(object(), md) as sent:
        assert sent is md  # the metadata untouched: nothing was started
    assert spans.get_finished_spans() == ()


# ------------------------------------------------------------------------------------------------
# Redis streams
# ------------------------------------------------------------------------------------------------


def test_a_pushed_pair_s_read_links_to_its_push(spans, r):
    client, made = r
    stream = unique("test:trace-pairs")
    made.append(stream)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("application"):
        pid = QueueProducer(client).push_pair(prompt="2+2?", chosen="4", rejected="5",
                                              stream=stream)
    (push,) = finished(spans, name=f"{stream} publish", kind=SpanKind.PRODUCER)
    (app,) = finished(spans, name="application")
    assert child_of(push, app)
    ((_, fields),) = client.xrange(stream)
    assert fields[b"traceparent"].decode() == traceparent_of(push)  # the entry carries its push

    consumer = StreamConsumer(client, stream, "trace-group", "c1", max_deliveries=3,
                              claim_idle_ms=60_000)
    with tracer.start_as_current_span("job"):
        (entry,) = consumer.read(10)
        assert consumer.read(10) == []  # nothing read: no span
    assert entry.id == pid and entry.traceparent == traceparent_of(push)
    (read,) = finished(spans, name=f"{stream} receive", kind=SpanKind.CONSUMER)
    (job,) = finished(spans, name="job")
    assert child_of(read, job)  # in the job's trace ...
    assert [link.context.span_id for link in read.links] == [push.context.span_id]  # ... linked
    assert read.attributes["messaging.batch.message_count"] == 1
    assert read.attributes["messaging.consumer.group.name"] == "trace-group"


# ------------------------------------------------------------------------------------------------
# a rollout batch
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scorers(tiny_reward_dir, tiny_policy_dir):
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    with ThreadedApp(make_reward_app(make_settings(model_dir=tiny_reward_dir))) as reward, \
            ThreadedApp(make_reference_app(make_settings(model_dir=tiny_policy_dir))) as reference:
        yield reward.target, reference.target


async def test_a_rollout_batch_is_one_trace_through_the_services_to_the_push(spans, r, scorers,
                                                                              policy_target):
    client, made = r
    stream = unique("test:trace-samples")
    made.append(stream)
    options = RolloutOptions(n=2, batch_prompts=2, concurrency=1, max_new_tokens=3,
                             samples_stream=stream)
    items = [PromptItem(unique("p"), text, "test") for text in ("the cat sat", "a good dog")]
    async with AsyncPolicyClient(policy_target) as pc, AsyncRewardClient(scorers[0]) as rc, \
            AsyncReferenceClient(scorers[1]) as fc:
        worker = RolloutWorker(pc, rc, fc, client, ListSource(items, max_attempts=1, backoff_s=0.1),
                               options)
        stats = await worker.run()
    assert stats.samples_pushed == 4

    (batch,) = finished(spans, name="rlhf.rollout batch")
    assert batch.attributes["rlhf.rollout.prompts"] == 2
    for rpc in (GENERATE, "rlhfpb.v1.RewardService/Score", "rlhfpb.v1.ReferenceService/LogProbs"):
        (call,) = finished(spans, name=rpc, kind=SpanKind.CLIENT)
        assert child_of(call, batch), rpc
        servers = wait_span(spans, rpc, SpanKind.SERVER)
        assert [s for s in servers if child_of(s, call)], f"{rpc}: the server span continues it"
    (push,) = finished(spans, name=f"{stream} publish", kind=SpanKind.PRODUCER)
    assert child_of(push, batch)
    assert push.attributes["messaging.batch.message_count"] == 4
    entries = client.xrange(stream)
    assert len(entries) == 4
    assert {f[b"traceparent"].decode() for _, f in entries} == {traceparent_of(push)}


# ------------------------------------------------------------------------------------------------
# a job: client submit → Celery message header → the worker's job span → its stream reads
# ------------------------------------------------------------------------------------------------


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: what an OpenTelemetry collector would get."""

    def __init__(self):
        self.spans: list[tuple[str, object]] = []  # (service.name, otlp Span)
        self._lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the proto's name
        with self._lock:
            for rs in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    self.spans.extend((attrs.get("service.name", ""), s) for s in ss.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[tuple[str, object]]:
        with self._lock:
            return [(svc, s) for svc, s in self.spans if s.name == name]


@pytest.fixture
def collector():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    received = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(received, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield received, port
    server.stop(grace=None)


@pytest.fixture
def bench(tmp_path, tiny_reward_dir, collector):
    with job_bench(tmp_path, tiny_reward_dir, REDIS_URL, RLHF_OTEL="1",
                   OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{collector[1]}",
                   OTEL_BSP_SCHEDULE_DELAY="100") as made:
        yield made


def test_a_job_s_span_in_the_worker_continues_the_submit_s_trace(spans, bench, collector):
    bench.start("traced")
    with trace.get_tracer("test").start_as_current_span("application"):
        job_id = bench.submit_small_job(seed=4)  # push the pairs, submit the job
    assert bench.tc.wait(job_id, timeout=180, poll_s=0.2).status == "succeeded"

    (submit,) = finished(spans, name="rlhf.job submit", kind=SpanKind.PRODUCER)
    (push,) = finished(spans, name=f"{bench.stream} publish", kind=SpanKind.PRODUCER)
    assert submit.attributes["rlhf.job_id"] == job_id
    assert submit.context.trace_id == push.context.trace_id  # both in the application's trace

    received = collector[0]
    ((service, job),) = wait_for(lambda: received.named("rlhf.job reward_model"),
                                 timeout=60, what="the worker's job span at the collector")
    assert service == "rlhf-trainer"
    assert job.kind == job.SPAN_KIND_CONSUMER
    assert int.from_bytes(job.trace_id, "big") == submit.context.trace_id  # one trace ...
    assert int.from_bytes(job.parent_span_id, "big") == submit.context.span_id  # ... its child
    attrs = {a.key: a.value for a in job.attributes}
    assert attrs["rlhf.job_id"].string_value == job_id

    reads = wait_for(lambda: received.named(f"{bench.stream} receive"), timeout=60,
                     what="the job's stream read span at the collector")
    for _, read in reads:
        assert read.trace_id == job.trace_id and read.parent_span_id == job.span_id
    links = {int.from_bytes(link.span_id, "big") for _, read in reads for link in read.links}
    assert links == {push.context.span_id}  # every pair it read came from that push
