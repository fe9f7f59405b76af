"""Bearer-token auth on EVERY RPC of every service (issue 18).

The walk enumerates the RPCs from the protobuf service descriptors of every `rlhfpb.v1` module,
so an RPC or a service added later is walked without touching this file (a service no server
here mounts fails the walk). With `auth_token` set, each RPC refuses a missing token, a wrong
one and near misses with UNAUTHENTICATED, before its handler runs (the request is empty: a
handler that ran would answer INVALID_ARGUMENT or better). Admin RPCs (the bindings'
`admin_methods`, LoadVersion) want the admin token: the data token is UNAUTHENTICATED there too.

Exempt by design (rlhf.serving.interceptors): grpc.health.v1 (Kubernetes probes carry no token;
it reveals only SERVING / NOT_SERVING) and server reflection (the schema of the public protos;
off in production, RLHF_REFLECTION=false in deploy/k8s/overlays/gpu).
"""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest
import rlhfpb.v1
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ADMIN_TOKEN, ThreadedApp, make_settings

TOKEN = "data-token-3f9a"
TIMEOUT = 20.0
# What an empty request may get once auth lets it through: the handler's own answer.
PAST_AUTH = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
             grpc.StatusCode.FAILED_PRECONDITION}
BAD_HEADERS = {
    "no token": None,
    "wrong token": f"Bearer {TOKEN}x"[:-1][::-1],
    "token with a suffix": f"Bearer {TOKEN}x",
    "token prefix": f"Bearer {TOKEN[:-1]}",
    "no Bearer scheme": TOKEN,
    "lower-case scheme": f"bearer {TOKEN}",
    "empty bearer": "Bearer ",
}


def all_rpcs():
    """(service descriptor, method descriptor) of every RPC in every rlhfpb.v1 module."""
    out = []
    for mod in pkgutil.iter_modules(rlhfpb.v1.__path__):
        if not mod.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"rlhfpb.v1.{mod.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend((service, method) for method in service.methods)
    return out


RPCS = all_rpcs()


@pytest.fixture(scope="module")
def servers(tiny_policy_dir, tiny_reward_dir):
    """service full name → (target, admin method paths) for the three services, auth on."""
    from rlhf.policy.app import make_policy_app
    from rlhf.reference.app import make_reference_app
    from rlhf.reward.app import make_reward_app

    apps = [ThreadedApp(make(make_settings(model_dir=model, auth_token=TOKEN)))
            for make, model in ((make_policy_app, tiny_policy_dir), (make_reward_app, tiny_reward_dir),
                                (make_reference_app, tiny_policy_dir))]
    started = []
    try:
        out = {}
        for app in apps:
            started.append(app.__enter__())
            for b in app.app.server.bindings:
                out[b.full_name] = (app.target, {f"/{b.full_name}/{m}" for m in b.admin_methods})
        yield out
    finally:
        for app in started:
            app.__exit__(None, None, None)


def call(target: str, service, method, authorization: str | None) -> grpc.StatusCode:
    path = f"/{service.full_name}/{method.name}"
    request = message_factory.GetMessageClass(method.input_type)()
    response = message_factory.GetMessageClass(method.output_type)
    metadata = (("authorization", authorization),) if authorization is not None else None
    with grpc.insecure_channel(target) as ch:
        kwargs = dict(request_serializer=type(request).SerializeToString,
                      response_deserializer=response.FromString)
        try:
            if method.client_streaming:
                pytest.fail(f"{path}: client streaming: the interceptor has no auth for it yet")
            if method.server_streaming:
                for _ in ch.unary_stream(path, **kwargs)(request, timeout=TIMEOUT, metadata=metadata):
                    pass
            else:
                ch.unary_unary(path, **kwargs)(request, timeout=TIMEOUT, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_the_walk_covers_every_service_and_finds_admin_rpcs(servers):
    services = {s.full_name for s, _ in RPCS}
    assert len(RPCS) >= 10 and len(services) >= 3
    missing = services - servers.keys()
    assert not missing, f"{sorted(missing)}: no server in this walk mounts them: add it to `servers`"
    for name, (_, admin) in servers.items():
        assert admin, f"{name}: no admin RPCs (LoadVersion)"


@pytest.mark.parametrize("service,method", RPCS, ids=[f"{s.name}.{m.name}" for s, m in RPCS])
def test_every_rpc_refuses_missing_and_wrong_tokens(servers, service, method):
    target, admin = servers[service.full_name]
    path = f"/{service.full_name}/{method.name}"
    for what, header in BAD_HEADERS.items():
        assert call(target, service, method, header) == grpc.StatusCode.UNAUTHENTICATED, f"{path}: {what}"
    if path in admin:
        # a data token is not an admin token
        assert call(target, service, method, f"Bearer {TOKEN}") == grpc.StatusCode.UNAUTHENTICATED, path
        assert call(target, service, method, f"Bearer {ADMIN_TOKEN}") in PAST_AUTH, path
    else:
        assert call(target, service, method, f"Bearer {TOKEN}") in PAST_AUTH, path
        # the admin token may do whatever the data token may
        assert call(target, service, method, f"Bearer {ADMIN_TOKEN}") in PAST_AUTH, path


def test_health_needs_no_token(servers):
    """Kubernetes gRPC probes send no metadata; health reveals only the serving status."""
    for target, _ in servers.values():
        with grpc.insecure_channel(target) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_needs_no_token_and_can_be_turned_off(servers, tiny_policy_dir):
    """Reflection describes only the public protos; production turns it off (RLHF_REFLECTION)."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    from rlhf.serving.server import ModelServer

    target, _ = servers["rlhfpb.v1.PolicyService"]
    with grpc.insecure_channel(target) as ch:
        assert "rlhfpb.v1.PolicyService" in ProtoReflectionDescriptorDatabase(ch).get_services()

    off = ThreadedApp(None)  # a bare ModelServer (no model needed) on its own loop
    try:
        server = ModelServer(make_settings(auth_token=TOKEN, reflection=False), "bare", [])
        port = off.call(server.start())
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.RpcError) as err:
                ProtoReflectionDescriptorDatabase(ch).get_services()
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        off.call(server.drain(0))
    finally:
        off.loop.call_soon_threadsafe(off.loop.stop)
        off._thread.join(timeout=10)


def test_token_comparison_is_constant_time():
    """The check is hmac.compare_digest on bytes (no early exit on the first differing byte)."""
    import inspect

    from rlhf.serving import interceptors

    source = inspect.getsource(interceptors._token_ok)
    assert "hmac.compare_digest(" in source and "==" not in source
    ok = interceptors._token_ok
    assert ok({"authorization": f"Bearer {TOKEN}"}, TOKEN)
    assert not ok({"authorization": f"Bearer {TOKEN}"}, None)
    assert not ok({}, TOKEN)
    assert not ok({"authorization": f"Bearer {TOKEN}é"}, TOKEN)  # non-ASCII: refused, no error
