"""The labelling app (`rlhf serve labels`) in a real headless Chromium.

Real parts throughout: PolicyServices on tiny models (127.0.0.1, transformers backend), Redis
(db 8), the aiohttp app on a loopback port, and Chromium driven over the DevTools protocol
(tests/browser.py): real mouse clicks and key presses, real form submits and cookies. Every
entry the app writes is read back from the streams and compared field by field with what the
page showed.

The XSS case needs a policy that writes HTML. A random tiny model does not, so
`make_xss_policy` builds a real checkpoint that does: a tiny Qwen2 whose transformer blocks are
switched off (attention and MLP outputs zeroed), so the next token depends only on the current
one, with embeddings and an untied LM head set so that token → next token walks the token ids
of `<svg onload=alert(1)>` and ends with EOS (no token repeats with two different successors).
The PolicyService serves it like any checkpoint and every sample, at any temperature, is that
string: the page must show it as characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from browser import Browser, chromium_binary
from helpers import TEST_REDIS, ThreadedApp, make_settings

from rlhf_client import PolicyClient
from rlhf_client.queues import decode_entry
from rlhfpb.v1 import samples_pb2

DB = 8
REDIS_URL = f"{TEST_REDIS}/{DB}"
TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
PROMPTS = ["the cat sat on the", "a good dog", "yes please, one red apple and", "numbers: 1 2 3"]
XSS = "<svg onload=alert(1)>"
# (It ends in a word: the XSS policy's next token depends on the last prompt token only, and
# after ">" — the end of its chain — it would stop at once.)
TYPED_XSS = '<script>window.__xss = 1; alert("prompt")</script><img src=x onerror=alert(2)> hello'
# Where the docs' screenshots come from: RLHF_DOCS_SCREENSHOTS=docs/img pytest … copies them.
DOCS_SCREENSHOTS = os.environ.get("RLHF_DOCS_SCREENSHOTS")


# ------------------------------------------------------------------------------------------------
# Parts
# ------------------------------------------------------------------------------------------------


def make_xss_policy(out: Path) -> Path:
    """A real tiny checkpoint that writes `XSS` whatever the prompt (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.models.tiny import make_tiny_model, make_tokenizer

    tok = make_tokenizer("tiny")
    vocab = {tok.decode([i]): i for i in range(4, len(tok))}  # no special tokens
    pieces = sorted(vocab, key=len, reverse=True)

    def chain(pos: int, seq: list[int], succ: dict[int, int]) -> list[int] | None:
        if pos == len(XSS):
            return seq if seq[-1] not in succ else None  # the last token's successor is EOS
        for piece in pieces:
            if not XSS.startswith(piece, pos):
                continue
            t, nxt = vocab[piece], dict(succ)
            if seq and nxt.setdefault(seq[-1], t) != t:
                continue  # that token already leads elsewhere
            found = chain(pos + len(piece), [*seq, t], nxt)
            if found:
                return found
        return None

    seq = chain(0, [], {})
    assert seq and tok.decode(seq) == XSS
    path = make_tiny_model("policy", out, tie_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:  # blocks add nothing: the residual is the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        other = len(seq)  # one direction for every token outside the chain
        emb.zero_()
        emb[:, other] = 1.0
        head.zero_()
        head[seq[0], other] = 30.0  # anything → the first token
        for k, t in enumerate(seq):
            emb[t].zero_()
            emb[t, k] = 1.0
            head[seq[k + 1] if k + 1 < len(seq) else 0, k] = 30.0  # … → the next; last → EOS
    model.save_pretrained(path)
    return path


def serve_policy(model_dir: Path, store: Path):
    from rlhf.policy.app import make_policy_app

    return ThreadedApp(make_policy_app(make_settings(model_dir=model_dir, store_dir=store)))


class RedisProxy:
    """A TCP proxy in front of the test Redis that the test can cut (Redis "down") and restore."""

    def __init__(self, upstream: str = TEST_REDIS):
        host_port = upstream.split("://", 1)[1]
        self.up_host, self.up_port = host_port.rsplit(":", 1)
        self.port = 0
        self._server = None
        self._writers: set = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(self.up_host, int(self.up_port))
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _start(self):
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self):
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._stop())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture(scope="module")
def r():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def policy_b_target(tiny_policy_dir_b, tmp_path_factory):
    with serve_policy(tiny_policy_dir_b, tmp_path_factory.mktemp("store-b")) as served:
        yield served.target


