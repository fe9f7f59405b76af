"""The OpenAI-compatible HTTP front of the policy service, called with the official `openai` client.

Real policy servers (transformers backend, tiny models) on 127.0.0.1 serve gRPC and HTTP from
one process; the gRPC API on the same server is the reference the HTTP answers are held to.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from collections import Counter

import grpc
import httpx
import openai
import pytest
from helpers import TEST_REDIS, ThreadedApp, make_settings, status_of
# the two-version store and registry of the hot-swap tests (module-scoped: this module gets its own)
from test_hot_swap import policy_versions, registry, wait_for  # noqa: F401

from rlhf_client import PolicyClient, SamplingParams

TOKEN = "http-test-token"
PROMPT = "the cat sat on the"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a good dog"}]


def _text(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------
# fixtures: a server whose model has a chat template (auth on), one whose model has none
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    from rlhf.models.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("http")
    return make_tiny_model("policy", root / "tiny-chat", seed=0, tie_embeddings=False, chat_template=True)


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    from rlhf.policy.app import make_policy_app

    settings = make_settings(model_dir=chat_model_dir, store_dir=tmp_path_factory.mktemp("store"), http_port=0,
                             metrics_port=0, auth_token=TOKEN, max_message_bytes=1 << 20)
    with ThreadedApp(make_policy_app(settings)) as served:
        yield served


@pytest.fixture(scope="module")
def base_url(server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture(scope="module")
def oai(base_url):
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=TOKEN, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server):
    with PolicyClient(server.target, token=TOKEN, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def name(chat_model_dir) -> str:
    return chat_model_dir.name


@pytest.fixture(scope="module")
def tok(chat_model_dir):
    from rlhf.models.loading import load_tokenizer

    return load_tokenizer(chat_model_dir)


@pytest.fixture(scope="module")
def no_template_server(tiny_policy_dir, tmp_path_factory):
    from rlhf.policy.app import make_policy_app

    settings = make_settings(model_dir=tiny_policy_dir, store_dir=tmp_path_factory.mktemp("store"), http_port=0)
    with ThreadedApp(make_policy_app(settings)) as served:
        yield served


def _post(base_url, path, body, token=TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{base_url}{path}", json=body, headers=headers, timeout=60, **kwargs)


# ------------------------------------------------------------------------------------------------
# the API, through the official client
# ------------------------------------------------------------------------------------------------


def test_models_and_version_everywhere(oai, base_url, name, grpc_client):
    version = grpc_client.get_model().model.version
    models = oai.models.list()
    assert [m.id for m in models.data] == [name]
    raw = oai.completions.with_raw_response.create(model=name, prompt=PROMPT, max_tokens=4, temperature=0)
    assert raw.headers["X-Model-Version"] == version
    res = raw.parse()
    assert res.model == name and res.system_fingerprint == version
    chat = oai.chat.completions.with_raw_response.create(model=name, messages=CHAT, max_tokens=4)
    assert chat.headers["X-Model-Version"] == version and chat.parse().system_fingerprint == version


def test_completions_equal_grpc_tokens_and_logprobs(oai, grpc_client, name, tok):
    """Same request, same seed: the same tokens and log-probs as the gRPC API on the server."""
    for temperature, seed in ((0.0, None), (1.0, 7)):
        res = oai.completions.create(model=name, prompt=[PROMPT, "a good dog"], max_tokens=12,
                                     temperature=temperature, seed=seed, logprobs=1)
        want = grpc_client.generate([PROMPT, "a good dog"], SamplingParams(
            temperature=temperature, seed=seed, max_new_tokens=12, return_logprobs=True))
        assert len(res.choices) == 2
        for choice, c in zip(res.choices, want.completions):
            assert choice.text == c.text
            assert choice.logprobs.tokens == [tok.decode([t], skip_special_tokens=False) for t in c.token_ids]
            assert max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, c.logprobs)) < 1e-6
            assert choice.logprobs.top_logprobs[0] == {choice.logprobs.tokens[0]: choice.logprobs.token_logprobs[0]}
            assert choice.logprobs.text_offset[0] == 0
        assert res.usage.prompt_tokens == sum(len(c.prompt_token_ids) for c in want.completions)
        assert res.usage.completion_tokens == sum(len(c.token_ids) for c in want.completions)


def test_token_id_prompts(oai, name, tok):
    ids = tok.encode(PROMPT, add_special_tokens=False)
    by_text = oai.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = oai.completions.create(model=name, prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in by_ids.choices] == [by_text.choices[0].text] * 2


def test_chat_renders_like_grpc_chat(oai, grpc_client, name, tok):
    res = oai.chat.completions.create(model=name, messages=CHAT, max_tokens=10, temperature=0, logprobs=True,
                                      top_logprobs=0)
    want = grpc_client.generate([CHAT], SamplingParams(temperature=0, max_new_tokens=10, return_logprobs=True))
    c = want.completions[0]
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert c.prompt_token_ids == tok.encode(rendered, add_special_tokens=False)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == c.text
    assert [x.token for x in choice.logprobs.content] == [tok.decode([t]) for t in c.token_ids]
    assert max(abs(x.logprob - lp) for x, lp in zip(choice.logprobs.content, c.logprobs)) < 1e-6
    assert res.usage.prompt_tokens == len(c.prompt_token_ids)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stream_concatenates_to_unary(oai, name, chat):
    kwargs = dict(model=name, max_tokens=12, temperature=1.0, seed=11, n=2)
    if chat:
        unary = oai.chat.completions.create(messages=CHAT, **kwargs)
        stream = oai.chat.completions.create(messages=CHAT, stream=True, stream_options={"include_usage": True},
                                             **kwargs)
    else:
        unary = oai.completions.create(prompt=PROMPT, **kwargs)
        stream = oai.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **kwargs)
    texts, finish, versions, usage = {}, {}, set(), None
    for chunk in stream:
        versions.add(chunk.system_fingerprint)
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            piece = ch.delta.content if chat else ch.text
            texts[ch.index] = texts.get(ch.index, "") + (piece or "")
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    want = {ch.index: (ch.message.content if chat else ch.text) for ch in unary.choices}
    assert texts == want and len(want) == 2
    assert finish == {ch.index: ch.finish_reason for ch in unary.choices}
    assert versions == {unary.system_fingerprint}
    assert usage.completion_tokens == unary.usage.completion_tokens
    assert usage.prompt_tokens == unary.usage.prompt_tokens


def test_n_and_seeds(oai, name):
    a = oai.completions.create(model=name, prompt=PROMPT, max_tokens=12, n=3, seed=5, temperature=1.0)
    b = oai.completions.create(model=name, prompt=PROMPT, max_tokens=12, n=3, seed=5, temperature=1.0)
    c = oai.completions.create(model=name, prompt=PROMPT, max_tokens=12, n=3, seed=6, temperature=1.0)
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert [x.text for x in a.choices] == [x.text for x in b.choices]
    assert len({x.text for x in a.choices}) > 1  # samples differ
    assert [x.text for x in a.choices] != [x.text for x in c.choices]


def test_stop_strings(oai, name):
    full = oai.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    stop = next(full[i:i + 3] for i in range(2, len(full) - 3) if full[i:i + 3].strip())
    for s in (stop, [stop, "never-there"]):
        res = oai.completions.create(model=name, prompt=PROMPT, max_tokens=16, temperature=0, stop=s)
        assert res.choices[0].text == full[: full.find(stop)]
        assert res.choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------
# errors, auth, request ids, health, metrics
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"temperature": "hot"}, 400, "temperature"),
        ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"top_p": 0}, 400, "top_p"),
        ("/v1/completions", {"n": 0}, 400, "n"),
        ("/v1/completions", {"logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"stop": [""]}, 400, "stop"),
        ("/v1/completions", {"seed": -1}, 400, "seed"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"prompt": [10 ** 7]}, 400, "prompt"),
        ("/v1/completions", {"prompt": {"x": 1}}, 400, "prompt"),
        ("/v1/completions", {"echo": True}, 400, "echo"),
        ("/v1/completions", {"suffix": "x"}, 400, "suffix"),
        ("/v1/completions", {"best_of": 3}, 400, "best_of"),
        ("/v1/completions", {"logit_bias": {"5": 10}}, 400, "logit_bias"),
        ("/v1/completions", {"n": 300}, 429, None),
        ("/v1/completions", {"model": "other"}, 404, "model"),
        ("/v1/chat/completions", {"max_completion_tokens": 100_000}, 400, "max_completion_tokens"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, 400, "top_logprobs"),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, 400, "tools"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content"),
    ],
)
def test_bad_requests(base_url, name, path, body, status, param):
    full = {"model": name, **({"prompt": PROMPT} if "chat" not in path else {"messages": CHAT}), **body}
    r = _post(base_url, path, full)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"


def test_harmless_params_are_ignored(oai, name):
    res = oai.completions.create(model=name, prompt=PROMPT, max_tokens=2, user="someone", presence_penalty=0)
    assert len(res.choices) == 1


def test_body_over_the_message_limit_is_413_and_bad_json_400(base_url, name):
    r = _post(base_url, "/v1/completions", {"model": name, "prompt": "x" * (2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(f"{base_url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_auth_request_ids_and_open_health(base_url, name, oai):
    r = _post(base_url, "/v1/completions", {"model": name, "prompt": PROMPT}, token=None)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["X-Request-Id"])
    assert _post(base_url, "/v1/completions", {"model": name, "prompt": PROMPT}, token="wrong").status_code == 401
    assert httpx.get(f"{base_url}/v1/models", timeout=10).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    r = _post(base_url, "/v1/completions", {"model": name, "prompt": PROMPT, "max_tokens": 2},
              headers={"X-Request-Id": "req-abc-123"})
    assert r.status_code == 200 and r.headers["X-Request-Id"] == "req-abc-123"
    assert r.json()["id"] == "cmpl-req-abc-123"
    health = httpx.get(f"{base_url}/health", timeout=10)  # no token: probes carry none
    assert health.status_code == 200 and health.json() == {"status": "SERVING"}


def test_http_metrics(server, oai, name):
    oai.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert re.search(r'rlhf_http_requests_total\{route="/v1/completions",service="policy",status="200"\} [1-9]', text)
    assert 'rlhf_http_requests_total{route="/v1/completions",service="policy",status="401"}' in text
    assert "rlhf_http_latency_seconds_bucket" in text


def test_chat_without_a_template_is_400_on_http_and_grpc(no_template_server, tiny_policy_dir):
    base = f"http://127.0.0.1:{no_template_server.http_port}"
    r = _post(base, "/v1/chat/completions", {"model": tiny_policy_dir.name, "messages": CHAT}, token=None)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and "chat template" in err["message"]
    with PolicyClient(no_template_server.target) as c:
        code, details = status_of(c.generate, [CHAT])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("prompts[0].chat:")
    # completions still work there, without a token (none set)
    r = _post(base, "/v1/completions", {"model": tiny_policy_dir.name, "prompt": PROMPT, "max_tokens": 2}, token=None)
    assert r.status_code == 200


def test_drain_finishes_streams_and_refuses_new_requests(tiny_policy_dir, tmp_path):
    """SIGTERM's drain: /health and new requests 503 at once, a running stream still finishes."""
    from rlhf.policy.app import make_policy_app

    served = ThreadedApp(make_policy_app(make_settings(model_dir=tiny_policy_dir, store_dir=tmp_path, http_port=0)))
    with served:
        base = f"http://127.0.0.1:{served.http_port}"
        body = {"model": tiny_policy_dir.name, "prompt": PROMPT, "max_tokens": 200, "stream": True,
                "temperature": 0}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the stream is running
            drained = threading.Thread(target=served.call, args=(served.app.drain(30),))
            drained.start()
            wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 503,
                     timeout=10, what="/health to say draining")
            refused = _post(base, "/v1/completions", {"model": tiny_policy_dir.name, "prompt": PROMPT}, token=None)
            assert refused.status_code == 503
            rest = [ln for ln in lines if ln]
        drained.join(timeout=30)
        assert rest[-1] == "data: [DONE]"


