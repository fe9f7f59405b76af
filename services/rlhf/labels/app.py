"""`rlhf serve labels`: the Arena-style labelling web app (aiohttp.web, server-rendered jinja2).

An annotator logs in with a token, sees a prompt and two responses generated live by the
PolicyService (two samples of one policy, or one each from `--policy` and `--policy-b`: A/B
between versions) in a random order, with no model names, and votes: A better, B better, tie,
both bad (buttons, or keys 1/←, 2/→, 3/t, 4/b), or skips (s) / regenerates (r). With
`--responses K` (K > 2) they rank K responses instead (ties allowed). The models are revealed
once the vote is saved.

A vote becomes a `PreferencePair` (A or B better) or a `Ranking` on the preferences stream, with
provenance (labeller "human:<annotator>", builder "vote", the models, sampling parameters,
timestamps, the vote), and a record on the votes stream (`rlhf.labels.votes`) — both in one
MULTI/EXEC (`rlhf.labels.record`). Ties and both-bad make no pair but are recorded. When Redis
is unreachable the app retries for `--save-retry-s`, then tells the annotator the vote was NOT
saved, with a button to try again (a vote saved once is never saved twice).

Pages: /login, / (vote), /leaderboard (+ /leaderboard.png), /healthz and /readyz (open), and
/static (CSS and the keyboard script; open). Every other route needs a session; every form
carries a CSRF token; responses carry a strict Content-Security-Policy (no inline script);
model output is autoescaped text.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import dataclasses
import io
import logging
import math
import random
import secrets
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web
from prometheus_client import Counter
from rlhf_client import RpcError, SamplingParams
from rlhf_client.queues import PREFERENCES_STREAM
from rlhf_client.redis_conn import connect, connect_async

from rlhf.config import Settings
from rlhf.errors import StartupError
from rlhf.labels.auth import (
    TOKENS_KEY,
    Session,
    Signer,
    app_key,
    load_tokens_file,
    lookup_annotator,
    token_digest,
)
from rlhf.labels.items import (
    MAX_TYPED_PROMPT_CHARS,
    ListPrompts,
    Prompt,
    PromptSource,
    Sampler,
    StreamPrompts,
)
from rlhf.labels.record import Ledger, Pending, Result, VoteError, redis_blip
from rlhf.labels.votes import VOTES_STREAM, read_votes
from rlhf.serving.interceptors import REQUEST_ID
from rlhf.serving.metrics import HTTP_COUNT, HTTP_LATENCY
from rlhf.serving.server import bind_problem, check_bindable

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "rlhf_labels_session"
LOGIN_COOKIE = "rlhf_labels_login"
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login"})
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# The request's session and posted form, set by the middleware (the handler runs in its task).
SESSION: contextvars.ContextVar[Session] = contextvars.ContextVar("labels_session")
FORM: contextvars.ContextVar[Any] = contextvars.ContextVar("labels_form")
VOTES = Counter("rlhf_labels_votes_total",
                "Votes in the labelling app, by result: saved, not_saved (Redis unreachable), "
                "rate_limited.", ["result"])
OUTCOME_TEXT = {"A": "A is better", "B": "B is better", "tie": "a tie", "both_bad": "both bad"}


@dataclass(frozen=True)
class LabelsConfig:
    """What `rlhf serve labels` is asked to do (its own flags; Settings hold the rest)."""

    policy: str
    policy_b: str | None = None
    responses: int = 2
    prompts: list[Prompt] | None = None  # --prompts-file / --prompt
    prompts_stream: str | None = None
    prompts_window: int = 1000
    stream: str = PREFERENCES_STREAM
    votes_stream: str = VOTES_STREAM
    tokens: dict[str, str] = field(default_factory=dict)  # sha256(token) → annotator
    max_votes_per_minute: int = 30
    double_label: float = 0.0
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    max_new_tokens: int | None = None
    rpc_timeout: float = 60.0
    session_hours: float = 12.0
    secure_cookies: bool = False
    save_retry_s: float = 3.0
    port: int = 8080
    seed: int | None = None  # the display order / sampling seeds (tests)

    def check(self) -> "LabelsConfig":
        """ValueError naming the flag for a value out of range."""
        if self.responses < 2:
            raise ValueError(f"--responses: at least 2, got {self.responses}")
        if self.responses > len(LETTERS):
            raise ValueError(f"--responses: at most {len(LETTERS)}, got {self.responses}")
        if not 0.0 <= self.double_label <= 1.0:
            raise ValueError(f"--double-label: a share between 0 and 1, got {self.double_label}")
        if self.max_votes_per_minute < 0:
            raise ValueError("--max-votes-per-minute: 0 (no limit) or more")
        for name in ("rpc_timeout", "session_hours"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be positive")
        if not 0 <= self.save_retry_s <= 60:
            raise ValueError("--save-retry-s: between 0 and 60 seconds")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError("--temperature: must be 0 or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("--top-p: in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("--top-k: 0 or more")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens: at least 1")
        if self.prompts_window < 1:
            raise ValueError("--prompts-window: at least 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port: 0..65535, got {self.port}")
        return self


@dataclass(frozen=True)
class Notice:
    kind: str  # saved | not-saved | error | info
    text: str
    reveal: list[tuple[str, str, bool]] | None = None
    retry: dict[str, Any] | None = None


class Page(Exception):
    """Answer with this rendered page (an error page, or a redirect)."""

    def __init__(self, response: web.StreamResponse):
        super().__init__(response.status)
        self.response = response


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
    if isinstance(value, (list, tuple)):
        return " – ".join(_cell(v) for v in value)
    return "n/a" if value is None else str(value)


def _plain(obj: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return dict(obj)
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")}


class LabelsApp:
    """The web app: `start()` binds and returns the port; `stop()`; `run_forever()` for the CLI."""

    def __init__(self, settings: Settings, config: LabelsConfig):
        self.settings = settings
        self.config = config.check()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.started = False
        self.rng = random.Random(config.seed)
        self._runners: list[web.AppRunner] = []
        self._inflight = 0
        self._idle = asyncio.Event()
        self._draining = False
        self._stopped = asyncio.Event()
        self._leaderboard_lock = asyncio.Lock()
        self._leaderboard: tuple[int, dict[str, Any], bytes | None] | None = None
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, undefined=jinja2.StrictUndefined)
        self.env.filters["cell"] = _cell

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> int:
        s, c = self.settings, self.config
        url = s.redis_url.get_secret_value()
        self.r = connect_async(url)
        self.r_sync = connect(url)  # leaderboard reads, in a worker thread
        self.signer = Signer(await app_key(self.r))
        if not c.tokens and not await self.r.hlen(TOKENS_KEY):
            log.warning("no annotators yet: give --tokens-file or add one with "
                        "`rlhf labels annotators add NAME`")
        self.ledger = Ledger(self.r, preferences_stream=c.stream, votes_stream=c.votes_stream,
                             double_label=c.double_label,
                             max_votes_per_minute=c.max_votes_per_minute, rng=self.rng)
        self.source: PromptSource | None = None
        if c.prompts is not None:
            self.source = ListPrompts(c.prompts)
        elif c.prompts_stream is not None:
            self.source = StreamPrompts(self.r, c.prompts_stream, window=c.prompts_window)
        token = s.auth_token.get_secret_value() if s.auth_token else None
        params = SamplingParams(temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                                max_new_tokens=c.max_new_tokens)
        self.sampler = Sampler([t for t in (c.policy, c.policy_b) if t], k=c.responses,
                               params=params, token=token, timeout=c.rpc_timeout)

        app = web.Application(middlewares=[self._middleware], client_max_size=1024 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/login", self._login_page)
        app.router.add_post("/login", self._login)
        app.router.add_post("/logout", self._logout)
        app.router.add_get("/", self._vote_page)
        app.router.add_post("/vote", self._vote)
        app.router.add_post("/typed", self._typed)
        app.router.add_get("/leaderboard", self._leaderboard_page)
        app.router.add_get("/leaderboard.png", self._leaderboard_png)
        app.router.add_static("/static/", HERE / "static", append_version=False)
        problem = bind_problem(s.host, c.port)
        if problem is not None:  # the port is this command's own flag, not a setting
            message, culprit = problem
            raise StartupError(f"labels: {message}" + (" (set --port)" if culprit == "port" else ""),
                               *(["host"] if culprit == "host" else []))
        self.port = await self._serve(app, c.port)
        if s.metrics_port is not None:
            check_bindable(s.host, s.metrics_port, "metrics_port", what="metrics: ")
            metrics = web.Application()
            metrics.router.add_get("/metrics", self._metrics)
            self.metrics_port = await self._serve(metrics, s.metrics_port)
        self.started = True
        log.info("labels app on http://%s:%d (metrics %s); policy %s%s; %d responses per item",
                 s.host, self.port, self.metrics_port, c.policy,
                 f" vs {c.policy_b}" if c.policy_b else "", c.responses)
        return self.port

    async def _serve(self, app: web.Application, port: int) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.settings.host, port)
        await site.start()
        self._runners.append(runner)
        return runner.addresses[0][1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop: requests in flight get `grace` seconds (a vote being saved finishes)."""
        self._draining = True
        if self._inflight:
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%d requests still running after %.1fs; closing", self._inflight, grace)
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        for name in ("sampler", "r", "r_sync"):  # whatever a start that failed got to make
            part = self.__dict__.pop(name, None)
            if part is not None:
                closed = part.aclose() if name == "r" else part.close()
                if asyncio.iscoroutine(closed):
                    await closed
        self.started = False
        self._stopped.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self.start()
        await self._stopped.wait()

    # ------------------------------------------------------------------ plumbing
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        REQUEST_ID.set(request.headers.get("X-Request-Id") or uuid.uuid4().hex)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        self._inflight += 1
        self._idle.clear()
        try:
            try:
                if self._draining and request.path != "/healthz":
                    raise Page(web.Response(text="shutting down\n", status=503))
                if not (request.path in OPEN_PATHS or request.path.startswith("/static/")):
                    session = self._session_or_login(request)
                    SESSION.set(session)
                    if request.method == "POST":
                        await self._check_csrf(request, session.nonce)
                response = await handler(request)
            except Page as page:
                response = page.response
            except web.HTTPException as exc:
                if exc.status >= 400:
                    response = self._message(exc.status, exc.reason, exc.text or exc.reason)
                else:
                    response = exc
            except Exception:  # noqa: BLE001 - a bug: logged with the request id, a plain 500
                log.exception("bug: unhandled error in %s", request.path)
                response = self._message(500, "Internal error", "Something went wrong; "
                                         "the error is logged.")
            status = response.status
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            if not request.path.startswith("/static/"):
                response.headers.setdefault("Cache-Control", "no-store")
            return response
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()
            HTTP_COUNT.labels("labels", route, str(status)).inc()
            HTTP_LATENCY.labels("labels", route, str(status)).observe(time.perf_counter() - started)

    def _session_or_login(self, request: web.Request):
        session = self.signer.session(request.cookies.get(SESSION_COOKIE),
                                      self.config.session_hours * 3600)
        if session is None:
            raise Page(_redirect("/login"))
        return session

    async def _check_csrf(self, request: web.Request, nonce: str | None) -> None:
        form = await request.post()
        FORM.set(form)
        if not self.signer.check_csrf(nonce, form.get("csrf")):
            raise Page(self._message(403, "Refused", "This form is missing its CSRF token or "
                                     "carries another session's (reload the page and try again)."))

    def _render(self, template: str, status: int = 200, **ctx) -> web.Response:
        body = self.env.get_template(template).render(
            **{"annotator": None, "notice": None, "csrf": "", "votes": "", **ctx})
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    def _message(self, status: int, heading: str, message: str, **ctx) -> web.Response:
        return self._render("message.html", status, heading=heading, message=message, **ctx)

    def _cookie(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True,
                            samesite="Strict", secure=self.config.secure_cookies)

    async def _with_retry(self, fn, *args, **kwargs):
        """fn(), retried on Redis blips until `save_retry_s` has passed; then the last error."""
        deadline = time.monotonic() + self.config.save_retry_s
        delay = 0.05
        while True:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - only blips are retried
                if not redis_blip(exc) or time.monotonic() + delay > deadline:
                    raise
                log.warning("Redis blip (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _page_ctx(self, session) -> dict[str, Any]:
        try:
            votes: Any = await self.ledger.votes_of(session.annotator)
        except Exception as exc:  # noqa: BLE001 - the count is cosmetic; Redis may be down
            if not redis_blip(exc):
                raise
            votes = "?"
        return {"annotator": session.annotator, "csrf": self.signer.csrf(session.nonce),
                "votes": votes, "max_prompt_chars": MAX_TYPED_PROMPT_CHARS}

    def _redis_down(self, ctx: dict[str, Any], what: str) -> web.Response:
        return self._render("vote.html", 503, item=None, ranking=False, **ctx,
                            notice=Notice("error", f"The database (Redis) is unreachable: {what}. "
                                          "Try again in a moment."))

    # ------------------------------------------------------------------ open routes
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            await asyncio.wait_for(self.r.ping(), 2.0)
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the cause
            return web.Response(text=f"redis: {type(exc).__name__}\n", status=503)
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _login_page(self, request: web.Request, *, error: str | None = None,
                          status: int = 200) -> web.Response:
        nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_hex(16)
        response = self._render("login.html", status, error=error,
                                login_csrf=self.signer.csrf("login:" + nonce))
        self._cookie(response, LOGIN_COOKIE, nonce, 3600)
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        nonce = request.cookies.get(LOGIN_COOKIE)
        await self._check_csrf(request, "login:" + nonce if nonce else None)
        token = FORM.get().get("token")
        digest = token_digest(token) if isinstance(token, str) and token else ""
        try:
            annotator = await self._with_retry(lookup_annotator, self.r, self.config.tokens,
                                               digest) if digest else None
        except Exception as exc:  # noqa: BLE001
            if not redis_blip(exc):
                raise
            return await self._login_page(request, error="The database (Redis) is unreachable; "
                                          "try again in a moment.", status=503)
        if annotator is None:
            log.info("login refused: unknown token")
            return await self._login_page(request, error="Unknown token.", status=401)
        response = _redirect("/")
        self._cookie(response, SESSION_COOKIE, self.signer.session_cookie(annotator, digest),
                     int(self.config.session_hours * 3600))
        response.del_cookie(LOGIN_COOKIE, path="/")
        log.info("login: %s", annotator)
        return response

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        response = _redirect("/login")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------------ voting
    async def _vote_page(self, request: web.Request) -> web.Response:
        ctx = await self._page_ctx(SESSION.get())
        return await self._next(SESSION.get(), ctx)

    async def _typed(self, request: web.Request) -> web.Response:
        session = SESSION.get()
        ctx = await self._page_ctx(session)
        text = FORM.get().get("prompt")
        if not isinstance(text, str) or not text.strip():
            return self._render("vote.html", 400, item=None, ranking=False, **ctx,
                                notice=Notice("error", "Type a prompt first."))
        if len(text) > MAX_TYPED_PROMPT_CHARS:
            return self._render("vote.html", 400, item=None, ranking=False, **ctx,
                                notice=Notice("error", f"A prompt has at most "
                                              f"{MAX_TYPED_PROMPT_CHARS} characters."))
        return await self._next(session, ctx, prompt=Prompt(text.replace("\r\n", "\n")))

    async def _next(self, session, ctx: dict[str, Any], *, prompt: Prompt | None = None,
                    notice: Notice | None = None, status: int = 200) -> web.Response:
        """Render a new item: a relabel item waiting for a second annotator, else a fresh one
        for `prompt` (or one from the prompt source)."""
        item, relabel = None, False
        try:
            if prompt is None:
                item = await self._with_retry(self.ledger.claim_relabel, session.annotator)
                relabel = item is not None
                if item is None and self.source is not None:
                    prompt = await self._with_retry(self.source.pick, self.rng)
            if item is None and prompt is not None:
                item = await self.sampler.sample(prompt, self.rng)
            if item is None:
                return self._render("vote.html", status, item=None, ranking=False, notice=notice,
                                    **ctx)
            shown = list(range(len(item.responses)))
            self.rng.shuffle(shown)
            pending = Pending(secrets.token_urlsafe(18), item, session.annotator, tuple(shown),
                              time.time(), relabel)
            await self._with_retry(self.ledger.put_pending, pending)
        except RpcError as exc:
            log.warning("generation failed: %s", exc)
            return self._render("vote.html", 503, item=None, ranking=False, **ctx,
                                notice=notice or Notice("error", f"The policy service failed "
                                                        f"({exc.code.name}): try again."))
        except Exception as exc:  # noqa: BLE001
            if not redis_blip(exc):
                raise
            return self._redis_down(ctx, "no new item can be shown") if notice is None else \
                self._render("vote.html", 503, item=None, ranking=False, notice=notice, **ctx)
        return self._render_item(pending, ctx, notice=notice, status=status)

    def _render_item(self, pending: Pending, ctx: dict[str, Any], *, notice: Notice | None = None,
                     status: int = 200) -> web.Response:
        responses = pending.item.responses
        shown = [{"letter": LETTERS[pos], "text": responses[i].text}
                 for pos, i in enumerate(pending.shown)]
        item = {"prompt": pending.item.prompt.text, "ticket": pending.ticket, "shown": shown}
        return self._render("vote.html", status, item=item, ranking=len(responses) > 2,
                            notice=notice, **ctx)

    async def _vote(self, request: web.Request) -> web.Response:
        session = SESSION.get()
        form = FORM.get()
        ctx = await self._page_ctx(session)
        ticket = form.get("ticket")
        choice = form.get("choice")
        if not isinstance(ticket, str) or not ticket or not isinstance(choice, str):
            return self._message(400, "Bad request", "The form lacks its item or choice.", **ctx)
        if choice in ("skip", "regenerate"):
            return await self._skip(session, ctx, ticket, regenerate=choice == "regenerate")
        ranks = None
        if choice == "rank":
            try:
                ranks = [int(form.get(f"rank_{LETTERS[i]}", ""))
                         for i in range(self.config.responses)]
            except ValueError:
                return self._message(400, "Bad request", "Give every response a rank.", **ctx)
        retry_fields = [("choice", choice)] + [(f"rank_{LETTERS[i]}", str(n))
                                               for i, n in enumerate(ranks or [])]
        try:
            # A removed token stops the votes of sessions made with it.
            known = await self._with_retry(lookup_annotator, self.r, self.config.tokens,
                                           session.digest)
            if known != session.annotator:
                response = _redirect("/login")
                response.del_cookie(SESSION_COOKIE, path="/")
                return response
            result: Result = await self._with_retry(
                self.ledger.record, ticket, session.annotator,
                choice=None if ranks else choice, display_ranks=ranks)
        except VoteError as exc:
            return self._message(400, "Bad request", str(exc), **ctx)
        except Exception as exc:  # noqa: BLE001
            if not redis_blip(exc):
                raise
            log.warning("vote not saved (Redis unreachable): %s", exc)
            VOTES.labels("not_saved").inc()
            return self._render(
                "vote.html", 503, item=None, ranking=False, **ctx,
                notice=Notice("not-saved", "Your vote was NOT saved: the database (Redis) is "
                              "unreachable, and nothing was recorded. Try again in a moment "
                              "(a vote is never saved twice).",
                              retry={"ticket": ticket, "fields": retry_fields}))
        if result.status == "rate_limited":
            VOTES.labels("rate_limited").inc()
            return self._render_item(result.pending, ctx, status=429, notice=Notice(
                "error", f"Slow down: at most {self.config.max_votes_per_minute} votes a minute. "
                "This vote was not saved; cast it again in a moment."))
        if result.status == "not_yours":
            return self._message(403, "Refused", "This item was shown to someone else.", **ctx)
        ctx["votes"] = await self._count_or(ctx["votes"], session.annotator)
        if result.status == "saved":
            VOTES.labels("saved").inc()
            notice = self._saved_notice(result, choice, ranks)
        elif result.status == "already":
            notice = Notice("info", "That vote was saved already.")
        else:
            notice = Notice("info", "That item expired before the vote; here is a new one.")
        return await self._next(session, ctx, notice=notice)

    async def _count_or(self, fallback, annotator: str):
        try:
            return await self.ledger.votes_of(annotator)
        except Exception as exc:  # noqa: BLE001
            if not redis_blip(exc):
                raise
            return fallback

    def _saved_notice(self, result: Result, choice: str, ranks: list[int] | None) -> Notice:
        pending, vote = result.pending, result.vote
        if ranks is None:
            what = f"Saved: {OUTCOME_TEXT.get(choice, choice)}."
            picked = {"A": 0, "B": 1}.get(choice)
        else:
            what = "Saved: your ranking " + ", ".join(
                f"{LETTERS[pos]}={n}" for pos, n in enumerate(ranks)) + "."
            picked = None
        if result.payload is None:
            what += " (No training pair: " + (
                "ties and both-bad votes are recorded only." if ranks is None and choice in
                ("tie", "both_bad") else "equal, identical or empty responses make none.") + ")"
        reveal = [(LETTERS[pos], vote.responses[i].model, pos == picked)
                  for pos, i in enumerate(pending.shown)]
        return Notice("saved", what, reveal=reveal)

    async def _skip(self, session, ctx: dict[str, Any], ticket: str, *, regenerate: bool) -> web.Response:
        try:
            pending = await self._with_retry(self.ledger.get_pending, ticket)
            if pending is not None and pending.annotator == session.annotator:
                await self._with_retry(self.ledger.drop_pending, pending)
        except Exception as exc:  # noqa: BLE001
            if not redis_blip(exc):
                raise
            return self._redis_down(ctx, "try again")
        prompt = pending.item.prompt if (regenerate and pending is not None) else None
        notice = Notice("info", "Regenerated." if regenerate else "Skipped.")
        return await self._next(session, ctx, prompt=prompt, notice=notice)

    # ------------------------------------------------------------------ leaderboard
    def _board(self) -> tuple[int, dict[str, Any], bytes | None]:
        """Votes → leaderboard rows, agreement and the plot (rlhf.labels.leaderboard); sync,
        run in a worker thread, recomputed only when the votes stream grew."""
        from rlhf.labels import leaderboard as lb

        n = int(self.r_sync.xlen(self.config.votes_stream))
        if self._leaderboard is not None and self._leaderboard[0] == n:
            return self._leaderboard
        votes = read_votes(self.r_sync, self.config.votes_stream)
        battles = lb.battles_from_votes(votes)
        board = lb.leaderboard(votes) if battles else []
        rows = [_plain(row) for row in board]
        agreement = lb.agreement(votes) if votes else None
        png = None
        if board:
            buf = io.BytesIO()
            lb.plot_leaderboard(board, buf)
            png = buf.getvalue()
        summary, pairs = [], []  # agreement: scalars; per two annotators: a table
        if agreement is not None and agreement.label_pairs:
            for k, v in _plain(agreement).items():
                if isinstance(v, (list, tuple)) and all(isinstance(x, dict) for x in v):
                    pairs = v
                else:
                    summary.append((k, v))
        data = {"n_votes": len(votes), "n_battles": len(battles), "rows": rows,
                "columns": list(rows[0]) if rows else [], "agreement": summary,
                "agreement_pairs": pairs,
                "counts": sorted(collections.Counter(v.annotator for v in votes).items())}
        self._leaderboard = (n, data, png)
        return self._leaderboard

    async def _board_or_page(self, ctx: dict[str, Any]):
        async with self._leaderboard_lock:
            try:
                return await asyncio.to_thread(self._board)
            except Exception as exc:  # noqa: BLE001
                if not redis_blip(exc):
                    raise
                raise Page(self._redis_down(ctx, "the leaderboard cannot be read")) from None

    async def _leaderboard_page(self, request: web.Request) -> web.Response:
        ctx = await self._page_ctx(SESSION.get())
        _, data, _ = await self._board_or_page(ctx)
        return self._render("leaderboard.html", **data, **ctx)

    async def _leaderboard_png(self, request: web.Request) -> web.Response:
        ctx = await self._page_ctx(SESSION.get())
        _, _, png = await self._board_or_page(ctx)
        if png is None:
            raise web.HTTPNotFound(text="no battles yet")
        return web.Response(body=png, content_type="image/png")


# ------------------------------------------------------------------------------------------------
# CLI: `rlhf serve labels`
# ------------------------------------------------------------------------------------------------

# Settings this command reads (the rest of its flags are its own, below).
SETTINGS_FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (("--host",), dict(dest="host", help="address to bind (0.0.0.0 in pods)")),
    (("--metrics-port",), dict(dest="metrics_port", type=int, help="/metrics port (0: any)")),
    (("--redis-url",), dict(dest="redis_url", help="Redis of the streams (secret: prefer RLHF_REDIS_URL)")),
    (("--log-level",), dict(dest="log_level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])),
]


def add_serve_labels_parser(serve_sub) -> argparse.ArgumentParser:
    """`rlhf serve labels` (registered by rlhf.cli)."""
    from rlhf.cli import add_prompt_source_flags

    p = serve_sub.add_parser(
        "labels", help="the Arena-style labelling web app (votes → preference pairs)",
        description="Show annotators a prompt and responses generated live by the PolicyService "
        "and turn their votes into PreferencePairs / Rankings on the preferences stream (and "
        "records on the votes stream). Annotator tokens: --tokens-file and/or the Redis hash "
        "rlhf:labels:tokens (`rlhf labels annotators add NAME`). RLHF_AUTH_TOKEN is sent to "
        "the policy.")
    p.add_argument("--policy", required=True, metavar="TARGET", help="PolicyService host:port")
    p.add_argument("--policy-b", metavar="TARGET", default=None,
                   help="a second PolicyService (another version): each item compares one "
                   "response from each (A/B between versions)")
    p.add_argument("--port", dest="labels_port", type=int, default=8080,
                   help="HTTP port of the app (0: any free one)")
    p.add_argument("--responses", type=int, default=2,
                   help="responses per item: 2 compares A/B; more ranks them (ties allowed)")
    add_prompt_source_flags(
        p, stream="draw prompts from the newest RolloutPrompts of this stream (read only; e.g. "
        "rlhf:queue:prompts)",
        file='draw prompts from a JSONL file of {"id": ..., "prompt": "..."} rows',
        prompt="a prompt (repeatable); annotators can always type their own")
    p.add_argument("--prompts-window", type=int, default=1000,
                   help="--prompts-stream: how many of the newest prompts to draw from")
    p.add_argument("--stream", default=PREFERENCES_STREAM,
                   help=f"where pairs and rankings go (default {PREFERENCES_STREAM})")
    p.add_argument("--votes-stream", default=VOTES_STREAM,
                   help=f"where every vote is recorded (default {VOTES_STREAM})")
    p.add_argument("--tokens-file", type=Path, default=None,
                   help="annotator tokens, lines annotator_id:token")
    p.add_argument("--max-votes-per-minute", type=int, default=30,
                   help="per annotator (0: no limit)")
    p.add_argument("--double-label", type=float, default=0.0, metavar="SHARE",
                   help="share of voted items shown again to a second annotator (agreement)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the policy's")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--rpc-timeout", type=float, default=60.0, help="deadline of each Generate (s)")
    p.add_argument("--session-hours", type=float, default=12.0, help="how long a login lasts")
    p.add_argument("--secure-cookies", action="store_true",
                   help="mark cookies Secure (serve behind HTTPS)")
    p.add_argument("--save-retry-s", type=float, default=3.0,
                   help="how long a vote is retried while Redis is unreachable")
    for names, kwargs in SETTINGS_FLAGS:
        p.add_argument(*names, default=None, **kwargs)
    p.add_argument("--debug", action="store_true",
                   help="on failure print the traceback (default: one line naming the cause)")
    return p


def config_from_args(args: argparse.Namespace) -> LabelsConfig:
    """The app's config from the parsed flags; ValueError naming the flag."""
    from rlhf.trainer.rollout import prompts_from_flags

    items = prompts_from_flags(args.prompts_file, args.prompts)
    prompts = None if items is None else [Prompt(p.text, p.id) for p in items]
    tokens = load_tokens_file(args.tokens_file) if args.tokens_file is not None else {}
    return LabelsConfig(
        policy=args.policy, policy_b=args.policy_b, responses=args.responses, prompts=prompts,
        prompts_stream=args.prompts_stream, prompts_window=args.prompts_window,
        stream=args.stream, votes_stream=args.votes_stream, tokens=tokens,
        max_votes_per_minute=args.max_votes_per_minute, double_label=args.double_label,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_new_tokens=args.max_new_tokens, rpc_timeout=args.rpc_timeout,
        session_hours=args.session_hours, secure_cookies=args.secure_cookies,
        save_retry_s=args.save_retry_s, port=args.labels_port,
    ).check()


def serve_labels(args: argparse.Namespace) -> int:
    """`rlhf serve labels`: 0 after SIGTERM, 1 when it cannot start or fails, 2 for bad flags."""
    from rlhf.cli import _one_line, _report, _settings_or_exit_code, setup_logging

    prog = "rlhf serve labels"
    settings = _settings_or_exit_code(prog, args)
    if isinstance(settings, int):
        return settings
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"{prog}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    app = LabelsApp(settings, config)
    try:
        asyncio.run(app.run_forever())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - reported as one line (the traceback with --debug)
        return _report(prog, exc, args.debug, started=app.started)
    return 0

