"""Preference data for the trainers: pairs from queue payloads or JSONL, rankings expanded.

A `Ranking` orders responses by rank (lower is better; equal ranks are ties). It expands to
every strictly ordered pair: for ranks D=0 > C=1 > A=B=2 that is (D,C), (D,A), (D,B), (C,A),
(C,B) — the tie A=B gives none. Every pair keeps the id of the payload it came from
(`source_id`): the split and the applied-id bookkeeping work per payload, so all pairs of one
ranking land on the same side of the train/eval split.

JSONL files hold one object per line, either a pair
    {"id": "p1", "prompt": "...", "chosen": "...", "rejected": "..."}
or a ranking
    {"id": "r1", "prompt": "...", "responses": ["...", "..."], "ranks": [0, 1]}
"id" is optional (the line's position in the file is used); "source" is ignored.

The row readers (`Pair`, `read_jsonl`, `jsonl_objects`, `DataError`) live in
`rlhf_client.datafiles`, where submit-time checks use them without torch; they are re-exported here.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from fractions import Fraction

from rlhf_client.datafiles import (  # the readers live with the client (submit-time checks)
    DataError,
    Pair,
    expand_ranking,
    jsonl_objects,
    pairs_from_payload,
    read_jsonl,
)

__all__ = ["DataError", "Pair", "expand_ranking", "pairs_from_payload",
           "check_preference_payload", "jsonl_objects", "read_jsonl", "split_by_source",
           "unique_source_ids", "synthetic_pairs"]


def check_preference_payload(payload) -> None:
    """The `validate` hook of a preference consumer: raises for payloads a preference job can't use."""
    pairs_from_payload(payload)


def split_by_source(
    pairs: Sequence[Pair], eval_fraction: float, *, seed: int = 0
) -> tuple[list[Pair], list[Pair]]:
    """(train, eval): a deterministic split by payload id (a retry gets the same split).

    The payload ids are ordered by a keyed hash and the first k go to eval: k is fraction · n
    (n payloads) rounded to the nearest whole number, a half rounding up (0.25 of 10 → 3, 0.2 of
    51 → 10), computed on the fraction as written (0.15 · 10 is 1.5, not 1.5000000000000002);
    then at least one and at most n − 1 when the fraction is positive and n ≥ 2, none otherwise.
    """
    sources = sorted({p.source_id for p in pairs},
                     key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    k = 0
    if eval_fraction > 0 and len(sources) >= 2:
        exact = Fraction(repr(float(eval_fraction))) * len(sources)  # the decimal as written
        k = min(len(sources) - 1, max(1, math.floor(exact + Fraction(1, 2))))
    held_out = set(sources[:k])
    train = [p for p in pairs if p.source_id not in held_out]
    evals = [p for p in pairs if p.source_id in held_out]
    return train, evals


def unique_source_ids(pairs: Iterable[Pair]) -> list[str]:
    return sorted({p.source_id for p in pairs})


# ---------------------------------------------------------------------------------------------
# A synthetic preference task (tests, benchmarks, demos)
# ---------------------------------------------------------------------------------------------

_POSITIVE = ("good", "great", "excellent", "wonderful", "lovely", "nice", "best", "happy")
_NEGATIVE = ("bad", "terrible", "awful", "worst", "wrong", "sad", "dirty", "lazy")
_NOUNS = ("cat", "dog", "book", "song", "cake", "park", "game", "story", "house", "train",
          "apple", "banana", "teacher", "garden", "river", "letter")
_FILLER = ("the", "a", "my", "your", "red", "blue", "green", "big", "small", "old", "new",
           "on", "in", "with", "today", "really", "very", "yes", "please", "thanks")


def synthetic_pairs(n: int, *, seed: int = 0, prefix: str = "syn") -> list[Pair]:
    """`n` pairs where the chosen response praises and the rejected one criticises.

    Both responses share the prompt's noun and random filler words in random places, so the
    only signal is the sentiment word (one of eight each way, in the vocabulary of the tiny
    models' tokenizer). A random-init reward model scores about 0.5 on it.
    """
    r = random.Random(seed)

    def response(noun: str, word: str) -> str:
        words = [r.choice(_FILLER) for _ in range(r.randint(2, 6))]
        words.insert(r.randint(0, len(words)), f"the {noun} was {word}")
        return " ".join(words) + "."

    pairs = []
    for i in range(n):
        noun = r.choice(_NOUNS)
        prompt = f"what do you think of the {noun}?"
        pairs.append(Pair(f"{prefix}-{i}", prompt, response(noun, r.choice(_POSITIVE)),
                          response(noun, r.choice(_NEGATIVE))))
    return pairs
