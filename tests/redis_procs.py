"""Own Redis servers for tests that must kill, restart or configure one (AOF, password, TLS,
replicas, Sentinel): the shared server on 6379 is never touched.

    with RedisProc(tmp_path, requirepass="pw", appendonly=True) as r:
        r.url                      # redis://:pw@127.0.0.1:PORT/0
        r.kill(); r.start()        # SIGKILL, then the same server again on the same port
    with RedisProc(tmp_path, tls=make_certs(tmp_path)) as r:
        r.tls_url                  # rediss://127.0.0.1:TLS_PORT/0?ssl_ca_certs=...&ssl_cert_reqs=required
    sentinels = [SentinelProc(tmp_path / f"s{i}", "mymaster", primary.port, quorum=2) ...]

Every server runs in its own directory (config, log, AOF/RDB there), on a free loopback port,
and `start` returns only once the server answers `PING` (polled against a deadline; the log is
in the error when it does not). `stop` sends SIGTERM, then SIGKILL after a deadline.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback port nobody listens on now (bind to 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> bool:
    return os.path.exists(REDIS_SERVER)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def make_certs(d: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A throwaway CA, a server certificate for `host` (IP SAN + localhost) and a client
    certificate, written as PEM under `d` (made with `cryptography`)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("rlhf-test-ca")).issuer_name(name("rlhf-test-ca"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - _dt.timedelta(minutes=5))
             .not_valid_after(now + _dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, b.sign(ca_key, hashes.SHA256())

    srv_key, srv = leaf(host, ExtendedKeyUsageOID.SERVER_AUTH,
                        [x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")])
    cli_key, cli = leaf("rlhf-test-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    files = TlsFiles(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
                     client_cert=d / "client.pem", client_key=d / "client.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    files.client_cert.write_bytes(cli.public_bytes(serialization.Encoding.PEM))
    write_key(ca_key, d / "ca.key")
    write_key(srv_key, files.key)
    write_key(cli_key, files.client_key)
    return files


def _ping(host: str, port: int, password: str | None, tls: TlsFiles | None,
          timeout: float = 1.0) -> bool:
    """True when the server at host:port answers PING with PONG (a raw RESP exchange, so the
    helper depends on no client library's behaviour). A LOADING reply counts as not yet."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    try:
        if tls is not None:
            ctx = ssl.create_default_context(cafile=str(tls.ca))
            ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
            sock = ctx.wrap_socket(sock, server_hostname=host)
        cmd = b""
        if password:
            pw = password.encode()
            cmd += b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw)
        cmd += b"*1\r\n$4\r\nPING\r\n"
        sock.sendall(cmd)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"PONG" not in buf and time.monotonic() < deadline:
            chunk = sock.recv(4096)
            if not chunk:
                break
            buf += chunk
            if buf.count(b"\r\n") >= (2 if password else 1) and b"PONG" not in buf:
                break
        return b"+PONG" in buf
    except (OSError, ssl.SSLError):
        return False
    finally:
        sock.close()


