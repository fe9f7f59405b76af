"""The votes stream: one entry per annotator vote, the record the leaderboard is fitted from.

The labelling app (`rlhf serve labels`) appends every vote to `VOTES_STREAM` in the same
MULTI/EXEC as the `PreferencePair` / `Ranking` it makes (a tie, both-bad or a vote between
equal ranks makes none, and is still recorded here). The leaderboard and the agreement
measures (`rlhf.labels.leaderboard`, `rlhf labels …`) read it back with `read_votes`.

Entry: one field `vote`, a JSON object:

    id          uuid4 hex of the vote
    item_id     sha256 hex of the item (prompt + responses in canonical order, see `item_id`):
                the same item shown to two annotators has the same id
    annotator   the annotator's id (the labeller string is "human:<annotator>")
    mode        "pair" or "ranking"
    prompt      the prompt text; prompt_id: its id in the prompts source ("" when typed)
    responses   [{"text", "model": "name@version"}], canonical order (not display order)
    outcome     pair mode: "a" | "b" | "tie" | "both_bad" (a, b = responses[0], [1]); null in
                ranking mode
    ranks       ranking mode: one rank per response, lower is better, equal = tie; null in pair
                mode
    shown       display order as canonical indices ([1, 0]: responses[1] was shown first)
    sampling    the sampling parameters the responses were generated with
    shown_at, voted_at   Unix seconds
    pair_id     id of the PreferencePair / Ranking pushed to the preferences stream, or null
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import redis

log = logging.getLogger(__name__)

VOTES_STREAM = "rlhf:labels:votes"
VOTE_FIELD = b"vote"
OUTCOMES = ("a", "b", "tie", "both_bad")
MODES = ("pair", "ranking")

Outcome = Literal["a", "b", "tie", "both_bad"]
Mode = Literal["pair", "ranking"]


class VoteError(ValueError):
    """A vote record that is malformed (the message names the field)."""


@dataclass(frozen=True)
class Response:
    """One response an annotator saw: its text and the model version that wrote it."""

    text: str
    model: str  # "name@version" ("" when unknown)


def item_id(prompt: str, responses: list[Response] | tuple[Response, ...]) -> str:
    """sha256 hex of the prompt and the responses (text and model) in canonical order."""
    canon = json.dumps([prompt, [[r.text, r.model] for r in responses]],
                       ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Vote:
    """One annotator's vote on one item (see the module docstring for each field)."""

    id: str
    item_id: str
    annotator: str
    mode: Mode
    prompt: str
    responses: tuple[Response, ...]
    shown: tuple[int, ...]
    shown_at: float
    voted_at: float
    prompt_id: str = ""
    outcome: Outcome | None = None
    ranks: tuple[int, ...] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    pair_id: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise `VoteError` naming the field unless the vote keeps the format's rules."""
        for name in ("id", "item_id", "annotator", "prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise VoteError(f"{name}: must be a non-empty string")
        if self.mode not in MODES:
            raise VoteError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")
        n = len(self.responses)
        if n < 2 or not all(isinstance(r, Response) for r in self.responses):
            raise VoteError(f"responses: needs at least 2 responses, got {n}")
        if sorted(self.shown) != list(range(n)):
            raise VoteError(f"shown: must be a permutation of 0..{n - 1}, got {list(self.shown)}")
        if self.mode == "pair":
            if n != 2:
                raise VoteError(f"responses: pair mode has exactly 2 responses, got {n}")
            if self.outcome not in OUTCOMES:
                raise VoteError(f"outcome: must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
            if self.ranks is not None:
                raise VoteError("ranks: must be null in pair mode")
        else:
            if self.outcome is not None:
                raise VoteError("outcome: must be null in ranking mode")
            if self.ranks is None or len(self.ranks) != n:
                raise VoteError(f"ranks: needs one rank per response ({n})")
            if any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.ranks):
                raise VoteError(f"ranks: must be positive integers, got {list(self.ranks)}")
        for name in ("shown_at", "voted_at"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise VoteError(f"{name}: must be a finite number of seconds")
        if not isinstance(self.sampling, dict):
            raise VoteError("sampling: must be an object")

    # ------------------------------------------------------------------ derived
    @property
    def models(self) -> tuple[str, ...]:
        """The model ("name@version") of each response, canonical order."""
        return tuple(r.model for r in self.responses)

    @property
    def labeller(self) -> str:
        return f"human:{self.annotator}"

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["responses"] = [{"text": r.text, "model": r.model} for r in self.responses]
        d["shown"] = list(self.shown)
        d["ranks"] = None if self.ranks is None else list(self.ranks)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: Any) -> "Vote":
        if not isinstance(d, dict):
            raise VoteError("vote: must be a JSON object")
        try:
            responses = tuple(Response(text=r["text"], model=r.get("model") or "")
                              for r in d["responses"])
            ranks = d.get("ranks")
            return cls(
                id=d["id"], item_id=d["item_id"], annotator=d["annotator"], mode=d["mode"],
                prompt=d["prompt"], prompt_id=d.get("prompt_id") or "", responses=responses,
                outcome=d.get("outcome"), ranks=None if ranks is None else tuple(ranks),
                shown=tuple(d["shown"]), sampling=d.get("sampling") or {},
                shown_at=d["shown_at"], voted_at=d["voted_at"], pair_id=d.get("pair_id"),
            )
        except KeyError as exc:
            raise VoteError(f"{exc.args[0]}: missing") from None
        except (TypeError, AttributeError) as exc:
            raise VoteError(f"vote: malformed ({exc})") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "Vote":
        try:
            d = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise VoteError(f"vote: not JSON ({exc})") from None
        return cls.from_dict(d)

    def entry(self) -> dict[bytes, bytes]:
        """The stream entry fields for this vote (`XADD VOTES_STREAM * vote <json>`)."""
        return {VOTE_FIELD: self.to_json().encode("utf-8", "surrogatepass")}


def read_votes(r: redis.Redis, stream: str = VOTES_STREAM, *, chunk: int = 1000) -> list[Vote]:
    """Every vote in `stream`, oldest first. Malformed entries are skipped with a warning."""
    votes: list[Vote] = []
    start: bytes | str = "-"
    while True:
        entries = r.xrange(stream, min=start, count=chunk)
        for entry_id, fields in entries:
            raw = fields.get(VOTE_FIELD, fields.get("vote"))
            try:
                if raw is None:
                    raise VoteError("entry lacks the field 'vote'")
                votes.append(Vote.from_json(raw))
            except VoteError as exc:
                log.warning("votes stream %s: skipping entry %r: %s", stream, entry_id, exc)
        if len(entries) < chunk:
            return votes
        last = entries[-1][0]
        last = last.decode() if isinstance(last, bytes) else last
        start = "(" + last