@pytest.fixture(scope="module")
def xss_target(tmp_path_factory):
    path = make_xss_policy(tmp_path_factory.mktemp("models-xss") / "writes-html")
    with serve_policy(path, tmp_path_factory.mktemp("store-xss")) as served:
        yield served.target


@pytest.fixture(scope="module")
def base_config(policy_target, policy_b_target):
    from rlhf.labels.app import LabelsConfig, Prompt
    from rlhf.labels.auth import token_digest

    return LabelsConfig(
        policy=policy_target, policy_b=policy_b_target, prompts=[Prompt(p, f"p{i}") for i, p in
                                                                 enumerate(PROMPTS)],
        tokens={token_digest(t): a for a, t in TOKENS.items()}, max_new_tokens=12, port=0,
        seed=7, max_votes_per_minute=1000, save_retry_s=0.5)


@contextlib.contextmanager
def labels_app(config, redis_url: str = REDIS_URL):
    from rlhf.labels.app import LabelsApp

    app = LabelsApp(make_settings(redis_url=redis_url), config)
    with ThreadedApp(app) as served:
        yield f"http://127.0.0.1:{served.port}"


@pytest.fixture(scope="module")
def base(base_config, r):
    with labels_app(base_config) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if chromium_binary() is None:
        pytest.fail("chromium not found: the labelling app is tested in a real browser "
                    "(apt-get install chromium chromium-driver; .ci/run does it)")
    with Browser() as b:
        yield b


# ------------------------------------------------------------------------------------------------
# Page helpers
# ------------------------------------------------------------------------------------------------


def login(b: Browser, base: str, token: str) -> int | None:
    b.clear_cookies()
    b.goto(base + "/login")
    b.type_text("#token", token)
    return b.navigates(lambda: b.click("#login"))


def shown(b: Browser) -> dict[str, str]:
    """Letter → completion text, as the page shows them."""
    pairs = b.evaluate("[...document.querySelectorAll('.response')]"
                       ".map(e => [e.dataset.letter, e.querySelector('.completion').textContent])")
    return dict(pairs)


def reveal(b: Browser) -> dict[str, str]:
    """Letter → model, from the notice after a saved vote."""
    rows = b.texts("#reveal li")
    return {row.split(" was ")[0]: row.split(" was ")[1].split(" (")[0] for row in rows}


def submit_form(b: Browser, action: str, **fields: str) -> None:
    """Post a form built in the page (with the page's CSRF token) — as a browser re-sends one."""
    b.evaluate(
        "(() => { const f = document.createElement('form'); f.method = 'post';"
        f" f.action = {json.dumps(action)};"
        f" const fields = {{csrf: document.querySelector('input[name=csrf]').value,"
        f" ...{json.dumps(fields)}}};"
        " for (const [k, v] of Object.entries(fields)) { const i = document.createElement('input');"
        " i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }"
        " document.body.appendChild(f); f.submit(); })()")


def tail(r: redis.Redis, stream: str) -> bytes:
    last = r.xrevrange(stream, count=1)
    return last[0][0] if last else b"0-0"


def new_entries(r: redis.Redis, stream: str, after: bytes) -> list:
    return [fields for _, fields in r.xrange(stream, min=b"(" + after)]


def new_payloads(r, stream, after):
    return [decode_entry(f) for f in new_entries(r, stream, after)]


def new_votes(r, stream, after):
    from rlhf.labels.votes import Vote

    return [Vote.from_json(f[b"vote"]) for f in new_entries(r, stream, after)]