# ------------------------------------------------------------------------------------------------
# hot-swap under streaming clients (the registry-following service of test_hot_swap)
# ------------------------------------------------------------------------------------------------


def test_hot_swap_under_streaming_clients_fails_nothing(policy_versions, registry):
    from test_hot_swap import GREEDY, PROMPTS

    from rlhf.models.loading import load_tokenizer
    from rlhf.policy.app import make_policy_app

    pv = policy_versions
    name, versions = pv["name"], pv["versions"]
    tok = load_tokenizer(pv["dirs"][0])
    expected = {v: _text(tok, pv["expected"][v][0]) for v in versions}
    assert expected[versions[0]] != expected[versions[1]]
    settings = make_settings(model_name=name, store_dir=pv["store"], redis_url=f"{TEST_REDIS}/0",
                             swap_poll_s=0.5, batch_max_wait_ms=2, http_port=0)
    stop = threading.Event()
    failures: list[BaseException] = []
    wrong: list[tuple] = []
    seen: set[str] = set()
    done = [0]
    served_by: Counter[str] = Counter()  # finished streams per version

    def streamer(base):
        with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60) as c:
            while not stop.is_set():
                try:
                    chunks = list(c.completions.create(model=name, prompt=PROMPTS[0], temperature=0, stream=True,
                                                       max_tokens=GREEDY.max_new_tokens))
                except openai.OpenAIError as exc:
                    failures.append(exc)
                    continue
                versions_seen = {ch.system_fingerprint for ch in chunks}
                text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                if len(versions_seen) != 1 or text != expected.get(next(iter(versions_seen))):
                    wrong.append((versions_seen, text))
                seen.update(versions_seen)
                served_by.update(versions_seen)
                done[0] += 1

    with ThreadedApp(make_policy_app(settings)) as served:
        base = f"http://127.0.0.1:{served.http_port}"
        threads = [threading.Thread(target=streamer, args=(base,)) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            for k in range(4):
                version = versions[(k + 1) % 2]
                registry.activate(name, version)
                wait_for(lambda: httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["version"] == version,
                         what=f"swap to {version}")
                before = served_by[version]  # streams on this version: at least one per streamer
                wait_for(lambda: served_by[version] >= before + len(threads),
                         what=f"streams served by {version}")
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=60)
    assert not failures, failures[:3]
    assert not wrong, wrong[:3]
    assert seen == set(versions)
    assert done[0] > 6


async def test_http_port_in_use_names_the_setting(tiny_policy_dir, tmp_path):
    import socket

    from rlhf.errors import StartupError
    from rlhf.policy.app import make_policy_app

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        app = make_policy_app(make_settings(model_dir=tiny_policy_dir, store_dir=tmp_path,
                                            http_port=busy.getsockname()[1]))
        with pytest.raises(StartupError) as err:
            await app.start()
    assert err.value.settings == ("http_port",) and "in use" in err.value.cause
