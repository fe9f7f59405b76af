"""The labelling app's pure parts: the votes format (what the leaderboard reads), votes →
pairs / rankings in canonical order, sessions and CSRF tokens, the tokens file."""

from __future__ import annotations

import json

import pytest

from rlhf.labels.auth import Signer, load_tokens_file, token_digest
from rlhf.labels.items import Item, Prompt
from rlhf.labels.record import Pending, VoteError, build_vote
from rlhf.labels.votes import Response, Vote, VoteError as FormatError, item_id

A, B, C = Response("yes", "policy@v2"), Response("no", "policy@v1"), Response("maybe", "policy@v1")


def pending(*responses, shown=(1, 0), annotator="alice") -> Pending:
    item = Item(Prompt("Is it?", "p7"), tuple(responses), {"temperature": 1.0, "seed": 3})
    return Pending("ticket", item, annotator, shown, 100.0)


def test_a_vote_survives_json_and_the_item_id_ignores_display_order():
    for shown, choice in (((1, 0), "A"), ((0, 1), "A"), ((1, 0), "B")):
        vote, _ = build_vote(pending(A, B, shown=shown), choice=choice, voted_at=101.5)
        assert Vote.from_json(vote.to_json()) == vote
        assert vote.item_id == item_id("Is it?", (A, B))  # whatever the display order
    assert item_id("Is it?", (A, B)) != item_id("Is it?", (B, A))  # canonical order matters
    d = json.loads(vote.to_json())
    assert d["responses"] == [{"text": "yes", "model": "policy@v2"}, {"text": "no", "model": "policy@v1"}]
    # shown (1, 0) and B picked: the page's B is canonical response 0, so "a" won
    assert (d["mode"], d["outcome"], d["ranks"], d["shown"]) == ("pair", "a", None, [1, 0])


def test_display_choices_map_to_canonical_outcomes_and_pairs():
    # shown (1, 0): the page's A is canonical response 1 (B's text "no").
    vote, pair = build_vote(pending(A, B), choice="A", voted_at=101.0)
    assert vote.outcome == "b" and (pair.chosen, pair.rejected) == ("no", "yes")
    assert (pair.chosen_model.name, pair.chosen_model.version) == ("policy", "v1")
    assert (pair.labeller, pair.builder, pair.source, pair.id) == ("human:alice", "vote", "human", vote.id)
    assert pair.metadata["vote"] == "b" and json.loads(pair.metadata["shown"]) == [1, 0]
    for choice in ("tie", "both_bad"):
        vote, pair = build_vote(pending(A, B), choice=choice, voted_at=101.0)
        assert (vote.outcome, pair, vote.pair_id) == (choice, None, None)
    _, pair = build_vote(pending(A, Response("yes", "policy@v1")), choice="A", voted_at=101.0)
    assert pair is None  # identical texts teach nothing
    with pytest.raises(VoteError):
        build_vote(pending(A, B), choice="C", voted_at=101.0)
    with pytest.raises(VoteError):
        build_vote(pending(A, B), display_ranks=[1, 2], voted_at=101.0)


def test_ranks_map_to_canonical_order():
    vote, ranking = build_vote(pending(A, B, C, shown=(2, 0, 1)), display_ranks=[1, 3, 2],
                               voted_at=101.0)
    # display A = canonical 2 (rank 1), B = canonical 0 (rank 3), C = canonical 1 (rank 2)
    assert vote.ranks == (3, 2, 1) and list(ranking.ranks) == [3, 2, 1]
    assert list(ranking.responses) == ["yes", "no", "maybe"] and vote.outcome is None
    assert Vote.from_json(vote.to_json()) == vote
    _, none = build_vote(pending(A, B, C, shown=(2, 0, 1)), display_ranks=[2, 2, 2], voted_at=101.0)
    assert none is None
    with pytest.raises(VoteError):
        build_vote(pending(A, B, C), display_ranks=[1, 4, 2], voted_at=101.0)


@pytest.mark.parametrize("field,value,problem", [
    ("outcome", "maybe", "outcome:"), ("shown", [0, 0], "shown:"), ("annotator", "", "annotator:"),
    ("voted_at", float("nan"), "voted_at:"), ("mode", "poll", "mode:"), ("ranks", [1, 2], "ranks:"),
])
def test_malformed_votes_are_refused_naming_the_field(field, value, problem):
    vote, _ = build_vote(pending(A, B), choice="A", voted_at=101.0)
    d = {**vote.to_dict(), field: value}
    with pytest.raises(FormatError, match=problem):
        Vote.from_dict(d)
    with pytest.raises(FormatError, match="^responses: missing"):
        Vote.from_dict({k: v for k, v in vote.to_dict().items() if k != "responses"})


def test_sessions_and_csrf_tokens():
    signer, other = Signer(b"k" * 32), Signer(b"o" * 32)
    cookie = signer.session_cookie("alice", token_digest("t" * 20), now=1000.0)
    session = signer.session(cookie, 3600, now=2000.0)
    assert session.annotator == "alice" and session.digest == token_digest("t" * 20)
    assert signer.session(cookie, 3600, now=5000.0) is None  # expired
    assert other.session(cookie, 3600, now=2000.0) is None  # another key
    body, mac = cookie.split(".")
    forged = body.replace(body[5], "A" if body[5] != "A" else "B") + "." + mac
    assert signer.session(forged, 3600, now=2000.0) is None
    assert signer.check_csrf(session.nonce, signer.csrf(session.nonce))
    assert not signer.check_csrf(session.nonce, signer.csrf("another nonce"))
    assert not signer.check_csrf(session.nonce, None) and not signer.check_csrf(None, "x")


def test_tokens_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# people\n\nalice: alice-token-0123456789\nbob:bob-token-0123456789ab\n")
    assert load_tokens_file(path) == {token_digest("alice-token-0123456789"): "alice",
                                      token_digest("bob-token-0123456789ab"): "bob"}
    for text, problem in (("alice\n", "expected annotator_id:token"),
                          ("al ice:alice-token-0123456789\n", "annotator id"),
                          ("alice:short\n", "shorter than 16"),
                          ("a:same-token-0123456789\nb:same-token-0123456789\n", "given to a")):
        path.write_text(text)
        with pytest.raises(ValueError, match=problem):
            load_tokens_file(path)
