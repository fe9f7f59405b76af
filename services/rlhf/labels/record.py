"""Turning a vote into stream entries, atomically, once.

What the app keeps in Redis (besides the two streams):

    rlhf:labels:pending:<ticket>   what one page showed to whom (item, display order, time);
                                   the page's form names only the ticket, so nothing in the
                                   page tells which model wrote which response
    rlhf:labels:done:<ticket>      the vote id a ticket was recorded as (a re-sent form is
                                   answered "already saved", never recorded twice)
    rlhf:labels:counts             hash annotator → votes recorded
    rlhf:labels:rate:<a>           sorted set of annotator a's votes in the last 60 s (rate limit)
    rlhf:labels:relabel            sorted set of item ids waiting for a second annotator, scored
                                   by when they can next be handed out (a lease while shown)
    rlhf:labels:item:<item id>     such an item, with who labelled it first

A vote is recorded in ONE MULTI/EXEC under WATCH of its pending ticket: the PreferencePair or
Ranking (when the vote makes one), the vote record, the count, the rate window, the ticket's
removal and its done marker, and the double-labelling bookkeeping. A connection lost before
EXEC leaves nothing; a retry of a ticket whose EXEC went through finds the done marker.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass
from typing import Literal

import redis
from google.protobuf.message import Message
from rlhf_client.queues import PREFERENCES_STREAM, encode_entry
from rlhfpb.v1 import samples_pb2

from rlhf.labels.items import Item, model_ref
from rlhf.labels.votes import VOTES_STREAM, Vote

PENDING_PREFIX = "rlhf:labels:pending:"
DONE_PREFIX = "rlhf:labels:done:"
COUNTS_KEY = "rlhf:labels:counts"
RATE_PREFIX = "rlhf:labels:rate:"
RELABEL_KEY = "rlhf:labels:relabel"
ITEM_PREFIX = "rlhf:labels:item:"

PENDING_TTL_S = 24 * 3600
RELABEL_TTL_S = 7 * 24 * 3600
RELABEL_LEASE_S = 3600
SOURCE = "human"
BUILDER = "vote"

Choice = Literal["A", "B", "tie", "both_bad"]
PAIR_OUTCOMES = {"tie": "tie", "both_bad": "both_bad"}

# Hand out the oldest available relabel item that `annotator` did not label first, leasing it.
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 50)
for _, id in ipairs(ids) do
  local raw = redis.call('GET', ARGV[4] .. id)
  if not raw then
    redis.call('ZREM', KEYS[1], id)
  elseif cjson.decode(raw)['first'] ~= ARGV[3] then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    return raw
  end
end
return false
"""


@dataclass(frozen=True)
class Pending:
    """One shown page: the item, to whom, in which display order, when."""

    ticket: str
    item: Item
    annotator: str
    shown: tuple[int, ...]
    shown_at: float
    relabel: bool = False  # a second annotator's copy of an item

    def to_json(self) -> str:
        return json.dumps({"item": self.item.to_dict(), "annotator": self.annotator,
                           "shown": list(self.shown), "shown_at": self.shown_at,
                           "relabel": self.relabel}, ensure_ascii=False)

    @classmethod
    def from_json(cls, ticket: str, raw: bytes | str) -> "Pending":
        d = json.loads(raw)
        return cls(ticket, Item.from_dict(d["item"]), d["annotator"], tuple(d["shown"]),
                   float(d["shown_at"]), bool(d.get("relabel")))


@dataclass(frozen=True)
class Result:
    """What became of a vote: saved (vote, payload), already (saved before: vote_id),
    expired (no such ticket), not_yours, rate_limited (pending kept to show again)."""

    status: Literal["saved", "already", "expired", "not_yours", "rate_limited"]
    vote: Vote | None = None
    payload: Message | None = None
    pending: Pending | None = None
    vote_id: str | None = None


class VoteError(ValueError):
    """A vote the form should not have sent (unknown choice, bad ranks)."""


# ------------------------------------------------------------------------------------------------
# Pure: the vote record and the payload
# ------------------------------------------------------------------------------------------------