class Marks:
    """Stream positions before an action: what the action added, exactly."""

    def __init__(self, r, prefs="rlhf:queue:preferences", votes="rlhf:labels:votes"):
        self.r, self.prefs, self.votes = r, prefs, votes
        self.at = (tail(r, prefs), tail(r, votes))

    def payloads(self):
        return new_payloads(self.r, self.prefs, self.at[0])

    def votes_(self):
        return new_votes(self.r, self.votes, self.at[1])


def model_names(*targets: str) -> list[str]:
    out = []
    for t in targets:
        with PolicyClient(t) as c:
            ref = c.get_model().model
        out.append(f"{ref.name}@{ref.version}")
    return out


def keep_screenshot(b: Browser, tmp_path: Path, name: str) -> Path:
    path = b.screenshot(tmp_path / name)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if DOCS_SCREENSHOTS:
        shutil.copy(path, Path(DOCS_SCREENSHOTS) / name)
    return path


def check_pair_vote(r, marks: Marks, page: dict[str, str], prompt: str, pick: str,
                    models: dict[str, str], annotator: str = "alice"):
    """The vote added exactly one PreferencePair and one vote record, equal to what the page
    showed: the picked letter's text is chosen, the other's rejected, with their models."""
    other = "B" if pick == "A" else "A"
    (pair,) = marks.payloads()
    (vote,) = marks.votes_()
    assert isinstance(pair, samples_pb2.PreferencePair)
    expected = samples_pb2.PreferencePair(
        id=vote.id, prompt=prompt, chosen=page[pick], rejected=page[other], source="human",
        builder="vote", labeller=f"human:{annotator}", created=pair.created)
    for field, letter in (("chosen_model", pick), ("rejected_model", other)):
        name, version = models[letter].rsplit("@", 1)
        getattr(expected, field).CopyFrom(getattr(expected, field).__class__(name=name, version=version))
    expected.metadata.update({
        "vote_id": vote.id, "item_id": vote.item_id, "prompt_id": vote.prompt_id,
        "sampling": json.dumps(vote.sampling, sort_keys=True), "shown": json.dumps(list(vote.shown)),
        "shown_at": f"{vote.shown_at:.6f}", "voted_at": f"{vote.voted_at:.6f}", "vote": vote.outcome})
    assert pair == expected
    assert abs(pair.created.ToNanoseconds() / 1e9 - vote.voted_at) < 1e-3
    # The vote record: canonical order (policy A's response first), display order, outcome.
    assert vote.annotator == annotator and vote.mode == "pair" and vote.prompt == prompt
    assert [page["A"], page["B"]] == [vote.responses[i].text for i in vote.shown]
    assert [models["A"], models["B"]] == [vote.responses[i].model for i in vote.shown]
    assert vote.outcome == ("a" if vote.shown["AB".index(pick)] == 0 else "b")
    assert vote.pair_id == pair.id and vote.ranks is None
    assert vote.shown_at <= vote.voted_at
    assert vote.sampling["max_new_tokens"] == 12 and "seed" in vote.sampling
    return pair, vote


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------


