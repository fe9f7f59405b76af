"""Channels with the platform's defaults: retries on UNAVAILABLE (service config), round-robin
across replicas for `dns:///` targets, keepalive that the servers permit, message-size limits,
and TLS / mutual TLS when asked for (`TlsOptions`).

TLS: every client (and `sync_channel` / `aio_channel`) takes `tls=`: a `TlsOptions`, `False`
(plaintext whatever the environment says), `True` (TLS; the environment's files, else the
system's root CAs) or None (the default: the environment decides, plaintext when it says
nothing). The environment, so a worker is configured without code:
  RLHF_TLS_CA_FILE           PEM CA bundle that signed the servers' certificates
  RLHF_TLS_CLIENT_CERT_FILE  PEM client certificate (mutual TLS), with
  RLHF_TLS_CLIENT_KEY_FILE   its PEM key
  RLHF_TLS_SERVER_NAME       name to check the server certificate against (default: the target's host)
  RLHF_TLS=1                 TLS with the system's root CAs when no file is named
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

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


TLS_ENV = {
    "ca_file": "RLHF_TLS_CA_FILE",
    "cert_file": "RLHF_TLS_CLIENT_CERT_FILE",
    "key_file": "RLHF_TLS_CLIENT_KEY_FILE",
    "server_name": "RLHF_TLS_SERVER_NAME",
}
_TRUE = frozenset({"1", "true", "yes", "on"})


@dataclass(frozen=True)
class TlsOptions:
    """Client TLS: the CA that signed the server (None: the system's roots), a client
    certificate and key for mutual TLS, and the name to verify (None: the target's host)."""

    ca_file: Union[str, os.PathLike, None] = None
    cert_file: Union[str, os.PathLike, None] = None
    key_file: Union[str, os.PathLike, None] = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            missing = "key_file" if self.key_file is None else "cert_file"
            raise ValueError(f"TlsOptions.{missing} ({TLS_ENV[missing]}): a client certificate "
                             "needs both cert_file and key_file")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "TlsOptions | None":
        """The RLHF_TLS_* variables' options; None when they ask for no TLS."""
        env = os.environ if environ is None else environ
        values = {f: (env.get(var) or "").strip() or None for f, var in TLS_ENV.items()}
        if not any(values.values()) and env.get("RLHF_TLS", "").strip().lower() not in _TRUE:
            return None
        return cls(**values)

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (reads the files now: a bad one fails here, naming it)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca_file, "ca_file"),
            private_key=_pem(self.key_file, "key_file"),
            certificate_chain=_pem(self.cert_file, "cert_file"),
        )

    def options(self) -> list[tuple[str, object]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _pem(path, field: str) -> bytes | None:
    if path is None:
        return None
    where = f"TlsOptions.{field} ({TLS_ENV[field]})"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{where}: {path} is not PEM")
    return data


TlsArg = Union[TlsOptions, bool, None]


def resolve_tls(tls: TlsArg) -> TlsOptions | None:
    """`tls=` of a client → the options to use (None: plaintext); see the module docstring."""
    if tls is None:
        return TlsOptions.from_env()
    if tls is False:
        return None
    if tls is True:
        return TlsOptions.from_env() or TlsOptions()
    if isinstance(tls, TlsOptions):
        return tls
    raise TypeError(f"tls: expected TlsOptions, True, False or None, not {type(tls).__name__}")


def sync_channel(target: str, *, tls: TlsArg = None) -> grpc.Channel:
    opts = resolve_tls(tls)
    if opts is None:
        return grpc.insecure_channel(target, options=channel_options())
    return grpc.secure_channel(target, opts.credentials(), options=channel_options() + opts.options())


def aio_channel(target: str, *, tls: TlsArg = None) -> grpc.aio.Channel:
    opts = resolve_tls(tls)
    if opts is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    return grpc.aio.secure_channel(target, opts.credentials(), options=channel_options() + opts.options())


def call_metadata(token: str | None, request_id: str | None) -> tuple[tuple[tuple[str, str], ...], str]:
    """Metadata for one call (bearer token, request id) and the request id used."""
    rid = request_id or uuid.uuid4().hex
    md: list[tuple[str, str]] = [("x-request-id", rid)]
    if token:
        md.append(("authorization", f"Bearer {token}"))
    return tuple(md), rid
