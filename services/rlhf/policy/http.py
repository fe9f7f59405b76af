"""The OpenAI-compatible HTTP front of the policy service: JSON in, `GenerateInput` out, JSON back.

It runs in the policy process on its own port (`http_port`), on the event loop of the gRPC
server, and calls the same `Generator` the gRPC servicer calls: limits, the engine, version
bookkeeping and hot-swaps are shared, and no request takes an extra hop. Like the servicer it
only translates (no tensors here).

Routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`
(open: 200 while serving, 503 while loading or draining). Every response carries `X-Request-Id`
(the caller's or a new one); generation responses name the model version that produced them in
`X-Model-Version` and in the body's `system_fingerprint` (`model` is the served name). One
request is one Generator call, so a response never mixes versions.

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`, with the status the
gRPC code maps to: INVALID_ARGUMENT 400 (`param` names the request field), UNAUTHENTICATED 401,
NOT_FOUND 404, FAILED_PRECONDITION 409, body over `max_message_bytes` 413, RESOURCE_EXHAUSTED
429, UNAVAILABLE / draining 503. Parameters that would change what is generated but are not
supported (`best_of`, `echo`, `suffix`, `logit_bias`, `tools`, …) are refused naming them.

Log-probs are those of the gRPC API (the raw model, temperature 1): the engines report only the
sampled token's, so `logprobs` ≤ 1 (completions) and `top_logprobs` 0 (chat).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from rlhf.config import Settings
from rlhf.errors import (
    Cancelled,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from rlhf.policy.generator import ChatTurn, GenerateInput, Generator, PromptInput
from rlhf.policy.types import Completion, Finish
from rlhf.serving.interceptors import REQUEST_ID
from rlhf.serving.metrics import HTTP_COUNT, HTTP_LATENCY
from rlhf.serving.server import check_bindable

log = logging.getLogger(__name__)

_OPEN_PATHS = frozenset({"/health"})
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# Accepted and ignored: they change nothing that is generated.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier"})
# Accepted when they are their neutral value (what OpenAI's SDKs and apps often send).
_NEUTRAL = {"presence_penalty": 0, "frequency_penalty": 0, "best_of": 1, "echo": False,
            "parallel_tool_calls": None}
_COMMON = frozenset({"model", "n", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed",
                     "stream", "stream_options"})
_COMPLETION_PARAMS = _COMMON | {"prompt", "logprobs"}
_CHAT_PARAMS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
_FINISH = {Finish.STOP: "stop", Finish.EOS: "stop", Finish.LENGTH: "length", Finish.ABORT: "stop"}
# Generator field (first segment after "params.") → the OpenAI parameter.
_PARAM_NAMES = {"max_new_tokens": "max_tokens"}


class HttpError(Exception):
    """An error answered as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _ERROR_TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "service_unavailable"}


def _bad(param: str | None, message: str) -> HttpError:
    return HttpError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def from_service_error(exc: ServiceError, *, chat: bool = False, max_tokens_name: str = "max_tokens") -> HttpError:
    """The HTTP status and OpenAI parameter of a generator error (the gRPC code's mapping)."""
    if isinstance(exc, InvalidArgument):
        field, problem = exc.violations[0]  # OpenAI's schema names one `param`
        return _bad(openai_param(field, chat=chat, max_tokens_name=max_tokens_name), problem)
    status = {ResourceExhausted: 429, Unavailable: 503, FailedPrecondition: 409, NotFound: 404,
              Unauthenticated: 401, Cancelled: 499}.get(type(exc), 500)
    code = {429: "rate_limit_exceeded", 503: "unavailable", 409: "failed_precondition"}.get(status)
    return HttpError(status, exc.message, code=code)


def openai_param(field: str, *, chat: bool, max_tokens_name: str = "max_tokens") -> str:
    """`prompts[0].text` → `prompt` (chat: `messages`), `params.max_new_tokens` → `max_tokens`, …"""
    if field.startswith("prompts"):
        return "messages" if chat else "prompt"
    head = re.split(r"[\[.]", field.removeprefix("params."), maxsplit=1)[0]
    name = _PARAM_NAMES.get(head, head)
    return max_tokens_name if name == "max_tokens" else name


# ------------------------------------------------------------------------------------------------
# request parsing: JSON → GenerateInput (types checked here, ranges by the generator)
# ------------------------------------------------------------------------------------------------