def test_only_health_is_open(base):
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a, **k):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    with opener.open(base + "/healthz", timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"ok\n"
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    with opener.open(base + "/readyz", timeout=10) as resp:
        assert resp.status == 200
    for method, path in (("GET", "/"), ("GET", "/leaderboard"), ("GET", "/leaderboard.png"),
                         ("POST", "/vote"), ("POST", "/typed"), ("POST", "/logout")):
        req = urllib.request.Request(base + path, method=method, data=b"" if method == "POST" else None)
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(req, timeout=10)
        assert err.value.code == 303 and err.value.headers["Location"] == "/login", path


def test_login_then_vote_by_click_and_by_key(base, browser, r, policy_target, policy_b_target, tmp_path):
    b = browser
    assert login(b, base, TOKENS["alice"]) == 200
    assert b.url == base + "/" and b.text("#annotator") == "alice"
    cookies = {c["name"]: c for c in b.cookies()}
    session = cookies["rlhf_labels_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    html = b.evaluate("document.documentElement.outerHTML")
    assert TOKENS["alice"] not in html and "pinned-" not in html  # no secret, no model name
    names = dict(zip("AB", model_names(policy_target, policy_b_target)))
    votes_before = int(b.text("#vote-count"))

    # A click on "A is better".
    prompt, page = b.text("#prompt"), shown(b)
    assert prompt in PROMPTS and len(page) == 2 and all(page.values())
    marks = Marks(r)
    assert b.navigates(lambda: b.click("#vote-A")) == 200
    assert b.text("#notice p").startswith("Saved: A is better.")
    models = reveal(b)
    assert sorted(models.values()) == sorted(names.values())  # one response from each version
    check_pair_vote(r, marks, page, prompt, "A", models)
    assert int(b.text("#vote-count")) == votes_before + 1
    keep_screenshot(b, tmp_path, "labels-vote.png")  # the reveal, and the next item

    # The key "2": B is better.
    prompt, page = b.text("#prompt"), shown(b)
    marks = Marks(r)
    assert b.navigates(lambda: b.press("2")) == 200
    assert b.text("#notice p").startswith("Saved: B is better.")
    check_pair_vote(r, marks, page, prompt, "B", reveal(b))

    # ← is A as well.
    prompt, page = b.text("#prompt"), shown(b)
    marks = Marks(r)
    assert b.navigates(lambda: b.press("ArrowLeft")) == 200
    check_pair_vote(r, marks, page, prompt, "A", reveal(b))
    assert int(b.text("#vote-count")) == votes_before + 3
    assert not b.dialogs and not b.console_errors


@pytest.mark.parametrize("key,outcome", [("3", "tie"), ("t", "tie"), ("4", "both_bad"), ("b", "both_bad")])
def test_tie_and_both_bad_make_no_pair(base, browser, r, key, outcome):
    b = browser
    if b.text("#annotator") != "alice":
        login(b, base, TOKENS["alice"])
    prompt, page = b.text("#prompt"), shown(b)
    marks = Marks(r)
    assert b.navigates(lambda: b.press(key)) == 200
    assert "No training pair" in b.text("#notice p")
    assert marks.payloads() == []
    (vote,) = marks.votes_()
    assert (vote.outcome, vote.pair_id, vote.prompt) == (outcome, None, prompt)
    assert {vote.responses[i].text for i in vote.shown} == set(page.values())


def test_skip_and_regenerate_record_nothing(base, browser, r):
    b = browser
    if b.text("#annotator") != "alice":
        login(b, base, TOKENS["alice"])
    marks = Marks(r)
    ticket = b.evaluate("document.querySelector('input[name=ticket]').value")
    assert b.navigates(lambda: b.press("s")) == 200
    assert b.text("#notice p") == "Skipped."
    prompt, page = b.text("#prompt"), shown(b)
    assert b.navigates(lambda: b.press("r")) == 200
    assert b.text("#notice p") == "Regenerated."
    assert b.text("#prompt") == prompt  # the same prompt, new samples (another seed)
    assert b.evaluate("document.querySelector('input[name=ticket]').value") != ticket
    assert marks.payloads() == [] and marks.votes_() == []
    assert r.get(f"rlhf:labels:pending:{ticket}") is None  # the skipped page is forgotten


def test_wrong_login_token_is_refused(base, browser):
    b = browser
    assert login(b, base, "not-a-token-of-anyone-at-all") == 401
    assert b.text("#login-error") == "Unknown token."
    assert "rlhf_labels_session" not in {c["name"] for c in b.cookies()}
    b.goto(base + "/")
    assert b.url == base + "/login"
    # A login form without its CSRF token is refused as well.
    b.evaluate("document.querySelector('#login-form input[name=csrf]').remove()")
    b.type_text("#token", TOKENS["alice"])
    assert b.navigates(lambda: b.click("#login")) == 403
    assert "rlhf_labels_session" not in {c["name"] for c in b.cookies()}


def test_form_without_its_csrf_token_is_refused(base, browser, r):
    b = browser
    login(b, base, TOKENS["alice"])
    marks = Marks(r)
    b.evaluate("document.querySelector('#vote-form input[name=csrf]').remove()")
    assert b.navigates(lambda: b.click("#vote-A")) == 403
    assert "CSRF" in b.text("#message")
    b.goto(base + "/")
    b.evaluate("document.querySelector('#vote-form input[name=csrf]').value = '0'.repeat(64)")
    assert b.navigates(lambda: b.press("1")) == 403
    # Another session's token (bob's, from his own page) is refused too.
    login(b, base, TOKENS["bob"])
    bobs = b.evaluate("document.querySelector('#vote-form input[name=csrf]').value")
    login(b, base, TOKENS["alice"])
    b.evaluate(f"document.querySelector('#vote-form input[name=csrf]').value = {json.dumps(bobs)}")
    assert b.navigates(lambda: b.click("#vote-B")) == 403
    assert marks.payloads() == [] and marks.votes_() == []


def test_typed_prompt_and_html_completions_render_as_text(base_config, browser, r, xss_target):
    b = browser
    config = replace(base_config, policy=xss_target, policy_b=None, prompts=None, max_new_tokens=32)
    with labels_app(config) as url:
        login(b, url, TOKENS["alice"])
        assert b.text("#no-prompts")  # no prompt source: only typed prompts
        b.type_text("#typed-prompt", TYPED_XSS)
        assert b.navigates(lambda: b.click("#typed-submit")) == 200
        assert b.text("#prompt") == TYPED_XSS
        assert shown(b) == {"A": XSS, "B": XSS}  # the policy's HTML, as characters
        tags = b.evaluate("[...document.querySelectorAll('main *')].map(e => e.tagName.toLowerCase())")
        assert not {"svg", "script", "img"} & set(tags)
        assert b.evaluate("window.__xss === undefined") and not b.dialogs
        marks = Marks(r)
        assert b.navigates(lambda: b.click("#vote-A")) == 200
        assert marks.payloads() == []  # identical responses make no pair ...
        (vote,) = marks.votes_()  # ... but the vote is recorded, text intact
        assert vote.prompt == TYPED_XSS and vote.prompt_id == ""
        assert [x.text for x in vote.responses] == [XSS, XSS]
        assert not b.dialogs


def test_redis_down_means_not_saved_and_nothing_half_written(base_config, browser, r):
    b = browser
    proxy = RedisProxy()
    try:
        proxy.restore()
        with labels_app(base_config, f"redis://127.0.0.1:{proxy.port}/{DB}") as url:
            login(b, url, TOKENS["alice"])
            prompt, page = b.text("#prompt"), shown(b)
            ticket = b.evaluate("document.querySelector('input[name=ticket]').value")
            count = r.hget("rlhf:labels:counts", "alice")
            marks = Marks(r)
            proxy.cut()
            assert b.navigates(lambda: b.click("#vote-B")) == 503
            assert "NOT saved" in b.text("#notice p")
            assert marks.payloads() == [] and marks.votes_() == []
            assert r.hget("rlhf:labels:counts", "alice") == count
            proxy.restore()
            assert b.navigates(lambda: b.click("#retry")) == 200
            assert b.text("#notice p").startswith("Saved: B is better.")
            pair, vote = check_pair_vote(r, marks, page, prompt, "B", reveal(b))
            # The same vote sent again (a reload of the retry page) is not saved twice.
            assert b.navigates(lambda: submit_form(b, "/vote", ticket=ticket, choice="B")) == 200
            assert b.text("#notice p") == "That vote was saved already."
            assert len(marks.payloads()) == 1 and len(marks.votes_()) == 1
    finally:
        proxy.close()


def test_a_double_submit_is_saved_once(base, browser, r):
    """Two POSTs of one vote at once (a double click; sent from here with the browser's
    session, since the page's CSP forbids scripts to fetch): one is saved, one is told so."""
    from concurrent.futures import ThreadPoolExecutor

    b = browser
    login(b, base, TOKENS["alice"])
    ticket, csrf = b.evaluate("[document.querySelector('#vote-form').ticket.value,"
                              " document.querySelector('#vote-form').csrf.value]")
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in b.cookies())
    body = urllib.parse.urlencode({"csrf": csrf, "ticket": ticket, "choice": "A"}).encode()

    def post(_):
        req = urllib.request.Request(base + "/vote", data=body, headers={"Cookie": cookie})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()

    marks = Marks(r)
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(post, range(2)))
    assert [status for status, _ in replies] == [200, 200]
    assert sum("That vote was saved already." in text for _, text in replies) == 1
    assert sum("Saved: A is better." in text for _, text in replies) == 1
    assert len(marks.payloads()) == 1 and len(marks.votes_()) == 1
    assert r.get(f"rlhf:labels:pending:{ticket}") is None


