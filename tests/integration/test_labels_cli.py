"""`rlhf labels` on a real Redis (db 7): the leaderboard and agreement read back from the votes
stream, annotator tokens, and failures as one line with a non-zero exit."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import TEST_REDIS

from rlhf.cli import main as rlhf_main
from rlhf.labels.cli import TOKENS_KEY
from rlhf.labels.leaderboard import battles_from_votes, bootstrap, bradley_terry, elo
from rlhf.labels.votes import VOTES_STREAM, Response, Vote

REDIS_URL = f"{TEST_REDIS}/7"


@pytest.fixture
def r():
    from rlhf_client.redis_conn import connect

    client = connect(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def push(r, votes, stream=VOTES_STREAM) -> None:
    for v in votes:
        r.xadd(stream, v.entry())


def vote(annotator, models, *, outcome=None, ranks=None, item="item", at=1.0) -> Vote:
    responses = tuple(Response(f"answer {k}", m) for k, m in enumerate(models))
    return Vote(id=f"{annotator}-{item}-{at}", item_id=item, annotator=annotator,
                mode="pair" if ranks is None else "ranking", prompt="Say hi", responses=responses,
                shown=tuple(reversed(range(len(models)))), shown_at=at - 1, voted_at=at,
                outcome=outcome, ranks=ranks)


def run(capsys, *argv):
    code = rlhf_main(["labels", *argv, "--redis-url", REDIS_URL])
    out, err = capsys.readouterr()
    return code, out, err


def arena_votes() -> list[Vote]:
    outcomes = ["a"] * 6 + ["b"] * 2 + ["tie", "both_bad"]
    votes = [vote("ann", ["pol@v2", "pol@v1"], outcome=o, item=f"i{k}", at=10 + k)
             for k, o in enumerate(outcomes)]
    votes += [vote("bob", ["pol@v1", "pol@v3", "pol@v2"], ranks=(3, 2, 1), item="r", at=30),
              vote("bob", ["pol@v3", "pol@v1"], outcome="a", item="s", at=31),
              vote("bob", ["pol@v1", "pol@v1"], outcome="a", item="same", at=32)]  # no battle
    return votes


def test_leaderboard_from_the_votes_stream(r, capsys, tmp_path):
    votes = arena_votes()
    push(r, votes)
    battles = battles_from_votes(votes)
    code, out, err = run(capsys, "leaderboard", "--json", "--bootstrap", "200", "--seed", "5",
                         "--plot", str(tmp_path / "board.png"))
    assert code == 0, err
    got = json.loads(out)
    assert (got["votes"], got["battles"], got["bootstrap"]) == (len(votes), len(battles), 200)
    want, ci, want_elo = bradley_terry(battles), bootstrap(battles, 200, 5), elo(battles)
    assert [row["model"] for row in got["rows"]] == list(want)
    for row in got["rows"]:
        m = row["model"]
        assert row["rating"] == pytest.approx(want[m])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(ci[m]))
        assert row["elo"] == pytest.approx(want_elo[m])
    v2 = next(row for row in got["rows"] if row["model"] == "pol@v2")
    # 6 wins, 2 losses, 2 ties (both-bad is a tie) against v1; ranked first of three: 2 wins.
    assert (v2["wins"], v2["losses"], v2["ties"], v2["battles"]) == (8, 2, 2, 12)
    assert "plot written to" in err
    assert (tmp_path / "board.png").read_bytes()[:4] == b"\x89PNG"

    code, out, _ = run(capsys, "leaderboard", "--bootstrap", "0", "--anchor", "pol@v1=1114")
    assert code == 0
    assert f"{len(votes)} votes, {len(battles)} battles between 3 models" in out
    line = next(ln for ln in out.splitlines() if "pol@v1" in ln)
    assert "1114.0" in line

    # Another stream: empty here.
    code, out, _ = run(capsys, "leaderboard", "--stream", "other:votes", "--json")
    assert code == 0 and json.loads(out)["rows"] == []


def test_agreement_from_the_votes_stream(r, capsys):
    # Four items labelled by ann then bob: (a, a), (a, b), (b, b), (tie, tie):
    # p_o = 3/4; first a 2, b 1, tie 1; second a 1, b 2, tie 1 → p_e = (2 + 2 + 1)/16,
    # κ = (12/16 − 5/16) / (11/16) = 7/11.
    pairs = [("a", "a"), ("a", "b"), ("b", "b"), ("tie", "tie")]
    votes = []
    for k, (first, second) in enumerate(pairs):
        votes += [vote("ann", ["m@1", "m@2"], outcome=first, item=f"i{k}", at=k),
                  vote("bob", ["m@1", "m@2"], outcome=second, item=f"i{k}", at=10 + k)]
    votes.append(vote("cat", ["m@1", "m@2"], outcome="a", item="alone", at=50))
    push(r, votes, stream="custom:votes")
    code, out, err = run(capsys, "agreement", "--stream", "custom:votes", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert (got["votes"], got["items"], got["label_pairs"]) == (9, 4, 4)
    assert got["agreement"] == pytest.approx(0.75) and got["kappa"] == pytest.approx(7 / 11)
    assert got["by_annotators"] == [{"annotators": ["ann", "bob"], "items": 4,
                                     "agreement": 0.75, "kappa": pytest.approx(7 / 11)}]
    code, out, _ = run(capsys, "agreement", "--stream", "custom:votes")
    assert code == 0 and "Cohen's kappa 0.636" in out and "ann / bob" in out


def test_annotator_tokens(r, capsys):
    code, out, err = run(capsys, "annotators", "add", "alice")
    assert code == 0, err
    token = out.strip()
    assert len(out.splitlines()) == 1 and len(token) >= 40 and ":" not in token
    fields = r.hgetall(TOKENS_KEY)
    assert fields == {hashlib.sha256(token.encode()).hexdigest().encode(): b"alice"}
    assert all(token.encode() not in field + name for field, name in fields.items())

    code, _, err = run(capsys, "annotators", "add", "alice")
    assert code == 1 and "already has 1 token" in err and len(err.splitlines()) == 1
    code, out, _ = run(capsys, "annotators", "add", "alice", "--replace", "--json")
    new = json.loads(out)
    assert code == 0 and new["revoked"] == 1 and new["token"] != token
    assert r.hgetall(TOKENS_KEY) == {hashlib.sha256(new["token"].encode()).hexdigest().encode():
                                     b"alice"}
    assert run(capsys, "annotators", "add", "bob")[0] == 0

    push(r, [vote("alice", ["m@1", "m@2"], outcome="a", at=k) for k in range(3)]
         + [vote("carol", ["m@1", "m@2"], outcome="b")])  # carol logs in from a tokens file
    code, out, _ = run(capsys, "annotators", "list", "--json")
    assert code == 0 and json.loads(out) == [
        {"annotator": "alice", "tokens": 1, "votes": 3},
        {"annotator": "bob", "tokens": 1, "votes": 0},
        {"annotator": "carol", "tokens": 0, "votes": 1}]

    code, out, _ = run(capsys, "annotators", "remove", "alice")
    assert code == 0 and "revoked 1 token(s)" in out
    assert list(r.hgetall(TOKENS_KEY).values()) == [b"bob"]
    code, _, err = run(capsys, "annotators", "remove", "alice")
    assert code == 1 and "no token" in err and len(err.splitlines()) == 1


def test_failures_are_one_line(r, capsys):
    code = rlhf_main(["labels", "leaderboard", "--redis-url", "redis://127.0.0.1:1/7"])
    _, err = capsys.readouterr()
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "Redis is unreachable" in err and "--redis-url" in err
    code = rlhf_main(["labels", "annotators", "list", "--redis-url", "redis://127.0.0.1:1/7"])
    assert code == 1 and len(capsys.readouterr().err.strip().splitlines()) == 1

    for argv, flag in [(["leaderboard", "--bootstrap", "-1"], "--bootstrap"),
                       (["leaderboard", "--anchor", "1000"], "--anchor"),
                       (["annotators", "add", "has:colon"], "NAME")]:
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, argv
        assert flag in err
    push(r, arena_votes())
    code, _, err = run(capsys, "leaderboard", "--anchor", "nobody@v9=1000")
    assert code == 1 and "nobody@v9" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as exc:
        rlhf_main(["labels", "leaderboard", "--no-such-flag"])
    assert exc.value.code == 2
