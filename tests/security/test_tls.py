"""TLS and mutual TLS on the gRPC services (issue 18), with certificates made here.

A CA, a server certificate for localhost / 127.0.0.1, a client certificate, and a second CA (with
its own client certificate) that nothing trusts. Real servers on loopback, one tiny model each:
a TLS policy service (with the plaintext health-only port) and policy, reward and reference
services that require client certificates (mutual TLS). A handshake the server or the client
refuses surfaces as UNAVAILABLE.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import ThreadedApp, make_settings
from rlhf_client import PolicyClient, ReferenceClient, RewardClient, TlsOptions
from rlhf_client.channel import resolve_tls
from rlhf_client.errors import RpcError
from rlhfpb.v1 import common_pb2, policy_pb2_grpc

TIMEOUT = 20.0

# --- certificates ---------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: str, key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _write(out: Path, stem: str, cert, key) -> None:
    (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def make_ca(out: Path, stem: str):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(stem, stem, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(out, stem, cert, key)
    return cert, key


def issue(out: Path, stem: str, ca, *, server: bool) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(stem, ca_cert.subject.rfc4514_string()[3:], key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    _write(out, stem, builder.sign(ca_key, hashes.SHA256()), key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem; server.pem/.key (localhost, 127.0.0.1); client.pem/.key (signed by ca);
    other-ca.pem and other-client.pem/.key (a CA no server trusts)."""
    out = tmp_path_factory.mktemp("pki")
    ca = make_ca(out, "ca")
    issue(out, "server", ca, server=True)
    issue(out, "client", ca, server=False)
    other = make_ca(out, "other-ca")
    issue(out, "other-client", other, server=False)
    return out


def client_tls(pki: Path, *, ca: str = "ca", cert: str | None = "client") -> TlsOptions:
    return TlsOptions(ca_file=pki / f"{ca}.pem",
                      cert_file=pki / f"{cert}.pem" if cert else None,
                      key_file=pki / f"{cert}.key" if cert else None)


# --- servers -------------------------------------------------------------------------------------

CLIENTS = {"policy": PolicyClient, "reward": RewardClient, "reference": ReferenceClient}


def _app(service: str, model: Path, **settings):
    if service == "policy":
        from rlhf.policy.app import make_policy_app as make
    elif service == "reward":
        from rlhf.reward.app import make_reward_app as make
    else:
        from rlhf.reference.app import make_reference_app as make
    return make(make_settings(model_dir=model, **settings))


@pytest.fixture(scope="module")
def tls_policy(pki, tiny_policy_dir):
    """TLS (no client certificates asked) + a plaintext health-only port."""
    app = _app("policy", tiny_policy_dir, tls_cert_file=pki / "server.pem",
               tls_key_file=pki / "server.key", health_port=0)
    with ThreadedApp(app) as served:
        yield served


@pytest.fixture(scope="module")
def mtls_servers(pki, tiny_policy_dir, tiny_reward_dir):
    """Policy, reward and reference services that require a client certificate signed by ca."""
    models = {"policy": tiny_policy_dir, "reward": tiny_reward_dir, "reference": tiny_policy_dir}
    apps = {s: ThreadedApp(_app(s, m, tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                                tls_client_ca_file=pki / "ca.pem"))
            for s, m in models.items()}
    started = []
    try:
        for app in apps.values():
            started.append(app.__enter__())
        yield {s: app.target for s, app in apps.items()}
    finally:
        for app in started:
            app.__exit__(None, None, None)


def code_of(client_cls, target: str, tls) -> grpc.StatusCode:
    with client_cls(target, tls=tls, timeout=TIMEOUT) as client:
        try:
            client.get_model()
        except RpcError as err:
            return err.code
    return grpc.StatusCode.OK


# --- TLS -----------------------------------------------------------------------------------------


def test_tls_call_succeeds_with_the_servers_ca(pki, tls_policy):
    with PolicyClient(tls_policy.target, tls=client_tls(pki, cert=None), timeout=TIMEOUT) as client:
        assert client.get_model().kind == "policy"
        result = client.generate("hello", n=1)
        assert len(result.completions) == 1
    # localhost is in the certificate too; a client certificate is ignored when not asked for
    target = f"localhost:{tls_policy.port}"
    assert code_of(PolicyClient, target, client_tls(pki)) == grpc.StatusCode.OK


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_policy):
    assert code_of(PolicyClient, tls_policy.target, False) == grpc.StatusCode.UNAVAILABLE


def test_a_server_signed_by_another_ca_is_refused(pki, tls_policy):
    assert code_of(PolicyClient, tls_policy.target, client_tls(pki, ca="other-ca", cert=None)) \
        == grpc.StatusCode.UNAVAILABLE


def test_a_name_outside_the_certificate_is_refused(pki, tls_policy):
    tls = TlsOptions(ca_file=pki / "ca.pem", server_name="policy.elsewhere.example")
    assert code_of(PolicyClient, tls_policy.target, tls) == grpc.StatusCode.UNAVAILABLE