def test_rate_limit(base_config, browser, r):
    b = browser
    with labels_app(replace(base_config, max_votes_per_minute=2)) as url:
        login(b, url, TOKENS["bob"])
        r.delete("rlhf:labels:rate:bob")
        marks = Marks(r)
        for key in ("1", "2"):
            assert b.navigates(lambda: b.press(key)) == 200
        prompt, page = b.text("#prompt"), shown(b)
        assert b.navigates(lambda: b.press("1")) == 429
        assert b.text("#notice p").startswith("Slow down: at most 2 votes a minute.")
        assert (b.text("#prompt"), shown(b)) == (prompt, page)  # the same item, to vote later
        assert len(marks.votes_()) == 2 and len(marks.payloads()) == 2


def test_double_labelling_serves_an_item_to_a_second_annotator(base_config, browser, r):
    b = browser
    config = replace(base_config, double_label=1.0, stream="t:dl:prefs", votes_stream="t:dl:votes")
    try:
        with labels_app(config) as url:
            login(b, url, TOKENS["alice"])
            first = (b.text("#prompt"), sorted(shown(b).values()))
            assert b.navigates(lambda: b.press("1")) == 200
            assert (b.text("#prompt"), sorted(shown(b).values())) != first  # not her own again
            login(b, url, TOKENS["bob"])
            assert (b.text("#prompt"), sorted(shown(b).values())) == first
            assert b.navigates(lambda: b.press("3")) == 200
        votes = new_votes(r, "t:dl:votes", b"0-0")
        assert [(v.annotator, v.outcome) for v in votes] == [("alice", votes[0].outcome), ("bob", "tie")]
        assert votes[0].item_id == votes[1].item_id and votes[0].responses == votes[1].responses
    finally:
        r.delete("rlhf:labels:relabel", *r.keys("rlhf:labels:item:*"))


