"""Preference data: ranking expansion, payload rules, JSONL, the split, and the Bradley–Terry loss."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from rlhf_client.queues import PayloadError, decode_entry, encode_entry, validate_payload
from rlhfpb.v1 import samples_pb2

from rlhf.trainer.data import (
    DataError,
    Pair,
    expand_ranking,
    pairs_from_payload,
    read_jsonl,
    split_by_source,
    synthetic_pairs,
)


def as_tuples(pairs):
    return [(p.chosen, p.rejected) for p in pairs]


def test_the_architecture_example_d_c_ab():
    """D > C > A = B expands to every strictly ordered pair; the tie A = B gives none."""
    pairs = expand_ranking("x", ["A", "B", "C", "D"], [2, 2, 1, 0], source_id="r1")
    assert sorted(as_tuples(pairs)) == sorted(
        [("D", "C"), ("D", "A"), ("D", "B"), ("C", "A"), ("C", "B")]
    )
    assert all(p.prompt == "x" and p.source_id == "r1" for p in pairs)


@pytest.mark.parametrize("ranks", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 0, 3, 2, 1], [0, 0, 0, 0, 1],
                                   [5, 5, 5, 5, 5], [-3, 7, 0, 7, -3]])
def test_expansion_is_every_strictly_ordered_pair(ranks):
    responses = [f"r{i}" for i in range(len(ranks))]
    got = as_tuples(expand_ranking("p", responses, ranks))
    want = [(responses[i], responses[j]) for i, j in itertools.permutations(range(len(ranks)), 2)
            if ranks[i] < ranks[j]]
    assert sorted(got) == sorted(want)
    assert len(got) == len(set(got))  # no pair twice
    ties = sum(1 for i, j in itertools.combinations(range(len(ranks)), 2) if ranks[i] == ranks[j])
    assert len(got) == math.comb(len(ranks), 2) - ties


def test_a_ranking_with_mismatched_lengths_is_an_error():
    with pytest.raises(DataError):
        expand_ranking("p", ["a", "b", "c"], [0, 1])


def test_pairs_from_payloads():
    pair = samples_pb2.PreferencePair(id="p1", prompt="q", chosen="good", rejected="bad")
    assert pairs_from_payload(pair) == [Pair("p1", "q", "good", "bad")]
    ranking = samples_pb2.Ranking(id="r1", prompt="q", responses=["a", "b", "c"], ranks=[1, 0, 1])
    assert as_tuples(pairs_from_payload(ranking)) == [("b", "a"), ("b", "c")]
    with pytest.raises(DataError, match="not preference data"):
        pairs_from_payload(samples_pb2.ScoredSample(id="s1", completion_ids=[1]))


@pytest.mark.parametrize("msg,problem", [
    (samples_pb2.PreferencePair(prompt="q", chosen="a", rejected="b"), "id"),
    (samples_pb2.PreferencePair(id="x", prompt="q", chosen="", rejected="b"), "chosen"),
    (samples_pb2.Ranking(id="x", responses=["a"], ranks=[0]), "at least 2"),
    (samples_pb2.Ranking(id="x", responses=["a", "b"], ranks=[0]), "ranks"),
    (samples_pb2.ScoredSample(id="x"), "completion_ids"),
    (samples_pb2.ScoredSample(id="x", completion_ids=[1, 2], behaviour_logprobs=[0.1]), "behaviour"),
])
def test_payload_rules(msg, problem):
    with pytest.raises(PayloadError, match=problem):
        validate_payload(msg)


def test_entry_encoding_round_trips_and_refuses_garbage():
    pair = samples_pb2.PreferencePair(id="p1", prompt="q", chosen="good", rejected="bad")
    assert decode_entry(encode_entry(pair)) == pair
    fields = encode_entry(pair)
    for broken, why in [
        ({**fields, b"data": b"\xff\xff\xff"}, "does not parse"),
        ({**fields, b"type": b"rlhfpb.v1.Nope"}, "unknown payload type"),
        ({**fields, b"id": b"p2"}, "differs"),
        ({b"type": fields[b"type"]}, "lacks"),
        ({}, "empty"),
    ]:
        with pytest.raises(PayloadError, match=why):
            decode_entry(broken)


def test_read_jsonl_pairs_and_rankings(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "p1", "prompt": "q", "chosen": "good", "rejected": "bad"}),
        "",
        json.dumps({"id": "r1", "prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]}),
        json.dumps({"prompt": "q2", "chosen": "yes", "rejected": "no"}),
    ]))
    pairs = read_jsonl(path)
    assert as_tuples(pairs) == [("good", "bad"), ("a", "b"), ("a", "c"), ("yes", "no")]
    assert [p.source_id for p in pairs] == ["p1", "r1", "r1", "prefs.jsonl:4"]


@pytest.mark.parametrize("line,where", [
    ("{not json", "not JSON"),
    (json.dumps({"id": "p", "chosen": "a"}), "missing field 'rejected'"),
    (json.dumps({"id": "r", "responses": ["a", "b"], "ranks": [0]}), "ranks"),
    (json.dumps([1, 2]), "expected an object"),
])
def test_read_jsonl_names_the_bad_line(tmp_path, line, where):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "ok", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"bad.jsonl:2: .*{where}"):
        read_jsonl(path)


def test_split_is_deterministic_by_payload_and_keeps_rankings_together():
    pairs = synthetic_pairs(50, seed=1) + expand_ranking("q", ["a", "b", "c", "d"], [0, 1, 2, 3],
                                                         source_id="rank")
    train, evals = split_by_source(pairs, 0.2, seed=7)
    assert len(train) + len(evals) == len(pairs)
    assert {p.source_id for p in train}.isdisjoint(p.source_id for p in evals)
    assert len({p.source_id for p in evals}) == round(0.2 * 51)
    again = split_by_source(list(reversed(pairs)), 0.2, seed=7)
    assert {p.source_id for p in again[1]} == {p.source_id for p in evals}  # order-independent
    assert split_by_source(pairs, 0.0)[1] == []
    assert len(split_by_source(pairs[:2], 0.01)[1]) == 1  # a positive fraction holds one out


@pytest.mark.parametrize("fraction,n,held", [
    (0.25, 10, 3),  # 2.5: a half rounds up (round() would give 2)
    (0.45, 10, 5),  # 4.5 (round() would give 4)
    (0.15, 10, 2),  # 1.5 as written (the float product is 1.5000000000000002)
    (0.2, 51, 10), (0.2, 300, 60), (0.1, 45, 5), (0.35, 10, 4),
    (0.01, 2, 1), (0.05, 10, 1),  # at least one
    (0.99, 3, 2), (0.9, 2, 1),  # at most n - 1
    (0.5, 1, 0), (0.0, 10, 0),  # one payload, or no fraction: nothing held out
])
def test_the_held_out_split_rounds_as_documented(fraction, n, held):
    """fraction · n rounded to the nearest whole number, a half up, on the fraction as written;
    then at least one and at most n − 1 (split_by_source's docstring)."""
    pairs = [Pair(f"s{i}", "q", "a", "b") for i in range(n)]
    train, evals = split_by_source(pairs, fraction, seed=3)
    assert len(evals) == held and len(train) == n - held


def test_bradley_terry_loss_matches_a_float64_reference():
    import torch

    from rlhf.trainer.reward_model import bradley_terry_loss

    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(64, generator=g) * 5
    rejected = torch.randn(64, generator=g) * 5
    rejected[:3] = chosen[:3]  # ties count half
    chosen[3], rejected[3] = 60.0, -60.0  # large margins must not overflow
    chosen[4], rejected[4] = -60.0, 60.0
    loss, acc = bradley_terry_loss(chosen, rejected)

    def naive(w: float, l: float) -> float:  # −log σ(w − l) = log(1 + e^{−(w − l)})
        x = w - l
        return math.log1p(math.exp(-x)) if x > -30 else -x + math.log1p(math.exp(x))

    want = sum(naive(float(w), float(l)) for w, l in zip(chosen.double(), rejected.double())) / 64
    want_acc = sum(1.0 if w > l else 0.5 if w == l else 0.0 for w, l in zip(chosen, rejected)) / 64
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(acc) == pytest.approx(want_acc)
    assert torch.isfinite(loss)