def canonical_ranks(pending: Pending, display_ranks: list[int]) -> tuple[int, ...]:
    """Ranks per canonical response from ranks per display position (1 … k, ties allowed)."""
    k = len(pending.shown)
    if len(display_ranks) != k or any(not 1 <= x <= k for x in display_ranks):
        raise VoteError(f"ranks: give each of the {k} responses a rank from 1 to {k}")
    ranks = [0] * k
    for position, index in enumerate(pending.shown):
        ranks[index] = display_ranks[position]
    return tuple(ranks)


def build_vote(pending: Pending, *, choice: Choice | None = None,
               display_ranks: list[int] | None = None, voted_at: float,
               vote_id: str | None = None) -> tuple[Vote, Message | None]:
    """The vote record and the PreferencePair / Ranking it makes (None: ties, both bad, equal
    ranks, identical or empty responses make none)."""
    item = pending.item
    vote_id = vote_id or uuid.uuid4().hex
    texts = [r.text for r in item.responses]
    outcome, ranks, payload = None, None, None
    metadata = {
        "vote_id": vote_id, "item_id": item.id, "prompt_id": item.prompt.id,
        "sampling": json.dumps(item.sampling, sort_keys=True), "shown": json.dumps(list(pending.shown)),
        "shown_at": f"{pending.shown_at:.6f}", "voted_at": f"{voted_at:.6f}",
    }
    common = dict(id=vote_id, prompt=item.prompt.text, source=SOURCE,
                  labeller=f"human:{pending.annotator}")
    if display_ranks is None:
        if len(item.responses) != 2:
            raise VoteError("this item is ranked, not compared")
        if choice in ("A", "B"):
            index = pending.shown[0 if choice == "A" else 1]
            outcome = "a" if index == 0 else "b"
        elif choice in PAIR_OUTCOMES:
            outcome = PAIR_OUTCOMES[choice]
        else:
            raise VoteError(f"choice: unknown vote {choice!r}")
        metadata["vote"] = outcome
        if outcome in ("a", "b") and all(texts) and texts[0] != texts[1]:
            w, l = (0, 1) if outcome == "a" else (1, 0)
            payload = samples_pb2.PreferencePair(
                chosen=texts[w], rejected=texts[l],
                chosen_model=model_ref(item.responses[w].model),
                rejected_model=model_ref(item.responses[l].model),
                builder=BUILDER, metadata=metadata, **common)
    else:
        if len(item.responses) == 2:
            raise VoteError("this item is compared (A or B), not ranked")
        ranks = canonical_ranks(pending, display_ranks)
        metadata["vote"] = json.dumps(list(ranks))
        if len(set(ranks)) > 1 and all(texts):
            payload = samples_pb2.Ranking(
                responses=texts, ranks=list(ranks),
                response_models=[model_ref(r.model) for r in item.responses],
                metadata=metadata, **common)
    if payload is not None:
        payload.created.FromNanoseconds(int(voted_at * 1e9))
    vote = Vote(
        id=vote_id, item_id=item.id, annotator=pending.annotator,
        mode="pair" if ranks is None else "ranking", prompt=item.prompt.text,
        prompt_id=item.prompt.id, responses=item.responses, outcome=outcome, ranks=ranks,
        shown=pending.shown, sampling=item.sampling, shown_at=pending.shown_at,
        voted_at=voted_at, pair_id=payload.id if payload is not None else None,
    )
    return vote, payload


# ------------------------------------------------------------------------------------------------
# Redis
# ------------------------------------------------------------------------------------------------


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


