"""Pair builders against hand-worked groups: which responses pair up, ties, margins, groups of
one, empty responses, provenance and deterministic ids."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from rlhf_client.queues import encode_entry
from rlhf_client.types import ModelRef

from rlhf.trainer.pairs import (
    BUILDERS,
    best_vs_random,
    best_vs_worst,
    build_pairs,
    group_rng,
    pair_id,
)

POLICY = ModelRef("pol", "v0003")
RESP = ["r0", "r1", "r2", "r3"]


def pairs(scores, builder="best_vs_worst", responses=RESP, **kw):
    kw.setdefault("policy", POLICY)
    return build_pairs("the prompt", "p7", responses[: len(scores)], scores, builder=builder, **kw)


def test_best_vs_worst_picks_the_highest_and_the_lowest():
    (p,) = pairs([0.1, 0.9, -0.4, 0.3])
    assert (p.chosen, p.rejected) == ("r1", "r2")
    assert (p.chosen_score, p.rejected_score) == pytest.approx((0.9, -0.4))
    # the first of equal bests / worsts: [1, 1, 0, 0] → r0 ≻ r2
    (p,) = pairs([1.0, 1.0, 0.0, 0.0])
    assert (p.chosen, p.rejected) == ("r0", "r2")


def test_best_vs_random_rejects_each_other_response_uniformly():
    counts = Counter()
    rng = random.Random(0)
    for _ in range(3000):
        (p,) = pairs([0.2, 0.5, 0.1, -1.0], builder="best_vs_random", rng=rng)
        assert p.chosen == "r1"
        counts[p.rejected] += 1
    assert set(counts) == {"r0", "r2", "r3"}
    assert all(abs(c / 3000 - 1 / 3) < 0.04 for c in counts.values()), counts


def test_ties_and_small_margins_make_no_pair():
    assert pairs([0.5, 0.5, 0.5]) == []  # every score equal: best == worst
    # best_vs_random drawing an equal other: a tie, skipped (best r0; the other is r1 or r2)
    drawn = {tuple(x.rejected for x in pairs([0.5, 0.5, 0.2], builder="best_vs_random",
                                             rng=random.Random(s))) for s in range(40)}
    assert drawn == {(), ("r2",)}
    assert pairs([0.3, 0.1], min_margin=0.25) == []  # margin 0.2 < 0.25
    (p,) = pairs([0.3, 0.05], min_margin=0.25)  # margin 0.25: kept
    assert p.chosen == "r0"
    with pytest.raises(ValueError, match="min_margin"):
        pairs([0.3, 0.1], min_margin=-1)


def test_a_group_of_one_or_of_unusable_responses_makes_no_pair():
    for builder in BUILDERS:
        assert pairs([0.7], builder=builder) == []
        assert pairs([], builder=builder) == []
        # an empty response never takes part; a NaN score neither
        assert pairs([0.9, 0.1], builder=builder, responses=["", "r1"]) == []
        assert pairs([float("nan"), 0.1], builder=builder) == []
    (p,) = pairs([0.9, 0.1, -2.0], responses=["", "r1", "r2"])
    assert (p.chosen, p.rejected) == ("r1", "r2")
    assert p.metadata["chosen_index"] == "1" and p.metadata["rejected_index"] == "2"


def test_the_builders_as_plain_functions():
    assert best_vs_worst([3.0, 1.0, 2.0], random.Random(0)) == [(0, 1)]
    assert best_vs_worst([1.0], random.Random(0)) == []
    assert best_vs_random([1.0], random.Random(0)) == []
    assert best_vs_random([0.0, 2.0], random.Random(0)) == [(1, 0)]


def test_pairs_carry_their_provenance_and_are_valid_payloads():
    (p,) = pairs([0.1, 0.9, -0.4], builder="best_vs_worst", labeller="reward:rm@v0002",
                 metadata={"loop": "L", "round": "2"}, source="loop:L")
    assert (p.chosen_model.name, p.chosen_model.version) == ("pol", "v0003")
    assert (p.rejected_model.name, p.rejected_model.version) == ("pol", "v0003")
    assert p.builder == "best_vs_worst" and p.labeller == "reward:rm@v0002"
    assert p.source == "loop:L" and p.prompt == "the prompt"
    assert dict(p.metadata) == {"loop": "L", "round": "2", "prompt_id": "p7",
                                "chosen_index": "1", "rejected_index": "2"}
    assert p.HasField("chosen_score") and p.HasField("rejected_score")
    encode_entry(p)  # the queue's payload rules hold


def test_ids_are_deterministic_per_group_version_builder_and_indices():
    a = pairs([0.1, 0.9, -0.4])[0]
    b = pairs([0.1, 0.9, -0.4])[0]
    assert a.id == b.id == pair_id("p7", "v0003", "best_vs_worst", 1, 2)
    assert pairs([0.1, 0.9, -0.4], policy=ModelRef("pol", "v0004"))[0].id != a.id
    assert pair_id("p7", "v0003", "best_vs_random", 1, 2) != a.id
    assert pair_id("p8", "v0003", "best_vs_worst", 1, 2) != a.id
    # the default generator is fixed by (prompt id, version): a redo draws the same other
    redo = {pairs([0.2, 0.5, 0.1, -1.0], builder="best_vs_random")[0].id for _ in range(5)}
    assert len(redo) == 1
    assert group_rng(1, "p", "v").random() == group_rng(1, "p", "v").random()
    assert group_rng(1, "p", "v").random() != group_rng(2, "p", "v").random()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="builder"):
        pairs([0.1, 0.2], builder="best_of_all")
    with pytest.raises(ValueError, match="2 scores for 3 responses"):
        build_pairs("x", "p", ["a", "b", "c"], [0.1, 0.2], builder="best_vs_worst")