def test_prompts_from_a_stream(base_config, browser, r):
    """--prompts-stream: prompts are the stream's RolloutPrompts (read, not consumed)."""
    from rlhf_client import QueueProducer

    r.delete("t:prompts")
    producer = QueueProducer(r)
    ids = {producer.push_prompt(text, id=f"rp-{i}", stream="t:prompts"): text
           for i, text in enumerate(["the cat sat on the", "a good dog"])}
    config = replace(base_config, prompts=None, prompts_stream="t:prompts",
                     stream="t:ps:prefs", votes_stream="t:ps:votes")
    with labels_app(config) as url:
        b = browser
        login(b, url, TOKENS["alice"])
        prompt = b.text("#prompt")
        assert prompt in ids.values()
        assert b.navigates(lambda: b.press("1")) == 200
    (vote,) = new_votes(r, "t:ps:votes", b"0-0")
    (pair,) = new_payloads(r, "t:ps:prefs", b"0-0")
    assert ids[vote.prompt_id] == vote.prompt == prompt and pair.metadata["prompt_id"] == vote.prompt_id
    assert r.xlen("t:prompts") == 2 and not r.xinfo_groups("t:prompts")


def test_tokens_in_redis_and_their_removal(base, browser, r):
    """A token added to the Redis hash (as `rlhf labels annotators add` does) logs in; once it
    is removed, that session's next vote is refused and nothing is written."""
    from rlhf.labels.auth import TOKENS_KEY, token_digest

    b = browser
    token = "carol-token-0123456789abcdef"
    r.hset(TOKENS_KEY, token_digest(token), "carol")
    assert login(b, base, token) == 200 and b.text("#annotator") == "carol"
    marks = Marks(r)
    assert b.navigates(lambda: b.press("1")) == 200 and len(marks.votes_()) == 1
    r.hdel(TOKENS_KEY, token_digest(token))
    marks = Marks(r)
    assert b.navigates(lambda: b.press("1")) == 200
    assert b.url == base + "/login"
    assert marks.payloads() == [] and marks.votes_() == []
    assert "rlhf_labels_session" not in {c["name"] for c in b.cookies()}