class _Proc:
    """A redis-server process with a config file in its own directory."""

    kind = "redis"

    def __init__(self, directory: Path, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "redis.log"
        self.conf = self.dir / "redis.conf"

    # -- subclass hooks
    def _config_lines(self) -> list[str]:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        return [REDIS_SERVER, str(self.conf)]

    def _ready(self) -> bool:
        return _ping(self.host, self.port, None, None)

    # -- life cycle
    def start(self, timeout: float = START_TIMEOUT_S):
        """Start (or start again, same port and directory) and wait until it answers."""
        if self.running:
            return self
        if not self.conf.exists() or self.kind == "redis":
            # A Sentinel rewrites its own config (its view of the primary): keep that on restart.
            self.conf.write_text("\n".join(self._config_lines()) + "\n")
        self.proc = subprocess.Popen(self._argv(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} on port {self.port} exited with "
                                   f"{self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"{self.kind} on port {self.port} did not answer within "
                                   f"{timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean shutdown: an AOF/RDB is written), SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed that was not already."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: the process hangs (a network partition seen from outside)."""
        if self.running:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, *, hard: bool = False, timeout: float = START_TIMEOUT_S):
        """Stop (SIGTERM, or SIGKILL when `hard`) and start again on the same port."""
        self.kill() if hard else self.stop()
        return self.start(timeout)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisProc(_Proc):
    """An own redis-server: `RedisProc(dir, appendonly=True, requirepass="pw", tls=TlsFiles,
    replicaof=(host, port), masterauth="pw", extra=["maxmemory 10mb"])`.

    With `tls`, the server listens on `tls_port` (TLS, client certificates optional) and keeps a
    plain `port` too unless `tls_only` (then `port` is 0 and the server is TLS-only; `port`
    below still names the TLS port for `host:port` uses).
    """

    def __init__(self, directory: Path, *, port: int | None = None, appendonly: bool = False,
                 appendfsync: str = "always", requirepass: str | None = None,
                 tls: TlsFiles | None = None, tls_only: bool = False,
                 replicaof: tuple[str, int] | None = None, masterauth: str | None = None,
                 extra: list[str] | None = None):
        super().__init__(directory, port)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = requirepass
        self.tls = tls
        self.tls_only = tls_only
        self.tls_port = free_port() if tls is not None else None
        if tls_only:
            self.port = self.tls_port
        self.replicaof = replicaof
        self.masterauth = masterauth
        self.extra = list(extra or [])

    def _config_lines(self) -> list[str]:
        lines = [
            "bind 127.0.0.1",
            f"port {0 if self.tls_only else self.port}",
            f"dir {self.dir}",
            f"logfile {self.log}",
            "daemonize no",
            "save ''",
            "protected-mode no",
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if self.password:
            lines.append(f'requirepass "{self.password}"')
        if self.tls is not None:
            lines += [f"tls-port {self.tls_port}", f"tls-cert-file {self.tls.cert}",
                      f"tls-key-file {self.tls.key}", f"tls-ca-cert-file {self.tls.ca}",
                      "tls-auth-clients optional", "tls-replication yes" if self.tls_only else ""]
        if self.replicaof is not None:
            lines.append(f"replicaof {self.replicaof[0]} {self.replicaof[1]}")
        if self.masterauth:
            lines.append(f'masterauth "{self.masterauth}"')
        return [ln for ln in lines + self.extra if ln]

    def _ready(self) -> bool:
        if self.tls_only:
            return _ping(self.host, self.tls_port, self.password, self.tls)
        return _ping(self.host, self.port, self.password, None)

    def _auth(self) -> str:
        return f":{quote(self.password, safe='')}@" if self.password else ""

    @property
    def url(self) -> str:
        """redis:// URL of the plain port (with the password)."""
        if self.tls_only:
            raise ValueError("a TLS-only server has no plain URL: use tls_url")
        return f"redis://{self._auth()}{self.host}:{self.port}/0"

    def db_url(self, db: int) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{db}"

    @property
    def tls_url(self) -> str:
        """rediss:// URL of the TLS port, the CA and `ssl_cert_reqs=required` in its query."""
        if self.tls is None:
            raise ValueError("server started without tls")
        return (f"rediss://{self._auth()}{self.host}:{self.tls_port}/0"
                f"?ssl_ca_certs={quote(str(self.tls.ca), safe='/')}&ssl_cert_reqs=required")

    def client(self, **kw):
        """A redis-py client (plain port, or TLS when TLS-only), decode_responses on."""
        import redis

        if self.tls_only:
            return redis.Redis(host=self.host, port=self.tls_port, password=self.password,
                               ssl=True, ssl_ca_certs=str(self.tls.ca),
                               decode_responses=True, **kw)
        return redis.Redis(host=self.host, port=self.port, password=self.password,
                           decode_responses=True, **kw)


class SentinelProc(_Proc):
    """A Sentinel (`redis-server conf --sentinel`) watching `master_name` at primary_port."""

    kind = "sentinel"

    def __init__(self, directory: Path, master_name: str, primary_port: int, *,
                 primary_host: str = "127.0.0.1", quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000,
                 auth_pass: str | None = None, port: int | None = None):
        super().__init__(directory, port)
        self.master_name = master_name
        self.primary = (primary_host, primary_port)
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.auth_pass = auth_pass
        self.conf = self.dir / "sentinel.conf"
        self.log = self.dir / "sentinel.log"

    def _config_lines(self) -> list[str]:
        m = self.master_name
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {self.dir}",
            f"logfile {self.log}",
            "daemonize no",
            "protected-mode no",
            f"sentinel monitor {m} {self.primary[0]} {self.primary[1]} {self.quorum}",
            f"sentinel down-after-milliseconds {m} {self.down_after_ms}",
            f"sentinel failover-timeout {m} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {m} 1",
        ]
        if self.auth_pass:
            lines.append(f'sentinel auth-pass {m} "{self.auth_pass}"')
        return lines

    def _argv(self) -> list[str]:
        return [REDIS_SERVER, str(self.conf), "--sentinel"]

    def master_addr(self) -> tuple[str, int] | None:
        """What this Sentinel names as the primary now (SENTINEL get-master-addr-by-name)."""
        import redis

        try:
            r = redis.Redis(host=self.host, port=self.port, socket_timeout=2,
                            decode_responses=True)
            try:
                addr = r.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
            finally:
                r.close()
        except (redis.RedisError, OSError):
            return None
        return (addr[0], int(addr[1])) if addr else None


def wait_replica_synced(replica: RedisProc, timeout: float = START_TIMEOUT_S) -> None:
    """Poll until `replica` reports its link to the primary up."""
    deadline = time.monotonic() + timeout
    r = replica.client(socket_timeout=2)
    try:
        while True:
            try:
                if r.info("replication").get("master_link_status") == "up":
                    return
            except OSError:
                pass
            except Exception as e:  # redis errors while the replica loads
                if "LOADING" not in str(e) and "Connection" not in type(e).__name__:
                    raise
            if time.monotonic() >= deadline:
                raise RuntimeError(f"replica on {replica.port} not in sync after {timeout:g}s:\n"
                                   f"{replica.log_tail()}")
            time.sleep(0.05)
    finally:
        r.close()