class Ledger:
    """The app's Redis side (async client). Connection errors propagate: the caller retries."""

    def __init__(self, r, *, preferences_stream: str = PREFERENCES_STREAM,
                 votes_stream: str = VOTES_STREAM, double_label: float = 0.0,
                 max_votes_per_minute: int = 0, rng: random.Random | None = None):
        self.r = r
        self.preferences_stream = preferences_stream
        self.votes_stream = votes_stream
        self.double_label = double_label
        self.max_votes_per_minute = max_votes_per_minute
        self.rng = rng or random.Random()
        self._claim = r.register_script(_CLAIM)

    # -------------------------------------------------------------- pages shown
    async def put_pending(self, pending: Pending) -> None:
        await self.r.set(PENDING_PREFIX + pending.ticket, pending.to_json(), ex=PENDING_TTL_S)

    async def get_pending(self, ticket: str) -> Pending | None:
        raw = await self.r.get(PENDING_PREFIX + ticket)
        return None if raw is None else Pending.from_json(ticket, raw)

    async def drop_pending(self, pending: Pending) -> None:
        """Skip / regenerate: forget the page; a relabel item goes back for someone else."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(PENDING_PREFIX + pending.ticket)
            if pending.relabel:
                pipe.zadd(RELABEL_KEY, {pending.item.id: time.time()}, xx=True)
            await pipe.execute()

    async def claim_relabel(self, annotator: str) -> Item | None:
        """An item someone else labelled that waits for a second label (leased to this
        annotator for an hour), or None."""
        raw = await self._claim(keys=[RELABEL_KEY],
                                args=[time.time(), RELABEL_LEASE_S, annotator, ITEM_PREFIX])
        return None if raw is None else Item.from_dict(json.loads(raw)["item"])

    # -------------------------------------------------------------- votes
    async def record(self, ticket: str, annotator: str, *, choice: Choice | None = None,
                     display_ranks: list[int] | None = None) -> Result:
        key = PENDING_PREFIX + ticket
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        done = await pipe.get(DONE_PREFIX + ticket)
                        await pipe.unwatch()
                        if done is not None:
                            return Result("already", vote_id=_text(done))
                        return Result("expired")
                    pending = Pending.from_json(ticket, raw)
                    if pending.annotator != annotator:
                        await pipe.unwatch()
                        return Result("not_yours")
                    now = time.time()
                    rate_key = RATE_PREFIX + annotator
                    if self.max_votes_per_minute > 0:
                        used = await pipe.zcount(rate_key, now - 60, "+inf")
                        if used >= self.max_votes_per_minute:
                            await pipe.unwatch()
                            return Result("rate_limited", pending=pending)
                    vote, payload = build_vote(pending, choice=choice, display_ranks=display_ranks,
                                               voted_at=now)
                    pipe.multi()
                    if payload is not None:
                        pipe.xadd(self.preferences_stream, encode_entry(payload))
                    pipe.xadd(self.votes_stream, vote.entry())
                    pipe.hincrby(COUNTS_KEY, annotator, 1)
                    pipe.zremrangebyscore(rate_key, "-inf", now - 60)
                    pipe.zadd(rate_key, {vote.id: now})
                    pipe.expire(rate_key, 61)
                    pipe.delete(key)
                    pipe.set(DONE_PREFIX + ticket, vote.id, ex=PENDING_TTL_S)
                    item_id = pending.item.id
                    if pending.relabel:
                        pipe.zrem(RELABEL_KEY, item_id)
                        pipe.delete(ITEM_PREFIX + item_id)
                    elif self.double_label > 0 and self.rng.random() < self.double_label:
                        record = {"item": pending.item.to_dict(), "first": annotator}
                        pipe.set(ITEM_PREFIX + item_id, json.dumps(record, ensure_ascii=False),
                                 ex=RELABEL_TTL_S)
                        pipe.zadd(RELABEL_KEY, {item_id: now})
                    await pipe.execute()
                    return Result("saved", vote=vote, payload=payload, pending=pending)
                except redis.WatchError:
                    continue  # the ticket changed under us (a second submit): look again

    async def votes_of(self, annotator: str) -> int:
        return int(await self.r.hget(COUNTS_KEY, annotator) or 0)

    async def counts(self) -> dict[str, int]:
        return {_text(k): int(v) for k, v in (await self.r.hgetall(COUNTS_KEY)).items()}


def redis_blip(exc: BaseException) -> bool:
    """Errors worth a retry (Redis gone or slow for a moment)."""
    return isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))