def test_ranking_mode(base_config, browser, r, policy_target):
    b = browser
    (name,) = model_names(policy_target)
    config = replace(base_config, policy_b=None, responses=3, stream="t:rk:prefs",
                     votes_stream="t:rk:votes")
    with labels_app(config) as url:
        login(b, url, TOKENS["alice"])
        prompt, page = b.text("#prompt"), shown(b)
        assert sorted(page) == ["A", "B", "C"]
        for letter, rank in (("A", 2), ("B", 1), ("C", 2)):
            b.evaluate(f"document.querySelector('select[name=rank_{letter}]').value = '{rank}'")
        assert b.navigates(lambda: b.click("#vote-rank")) == 200
        assert b.text("#notice p") == "Saved: your ranking A=2, B=1, C=2."
        (ranking,) = new_payloads(r, "t:rk:prefs", b"0-0")
        (vote,) = new_votes(r, "t:rk:votes", b"0-0")
        assert isinstance(ranking, samples_pb2.Ranking)
        display_rank = {"A": 2, "B": 1, "C": 2}
        want = [0, 0, 0]
        for pos, i in enumerate(vote.shown):
            want[i] = display_rank["ABC"[pos]]
        assert list(ranking.ranks) == want == list(vote.ranks)
        assert list(ranking.responses) == [x.text for x in vote.responses]
        assert [page[letter] for letter in "ABC"] == [vote.responses[i].text for i in vote.shown]
        assert [f"{m.name}@{m.version}" for m in ranking.response_models] == [name] * 3
        assert (ranking.prompt, ranking.labeller, ranking.id, vote.pair_id) == (
            prompt, "human:alice", vote.id, vote.id)
        assert ranking.metadata["vote"] == json.dumps(want)
        # Equal ranks: recorded, no Ranking.
        for letter in "ABC":
            b.evaluate(f"document.querySelector('select[name=rank_{letter}]').value = '1'")
        assert b.navigates(lambda: b.click("#vote-rank")) == 200
        assert len(new_payloads(r, "t:rk:prefs", b"0-0")) == 1
        assert new_votes(r, "t:rk:votes", b"0-0")[-1].ranks == (1, 1, 1)