def _int(body: dict, key: str, *, minimum: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, f"must be an integer, got {json.dumps(v)}")
    if minimum is not None and v < minimum:
        raise _bad(key, f"must be ≥ {minimum}, got {v}")
    return v


def _number(body: dict, key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(key, f"must be a number, got {json.dumps(v)}")
    return float(v)


def _bool(body: dict, key: str) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(key, f"must be true or false, got {json.dumps(v)}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise _bad("stop", "must be a string or a list of strings")


def _check_params(body: dict, allowed: frozenset[str]) -> None:
    refused = []
    for key, value in body.items():
        if key in allowed or key in _IGNORED or value is None:
            continue
        if key in _NEUTRAL and value == _NEUTRAL[key]:
            continue
        refused.append(key)
    if refused:
        raise HttpError(400, f"unsupported parameter{'s' if len(refused) > 1 else ''}: {', '.join(refused)} "
                        "(this server generates from the policy as it is: no penalties, biases, echo, "
                        "suffix, best_of, tools or response formats)", param=refused[0],
                        code="unsupported_parameter")


def _prompts(body: dict) -> tuple[PromptInput, ...]:
    p = body.get("prompt")
    if isinstance(p, str):
        return (PromptInput(text=p),)
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return tuple(PromptInput(text=x) for x in p)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return (PromptInput(token_ids=tuple(p)),)
        if all(isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x) for x in p):
            return tuple(PromptInput(token_ids=tuple(x)) for x in p)
    raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")


def _content(content: Any, k: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{k}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{k}].content", "must be a string or a list of text parts")


def _messages(body: dict) -> tuple[ChatTurn, ...]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list of {role, content} objects")
    out = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{k}]", "must be an object with a string role and content")
        extra = sorted(set(m) - {"role", "content", "name"})
        if extra:
            raise _bad(f"messages[{k}].{extra[0]}", "not supported (text messages only)")
        out.append(ChatTurn(m["role"], _content(m.get("content"), k)))
    return tuple(out)


@dataclass(frozen=True)
class _Request:
    """A parsed request: what to generate and how to answer."""

    chat: bool
    inp: GenerateInput
    logprobs: int | None  # completions: 0 / 1; chat: 0 when asked
    stream: bool
    include_usage: bool
    max_tokens_name: str


def parse(body: Any, *, chat: bool) -> _Request:
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    _check_params(body, _CHAT_PARAMS if chat else _COMPLETION_PARAMS)
    if not isinstance(body.get("model"), str):
        raise _bad("model", "required: the served model's name (GET /v1/models)")
    if chat:
        prompts = (PromptInput(chat=_messages(body)),)
        max_tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, max_tokens_name)
        logprobs = 0 if _bool(body, "logprobs") else None
        top = _int(body, "top_logprobs", minimum=0)
        if top:
            raise _bad("top_logprobs", "only 0 is supported: the engines report the sampled token's log-prob only")
        if top is not None and logprobs is None:
            raise _bad("top_logprobs", "needs logprobs: true")
    else:
        prompts = _prompts(body)
        max_tokens_name = "max_tokens"
        max_tokens = _int(body, "max_tokens")
        logprobs = _int(body, "logprobs", minimum=0)
        if logprobs is not None and logprobs > 1:
            raise _bad("logprobs", "at most 1: the engines report the sampled token's log-prob only")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not (isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise _bad("stream_options", "only {\"include_usage\": bool} is supported")
    include_usage = _bool(opts, "include_usage") if opts else False
    inp = GenerateInput(
        prompts=prompts,
        n=_int(body, "n"),
        temperature=_number(body, "temperature"),
        top_p=_number(body, "top_p"),
        top_k=_int(body, "top_k"),
        max_new_tokens=max_tokens,
        stop=_stop(body),
        seed=_int(body, "seed", minimum=0),
        return_logprobs=logprobs is not None,
    )
    return _Request(chat, inp, logprobs, stream, include_usage, max_tokens_name)


# ------------------------------------------------------------------------------------------------
# responses: completions → OpenAI JSON
# ------------------------------------------------------------------------------------------------


class _LogprobWriter:
    """Log-prob objects of one choice, in OpenAI's format, as its tokens arrive."""

    def __init__(self, tokenizer, req: _Request):
        self.tok, self.req, self.offset = tokenizer, req, 0

    def __call__(self, token_ids: list[int], logprobs: list[float]) -> dict | None:
        if self.req.logprobs is None:
            return None
        strings = [self.tok.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                   for t in token_ids]
        if self.req.chat:
            return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                                for s, lp in zip(strings, logprobs)]}
        offsets = []
        for s in strings:
            offsets.append(self.offset)
            self.offset += len(s)
        return {"tokens": strings, "token_logprobs": list(logprobs),
                "top_logprobs": [{s: lp} for s, lp in zip(strings, logprobs)] if self.req.logprobs else None,
                "text_offset": offsets}


