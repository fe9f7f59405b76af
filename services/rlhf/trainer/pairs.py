"""Pair builders: n scored responses to one prompt → preference pairs with their provenance.

    best_vs_random   the best-scored response is chosen, a uniformly random other one rejected
                     (Zephyr / UltraFeedback binarised)
    best_vs_worst    the best is chosen, the worst rejected (the iterative-DPO recipes)

The best is the first response with the highest score (the worst: the first with the lowest).
A pair whose two scores are equal (a tie) or differ by less than `min_margin` is skipped; so is a
group of one, and a response with empty text never takes part (a pair needs two texts). Scores
that are not finite are left out too.

Every pair carries where it came from: the policy version that wrote both responses
(`chosen_model` / `rejected_model`), both scores, the builder, the labeller and `metadata` (the
caller's: loop id, round, sampling parameters ...; plus the prompt id and both responses'
indices in the group). Its id is a digest of (prompt id, policy version, builder,
the two indices): the same group labelled again — a redone round — makes the same ids, so the
trainer (which applies each id once) never trains on a pair twice.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping, Sequence

from rlhfpb.v1 import common_pb2, samples_pb2

#: (scores of the usable responses, rng) → (chosen index, rejected index) pairs, indices into
#: the usable responses. Ties and margins are the caller's (`build_pairs`) to filter.
Builder = Callable[[Sequence[float], random.Random], list[tuple[int, int]]]


def _best(scores: Sequence[float]) -> int:
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def _worst(scores: Sequence[float]) -> int:
    return min(range(len(scores)), key=lambda i: (scores[i], i))


def best_vs_random(scores: Sequence[float], rng: random.Random) -> list[tuple[int, int]]:
    """The best against one other response drawn uniformly (Zephyr)."""
    if len(scores) < 2:
        return []
    best = _best(scores)
    others = [i for i in range(len(scores)) if i != best]
    return [(best, rng.choice(others))]


def best_vs_worst(scores: Sequence[float], rng: random.Random) -> list[tuple[int, int]]:
    """The best against the worst (iterative DPO)."""
    if len(scores) < 2:
        return []
    best, worst = _best(scores), _worst(scores)
    return [] if best == worst else [(best, worst)]


BUILDERS: dict[str, Builder] = {"best_vs_random": best_vs_random, "best_vs_worst": best_vs_worst}


def pair_id(prompt_id: str, version: str, builder: str, chosen: int, rejected: int) -> str:
    """The id of the pair (chosen ≻ rejected, indices into the group as sampled) built from
    `prompt_id`'s group made by `version`: the same for the same group every time."""
    key = "\x00".join((prompt_id, version, builder, str(chosen), str(rejected)))
    return "pair-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def group_rng(seed: int, prompt_id: str, version: str) -> random.Random:
    """A generator for one group's random draws, fixed by (seed, prompt id, version): a redone
    round draws the same "random other"."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{version}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def build_pairs(
    prompt: str,
    prompt_id: str,
    responses: Sequence[str],
    scores: Sequence[float],
    *,
    builder: str,
    min_margin: float = 0.0,
    rng: random.Random | None = None,
    labeller: str = "",
    policy: common_pb2.ModelRef | None = None,
    metadata: Mapping[str, str] | None = None,
    source: str = "rlaif",
) -> list[samples_pb2.PreferencePair]:
    """The preference pairs `builder` makes of one prompt's scored responses (0 or 1 with the
    builders here). `rng` defaults to `group_rng(0, prompt_id, policy version)`; `policy`
    (`ModelRef`, or anything with name / version) is the version that wrote the responses."""
    if builder not in BUILDERS:
        raise ValueError(f"builder: must be one of {sorted(BUILDERS)}, got {builder!r}")
    if len(responses) != len(scores):
        raise ValueError(f"{len(scores)} scores for {len(responses)} responses")
    if min_margin < 0:
        raise ValueError(f"min_margin: must be ≥ 0, got {min_margin}")
    ref = None
    if policy is not None:
        ref = common_pb2.ModelRef(name=policy.name, version=policy.version)
    version = ref.version if ref is not None else ""
    usable = [i for i, (text, s) in enumerate(zip(responses, scores))
              if text and math.isfinite(float(s))]
    values = [float(scores[i]) for i in usable]
    rng = rng if rng is not None else group_rng(0, prompt_id, version)
    out: list[samples_pb2.PreferencePair] = []
    for c, r in BUILDERS[builder](values, rng):
        margin = values[c] - values[r]
        if margin <= 0 or margin < min_margin:  # a tie (or worse), or too close to call
            continue
        ic, ir = usable[c], usable[r]
        pair = samples_pb2.PreferencePair(
            id=pair_id(prompt_id, version, builder, ic, ir), prompt=prompt,
            chosen=responses[ic], rejected=responses[ir], source=source,
            chosen_score=values[c], rejected_score=values[r], builder=builder, labeller=labeller,
            metadata={**(metadata or {}), "prompt_id": prompt_id, "chosen_index": str(ic),
                      "rejected_index": str(ir)})
        if ref is not None:
            pair.chosen_model.CopyFrom(ref)
            pair.rejected_model.CopyFrom(ref)
        out.append(pair)
    return out


__all__ = ["BUILDERS", "Builder", "best_vs_random", "best_vs_worst", "build_pairs", "group_rng",
           "pair_id"]