def test_leaderboard_page(base_config, browser, r, tmp_path):
    """Votes between three versions (written as the app writes them) → the page shows the
    rows rlhf.labels.leaderboard computes, the plot, agreement and vote counts."""
    import random

    from rlhf.labels import leaderboard as lb
    from rlhf.labels.votes import Response, Vote, item_id, read_votes

    stream = "t:lb:votes"
    strengths = {"policy@v3": 1.2, "policy@v2": 0.4, "policy@v1": 0.0}
    rng = random.Random(0)
    r.delete(stream)
    for n in range(240):
        a, b_ = rng.sample(sorted(strengths), 2)
        p = 1 / (1 + pow(2.718281828, strengths[b_] - strengths[a]))
        u = rng.random()
        outcome = "tie" if u > 0.9 else "a" if u < 0.9 * p else "b"
        responses = (Response(f"answer {n} a", a), Response(f"answer {n} b", b_))
        for annotator in ("alice", "bob") if n % 20 == 0 else ("alice",):
            if annotator == "bob" and n % 60 == 0:  # bob sees some items the other way
                outcome = {"a": "b", "b": "a", "tie": "a"}[outcome]
            r.xadd(stream, Vote(id=f"{n}-{annotator}", item_id=item_id("q", responses),
                                annotator=annotator, mode="pair", prompt="q", responses=responses,
                                outcome=outcome, shown=(0, 1), shown_at=n, voted_at=n + 1).entry())
    votes = read_votes(r, stream)
    rows, agreement = lb.leaderboard(votes), lb.agreement(votes)
    assert agreement.items == 12 and agreement.agreement == 8 / 12
    with labels_app(replace(base_config, votes_stream=stream)) as url:
        b = browser
        login(b, url, TOKENS["alice"])
        assert b.goto(url + "/leaderboard") == 200
        table = b.evaluate("[...document.querySelectorAll('#leaderboard tbody tr')]"
                           ".map(tr => [tr.querySelector('.model').textContent,"
                           " tr.querySelector('.rating').textContent])")
        assert table == [[row.model, f"{row.rating:.1f}"] for row in rows]
        assert [m for m, _ in table] == ["policy@v3", "policy@v2", "policy@v1"]
        b.wait_for("document.querySelector('#plot').complete && "
                   "document.querySelector('#plot').naturalWidth > 0")
        assert b.text("#agreement .items") == "12"
        assert b.text("#agreement .agreement") == "0.667"
        assert b.texts("#agreement-pairs td")[:2] == ["alice – bob", "12"]
        assert b.texts("#annotators td") == ["alice", "240", "bob", "12"]
        keep_screenshot(b, tmp_path, "labels-leaderboard.png")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def _cli(capsys, *args: str) -> tuple[int, str]:
    from rlhf.cli import main

    code = main(["serve", "labels", *args])
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_cli_refuses_bad_flags_in_one_line(capsys, tmp_path):
    assert _cli(capsys, "--policy", "x:1", "--responses", "1") == (
        2, "rlhf serve labels: --responses: at least 2, got 1")
    assert _cli(capsys, "--policy", "x:1", "--double-label", "1.5") == (
        2, "rlhf serve labels: --double-label: a share between 0 and 1, got 1.5")
    tokens = tmp_path / "tokens"
    tokens.write_text("# annotators\nalice:alice-token-0123456789abcdef\nbob short\n")
    assert _cli(capsys, "--policy", "x:1", "--tokens-file", str(tokens)) == (
        2, f"rlhf serve labels: --tokens-file {tokens}:3: expected annotator_id:token")
    code, line = _cli(capsys, "--policy", "x:1", "--redis-url", "redis://127.0.0.1:1/0")
    assert code == 1 and line.startswith("rlhf serve labels: cannot start: Redis is unreachable")
    assert line.endswith("(set --redis-url / RLHF_REDIS_URL)")


def test_cli_serves_until_sigterm(tmp_path, policy_target, r):
    """`rlhf serve labels` as a process: logs its address, answers, SIGTERM → exit 0."""
    import queue
    import re
    import signal
    import subprocess
    import sys
    import time

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{TOKENS['alice']}\n")
    env = {**os.environ, "RLHF_REDIS_URL": REDIS_URL}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "serve", "labels", "--policy", policy_target,
         "--port", "0", "--metrics-port", "0", "--tokens-file", str(tokens), "--prompt", "hi"],
        stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()  # stderr, drained by a thread: reads never block
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr] + [lines.put("")],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        port = None
        while port is None:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line, f"the app exited ({proc.poll()})"
            if m := re.search(r"labels app on http://[\d.]+:(\d+) \(metrics (\d+)\)", line):
                port, metrics = int(m.group(1)), int(m.group(2))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok\n"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as resp:
            assert b'rlhf_http_requests_total{route="/healthz",service="labels",status="200"}' \
                in resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