class HttpFront:
    """The aiohttp server: started beside the gRPC server, drained with it (see ServiceApp)."""

    def __init__(self, settings: Settings, generator: Generator, label: str = "policy"):
        self.settings = settings
        self.gen = generator
        self.label = label
        self.port: int | None = None
        self._serving = False
        self._draining = False
        self._inflight = 0
        self._idle = asyncio.Event()
        self._runner: web.AppRunner | None = None
        token = settings.auth_token
        self._auth = f"Bearer {token.get_secret_value()}".encode() if token else None

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        s = self.settings
        check_bindable(s.host, s.http_port, "http_port", what="http: ")
        app = web.Application(middlewares=[self._middleware], client_max_size=s.max_message_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, s.host, s.http_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            from rlhf.errors import StartupError

            raise StartupError(f"http: cannot listen on {s.host}:{s.http_port} ({exc.strerror})",
                               "http_port") from exc
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("%s: OpenAI-compatible HTTP on %s:%d", self.label, s.host, self.port)
        return self.port

    def set_serving(self, serving: bool) -> None:
        self._serving = serving

    async def drain(self, grace: float) -> None:
        """/health → 503 and new requests → 503 at once; in-flight ones get `grace` seconds."""
        if self._runner is None:
            return
        self._serving, self._draining = False, True
        if self._inflight:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except asyncio.TimeoutError:
                log.warning("%s: %d HTTP requests still running after %.1fs; cancelling them",
                            self.label, self._inflight, grace)
        runner, self._runner = self._runner, None
        await runner.cleanup()

    # -------------------------------------------------------------- middleware
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        REQUEST_ID.set(request_id)  # the handler runs in this task: its logs and ids see it
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        counted = request.path.startswith("/v1/")
        if counted:
            self._inflight += 1
        status = 500
        try:
            try:
                self._check_auth(request)
                if counted:
                    self._check_ready()
                response = await handler(request)
            except HttpError as exc:
                response = _json_error(exc)
            except web.HTTPException as exc:  # unknown route, wrong method, body too large
                response = _json_error(HttpError(
                    exc.status, exc.reason if exc.status != 413 else
                    f"request body over the limit of {self.settings.max_message_bytes} bytes",
                    code={413: "request_too_large", 404: "not_found"}.get(exc.status)))
            except ServiceError as exc:
                response = _json_error(from_service_error(exc))
            except (ConnectionResetError, asyncio.CancelledError):
                status = 499  # the client went away
                raise
            except Exception:  # noqa: BLE001 - a bug: logged with the request id, answered 500
                log.exception("bug: unhandled error in %s (request %s)", request.path, request_id)
                response = _json_error(HttpError(500, f"internal error (request id {request_id})"))
            status = response.status
            if not response.prepared:
                response.headers["X-Request-Id"] = request_id
            return response
        finally:
            if counted:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()
            HTTP_COUNT.labels(self.label, route, str(status)).inc()
            HTTP_LATENCY.labels(self.label, route, str(status)).observe(time.perf_counter() - started)

    def _check_auth(self, request: web.Request) -> None:
        if self._auth is None or request.path in _OPEN_PATHS:
            return
        got = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(got, self._auth):
            raise HttpError(401, "missing or wrong token (Authorization: Bearer <token>)", code="invalid_api_key")

    def _check_ready(self) -> None:
        if self._draining:
            raise HttpError(503, "the server is draining (shutting down)", code="unavailable")
        if not self._serving:
            raise HttpError(503, "the model is loading", code="unavailable")
        if self._inflight > self.settings.max_concurrent_rpcs:
            raise HttpError(429, f"more than {self.settings.max_concurrent_rpcs} concurrent requests",
                            code="rate_limit_exceeded")

    # -------------------------------------------------------------- routes
    async def _health(self, request: web.Request) -> web.Response:
        state = "SERVING" if self._serving else ("DRAINING" if self._draining else "NOT_SERVING")
        return web.json_response({"status": state}, status=200 if self._serving else 503)

    async def _models(self, request: web.Request) -> web.Response:
        ref = self.gen.engine.info.ref
        data = {"object": "list", "data": [{"id": ref.name, "object": "model", "created": 0,
                                            "owned_by": "rlhf", "version": ref.version}]}
        return web.json_response(data, headers={"X-Model-Version": ref.version})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise _bad(None, f"the request body is not JSON ({exc})") from exc
        req = parse(body, chat=chat)
        name = self.gen.engine.info.ref.name
        if body["model"] != name:
            raise HttpError(404, f"model {body['model']!r} is not served here; this server serves {name!r}",
                            param="model", code="model_not_found")
        try:
            if req.stream:
                return await self._stream(request, req, name)
            completions, ref = await self.gen.generate(req.inp)
        except ServiceError as exc:
            raise from_service_error(exc, chat=chat, max_tokens_name=req.max_tokens_name) from exc
        choices = []
        for k, c in enumerate(completions):
            lp = _LogprobWriter(self.gen.engine.tokenizer, req)(c.token_ids, c.logprobs)
            choice: dict[str, Any] = {"index": k, "finish_reason": _FINISH[c.finish], "logprobs": lp}
            if chat:
                choice["message"] = {"role": "assistant", "content": c.text}
            else:
                choice["text"] = c.text
            choices.append(choice)
        out = {
            "id": _id(chat, request), "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": name, "system_fingerprint": ref.version,
            "choices": choices, "usage": _usage(completions),
        }
        return web.json_response(out, headers={"X-Model-Version": ref.version})

    async def _stream(self, request: web.Request, req: _Request, name: str) -> web.StreamResponse:
        """Server-sent events; errors before the first chunk get their status, later ones an
        error event. The first chunk is awaited before the headers go out: it names the version."""
        chunks = self.gen.stream(req.inp).__aiter__()
        n = req.inp.n or 1
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        ref = first[1] if first is not None else self.gen.engine.info.ref
        response = web.StreamResponse(headers={**_SSE_HEADERS, "X-Model-Version": ref.version,
                                               "X-Request-Id": REQUEST_ID.get()})
        await response.prepare(request)
        base = {"id": _id(req.chat, request), "object": "chat.completion.chunk" if req.chat else "text_completion",
                "created": int(time.time()), "model": name}
        writers: dict[int, _LogprobWriter] = {}
        started: set[int] = set()
        prompt_tokens = completion_tokens = 0
        try:
            item = first
            while item is not None:
                chunk, ref = item
                index = chunk.prompt_index * n + chunk.sample_index
                writer = writers.setdefault(index, _LogprobWriter(self.gen.engine.tokenizer, req))
                if chunk.prompt_token_ids and chunk.sample_index == 0:
                    prompt_tokens += len(chunk.prompt_token_ids)
                completion_tokens += len(chunk.token_ids)
                choice: dict[str, Any] = {
                    "index": index, "logprobs": writer(chunk.token_ids, chunk.logprobs),
                    "finish_reason": _FINISH[chunk.finish] if chunk.finish is not None else None,
                }
                if req.chat:
                    delta = {"content": chunk.text}
                    if index not in started:
                        delta = {"role": "assistant", **delta}
                    choice["delta"] = delta
                else:
                    choice["text"] = chunk.text
                started.add(index)
                await _event(response, {**base, "system_fingerprint": ref.version, "choices": [choice]})
                try:
                    item = await chunks.__anext__()
                except StopAsyncIteration:
                    item = None
            if req.include_usage:
                await _event(response, {**base, "system_fingerprint": ref.version, "choices": [],
                                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                                  "total_tokens": prompt_tokens + completion_tokens}})
            await response.write(b"data: [DONE]\n\n")
        except ServiceError as exc:  # after the headers: an error event ends the stream
            err = from_service_error(exc, chat=req.chat, max_tokens_name=req.max_tokens_name)
            await _event(response, err.body())
        finally:
            await chunks.aclose()  # the engine stops work for a client that went away
        await response.write_eof()
        return response


def _id(chat: bool, request: web.Request) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{REQUEST_ID.get()}"


def _usage(completions: list[Completion]) -> dict:
    prompt = sum(len(c.prompt_token_ids) for c in completions if c.sample_index == 0)
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


async def _event(response: web.StreamResponse, data: dict) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


def _json_error(exc: HttpError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)