def test_health_only_port_is_plaintext_and_serves_nothing_else(pki, tls_policy):
    from rlhf.procs import health_status

    port = tls_policy.app.server.health_port
    assert port and port != tls_policy.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            policy_pb2_grpc.PolicyServiceStub(ch).GetModel(common_pb2.GetModelRequest(), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # the TLS port answers health over TLS only (procs.health_status: what the demo polls)
    assert health_status(tls_policy.target, tls=client_tls(pki, cert=None)) \
        == health_pb2.HealthCheckResponse.SERVING
    assert health_status(tls_policy.target, tls=False) is None


# --- mutual TLS, all three services ----------------------------------------------------------------


@pytest.mark.parametrize("service", CLIENTS)
def test_mtls_accepts_a_client_certificate_signed_by_the_ca(pki, mtls_servers, service):
    assert code_of(CLIENTS[service], mtls_servers[service], client_tls(pki)) == grpc.StatusCode.OK


@pytest.mark.parametrize("service", CLIENTS)
def test_mtls_refuses_a_client_without_certificate(pki, mtls_servers, service):
    target = mtls_servers[service]
    assert code_of(CLIENTS[service], target, client_tls(pki, cert=None)) == grpc.StatusCode.UNAVAILABLE
    assert code_of(CLIENTS[service], target, False) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("service", CLIENTS)
def test_mtls_refuses_a_client_certificate_of_another_ca(pki, mtls_servers, service):
    tls = client_tls(pki, cert="other-client")
    assert code_of(CLIENTS[service], mtls_servers[service], tls) == grpc.StatusCode.UNAVAILABLE


def test_environment_configures_clients_without_code(pki, mtls_servers, monkeypatch):
    """RLHF_TLS_*: what a rollout worker, the trainer or the labelling app is given in its pod."""
    assert code_of(RewardClient, mtls_servers["reward"], None) == grpc.StatusCode.UNAVAILABLE
    monkeypatch.setenv("RLHF_TLS_CA_FILE", str(pki / "ca.pem"))
    monkeypatch.setenv("RLHF_TLS_CLIENT_CERT_FILE", str(pki / "client.pem"))
    monkeypatch.setenv("RLHF_TLS_CLIENT_KEY_FILE", str(pki / "client.key"))
    for service, cls in CLIENTS.items():
        assert code_of(cls, mtls_servers[service], None) == grpc.StatusCode.OK, service
    assert code_of(RewardClient, mtls_servers["reward"], False) == grpc.StatusCode.UNAVAILABLE


async def test_async_clients_speak_mtls(pki, mtls_servers):
    from rlhf_client import AsyncPolicyClient, AsyncReferenceClient

    async with AsyncPolicyClient(mtls_servers["policy"], tls=client_tls(pki), timeout=TIMEOUT) as pc:
        assert (await pc.get_model()).kind == "policy"
    async with AsyncReferenceClient(mtls_servers["reference"], tls=client_tls(pki, cert=None),
                                    timeout=TIMEOUT) as fc:
        with pytest.raises(RpcError) as err:
            await fc.get_model()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


# --- configuration errors name the setting -------------------------------------------------------


def test_bad_tls_settings_name_the_field(pki, tmp_path):
    from pydantic import ValidationError

    from rlhf.config import Settings
    from rlhf.errors import StartupError
    from rlhf.serving.server import server_credentials

    with pytest.raises(ValidationError, match="tls_key_file"):
        Settings(tls_cert_file=pki / "server.pem")
    with pytest.raises(ValidationError, match="tls_client_ca_file"):
        Settings(tls_client_ca_file=pki / "ca.pem")
    with pytest.raises(StartupError, match="tls_cert_file") as err:
        server_credentials(Settings(tls_cert_file=tmp_path / "missing.pem", tls_key_file=pki / "server.key"))
    assert err.value.settings == ("tls_cert_file",)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(StartupError, match="tls_client_ca_file"):
        server_credentials(Settings(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                                    tls_client_ca_file=tmp_path / "junk.pem"))
    with pytest.raises(ValueError, match="RLHF_TLS_CLIENT_KEY_FILE"):
        TlsOptions(cert_file=pki / "client.pem")
    with pytest.raises(ValueError, match="RLHF_TLS_CA_FILE"):
        TlsOptions(ca_file=tmp_path / "missing.pem").credentials()


def test_client_tls_argument_and_environment():
    assert resolve_tls(False) is None
    assert resolve_tls(None) is None or resolve_tls(None) == TlsOptions.from_env()
    assert TlsOptions.from_env({}) is None
    assert TlsOptions.from_env({"RLHF_TLS": "1"}) == TlsOptions()
    assert TlsOptions.from_env({"RLHF_TLS_CA_FILE": "/ca.pem", "RLHF_TLS_SERVER_NAME": "policy"}) \
        == TlsOptions(ca_file="/ca.pem", server_name="policy")
    with pytest.raises(TypeError, match="tls"):
        resolve_tls("yes")


def test_serve_cli_flags_set_the_tls_settings(pki):
    from rlhf.cli import build_parser, settings_from_args

    args = build_parser().parse_args([
        "serve", "policy", "--model", "/m", "--tls-cert", str(pki / "server.pem"),
        "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"),
        "--health-port", "50052"])
    settings = settings_from_args(args)
    assert settings.tls_cert_file == pki / "server.pem"
    assert settings.tls_key_file == pki / "server.key"
    assert settings.tls_client_ca_file == pki / "ca.pem"
    assert settings.health_port == 50052
