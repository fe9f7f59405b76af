"""Annotators, sessions and CSRF for the labelling app.

Annotators log in with a token. Tokens come from a file (`--tokens-file`, lines
`annotator_id:token`) and from the Redis hash `TOKENS_KEY` (field: sha256 hex of the token,
value: the annotator id; `rlhf labels annotators add NAME` writes it). Only digests are kept in
memory or in Redis, never a token.

Sessions are signed cookies (HMAC-SHA256 with the app's key, see `app_key`): the annotator, the
digest of the token they logged in with, a random nonce and the issue time. A session
is checked on every request without Redis; a vote (which needs Redis anyway) re-checks that the
token is still known, so removing a token stops that annotator's votes at once. The cookie holds
the token's digest, never the token.

CSRF: every form carries a token derived from the session's nonce (the login form: from a
random nonce in a short-lived cookie), HMAC'd with the app key and compared in constant time.
A form without it, or with another session's, is refused (403). Cookies are HttpOnly and
SameSite=Strict as a second line.

The app key lives in Redis (`KEY_KEY`, created once with SET NX): every replica of the app
signs and checks with the same key, and nothing secret is in a manifest or a page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

TOKENS_KEY = "rlhf:labels:tokens"
KEY_KEY = "rlhf:labels:key"
# The same rules as `rlhf labels annotators add` (rlhf.labels.cli): no whitespace, no ":".
ANNOTATOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
MIN_TOKEN_CHARS = 16


def token_digest(token: str) -> str:
    """sha256 hex of a token: what the tokens file map and the Redis hash are keyed by."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh annotator token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def load_tokens_file(path: Path) -> dict[str, str]:
    """{sha256(token): annotator} from lines `annotator_id:token` (blank lines and `#` comments
    skipped). ValueError naming the file and line for a malformed one."""
    out: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"--tokens-file {path}: {exc.strerror or exc}") from None
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"--tokens-file {path}:{n}"
        annotator, sep, token = line.partition(":")
        annotator, token = annotator.strip(), token.strip()
        if not sep or not token:
            raise ValueError(f"{where}: expected annotator_id:token")
        if not ANNOTATOR_RE.fullmatch(annotator):
            raise ValueError(f"{where}: annotator id must be 1-64 of A-Z a-z 0-9 . _ @ + - "
                             "(starting with a letter or digit)")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}: token shorter than {MIN_TOKEN_CHARS} characters")
        digest = token_digest(token)
        if digest in out and out[digest] != annotator:
            raise ValueError(f"{where}: the same token is given to {out[digest]} already")
        out[digest] = annotator
    return out


async def lookup_annotator(r, file_tokens: dict[str, str], digest: str) -> str | None:
    """The annotator a token digest belongs to (the file first, then Redis), or None."""
    if digest in file_tokens:
        return file_tokens[digest]
    value = await r.hget(TOKENS_KEY, digest)
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


async def app_key(r) -> bytes:
    """The app's signing key: made once (SET NX), shared by every replica through Redis."""
    await r.set(KEY_KEY, secrets.token_hex(32), nx=True)
    value = await r.get(KEY_KEY)
    return bytes.fromhex(value.decode() if isinstance(value, bytes) else value)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    annotator: str
    digest: str  # sha256 hex of the token the session came from (a vote re-checks it is known)
    nonce: str
    issued: float


class Signer:
    """HMAC-SHA256 with one key and a purpose string per use (a session is not a CSRF token)."""

    def __init__(self, key: bytes):
        self._key = key

    def mac(self, purpose: str, data: str) -> str:
        return hmac.new(self._key, f"{purpose}\x00{data}".encode(), hashlib.sha256).hexdigest()

    # -------------------------------------------------------------- sessions
    def session_cookie(self, annotator: str, digest: str, *, now: float | None = None) -> str:
        body = _b64(json.dumps({"a": annotator, "d": digest, "n": secrets.token_hex(16),
                                "t": time.time() if now is None else now},
                               separators=(",", ":")).encode())
        return f"{body}.{self.mac('session', body)}"

    def session(self, cookie: str | None, max_age_s: float, *, now: float | None = None) -> Session | None:
        """The session a cookie holds; None when missing, forged, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        if not hmac.compare_digest(mac.encode(), self.mac("session", body).encode()):
            return None
        try:
            d = json.loads(_unb64(body))
            s = Session(str(d["a"]), str(d["d"]), str(d["n"]), float(d["t"]))
        except (ValueError, KeyError, TypeError):
            return None
        age = (time.time() if now is None else now) - s.issued
        return s if 0 <= age <= max_age_s else None

    # -------------------------------------------------------------- CSRF
    def csrf(self, nonce: str) -> str:
        return self.mac("csrf", nonce)

    def check_csrf(self, nonce: str | None, given: str | None) -> bool:
        """Constant-time check of a form's CSRF token against the session's (or login) nonce."""
        if not nonce or not isinstance(given, str):
            return False
        return hmac.compare_digest(given.encode(), self.csrf(nonce).encode())
