"""Queue producers: push preference pairs, rankings, SFT examples, scored samples and rollout
prompts to Redis Streams.

Applications and rollout workers push here; the trainer reads the same streams through a
consumer group (`rlhf.trainer.queues.StreamConsumer`). This module owns what both sides share:
the stream names, the entry encoding and the payload rules, so they cannot drift apart.

Entry encoding (one stream entry = one payload):

    type   the payload's protobuf full name, e.g. b"rlhfpb.v1.PreferencePair"
    id     the payload's unique id (also inside the payload); the trainer applies each id once
    data   the serialised protobuf message
    traceparent  (only while tracing is on, `rlhf_client.tracing`) the W3C trace context of the
           push, which the trainer's read span links to; readers ignore it otherwise

Streams: pairs and rankings go to `PREFERENCES_STREAM` (the reward-model and DPO trainers read
both kinds), SFT examples to `SFT_STREAM` (the SFT trainer's), scored samples to
`SAMPLES_STREAM`, prompts for the rollout workers (`rlhf rollout`, which answer each with n
scored samples) to `PROMPTS_STREAM`. Any other name may be passed. Entries that the
trainer cannot parse or that keep failing are moved to `dead_letter_stream(stream)` with a reason.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Union

import redis

from rlhf_client import tracing
from rlhf_client.redis_conn import connect, wait_replicas
from google.protobuf.message import DecodeError, Message
from rlhfpb.v1 import samples_pb2

PREFERENCES_STREAM = "rlhf:queue:preferences"
SAMPLES_STREAM = "rlhf:queue:samples"
PROMPTS_STREAM = "rlhf:queue:prompts"
SFT_STREAM = "rlhf:queue:sft"
DEAD_LETTER_SUFFIX = ":dead"

Payload = Union[samples_pb2.PreferencePair, samples_pb2.Ranking, samples_pb2.ScoredSample,
                samples_pb2.RolloutPrompt, samples_pb2.SFTExample]

MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (samples_pb2.PreferencePair, samples_pb2.Ranking, samples_pb2.ScoredSample,
                samples_pb2.RolloutPrompt, samples_pb2.SFTExample)
}
DEFAULT_STREAMS: dict[str, str] = {
    samples_pb2.PreferencePair.DESCRIPTOR.full_name: PREFERENCES_STREAM,
    samples_pb2.Ranking.DESCRIPTOR.full_name: PREFERENCES_STREAM,
    samples_pb2.ScoredSample.DESCRIPTOR.full_name: SAMPLES_STREAM,
    samples_pb2.RolloutPrompt.DESCRIPTOR.full_name: PROMPTS_STREAM,
    samples_pb2.SFTExample.DESCRIPTOR.full_name: SFT_STREAM,
}
MAX_ID_CHARS = 256
#: A rollout prompt's id is shorter: its samples' ids are "<prompt id>:<policy version>:<index>".
MAX_PROMPT_ID_CHARS = 192


class PayloadError(ValueError):
    """A stream entry or payload that is malformed or breaks the payload rules."""


def dead_letter_stream(stream: str) -> str:
    return stream + DEAD_LETTER_SUFFIX


def validate_payload(msg: Message) -> None:
    """Raise `PayloadError` unless `msg` keeps the rules every consumer relies on."""
    name = msg.DESCRIPTOR.full_name
    if name not in MESSAGE_TYPES:
        raise PayloadError(f"{name} is not a queue payload type")
    if not msg.id:
        raise PayloadError(f"{name}.id: must be set (the trainer applies each id once)")
    if len(msg.id) > MAX_ID_CHARS:
        raise PayloadError(f"{name}.id: longer than {MAX_ID_CHARS} characters")
    if isinstance(msg, samples_pb2.PreferencePair):
        if not msg.chosen or not msg.rejected:
            raise PayloadError("PreferencePair.chosen and .rejected: both must be non-empty")
    elif isinstance(msg, samples_pb2.Ranking):
        if len(msg.responses) < 2:
            raise PayloadError(f"Ranking.responses: needs at least 2, got {len(msg.responses)}")
        if len(msg.ranks) != len(msg.responses):
            raise PayloadError(
                f"Ranking.ranks: {len(msg.ranks)} ranks for {len(msg.responses)} responses"
            )
        if any(not r for r in msg.responses):
            raise PayloadError("Ranking.responses: every response must be non-empty")
    elif isinstance(msg, samples_pb2.ScoredSample):
        n = len(msg.completion_ids)
        if n == 0:
            raise PayloadError("ScoredSample.completion_ids: must not be empty")
        for field in ("behaviour_logprobs", "reference_logprobs"):
            k = len(getattr(msg, field))
            if k not in (0, n):
                raise PayloadError(f"ScoredSample.{field}: {k} values for {n} completion tokens")
    elif isinstance(msg, samples_pb2.RolloutPrompt):
        if not msg.prompt:
            raise PayloadError("RolloutPrompt.prompt: must be non-empty")
        if len(msg.id) > MAX_PROMPT_ID_CHARS:
            raise PayloadError(f"RolloutPrompt.id: longer than {MAX_PROMPT_ID_CHARS} characters "
                               "(sample ids append the policy version and the sample index)")
    elif isinstance(msg, samples_pb2.SFTExample):
        # The loss starts where the prefix ends: any prefix (empty or not) marks a valid start,
        # as long as something follows it to train on.
        if not msg.completion:
            raise PayloadError("SFTExample.completion: must be non-empty (the loss falls on it"
                               + (", after the prefix)" if msg.prefix else ")"))


def encode_entry(msg: Message) -> dict[bytes, bytes]:
    """The stream entry fields for one payload (validated first)."""
    validate_payload(msg)
    fields = {
        b"type": msg.DESCRIPTOR.full_name.encode(),
        b"id": msg.id.encode(),
        b"data": msg.SerializeToString(),
    }
    traceparent = tracing.traceparent()  # None while tracing is off
    if traceparent:
        fields[tracing.TRACEPARENT_FIELD] = traceparent.encode()
    return fields


def decode_entry(fields: Mapping[bytes, bytes] | None) -> Payload:
    """The payload of one stream entry; raises `PayloadError` for anything malformed."""
    if not fields:
        raise PayloadError("empty entry (no fields)")
    missing = [k for k in (b"type", b"id", b"data") if k not in fields]
    if missing:
        raise PayloadError(f"entry lacks field(s) {', '.join(m.decode() for m in missing)}")
    try:
        type_name = fields[b"type"].decode()
        entry_id = fields[b"id"].decode()
    except UnicodeDecodeError:
        raise PayloadError("entry type/id are not UTF-8") from None
    cls = MESSAGE_TYPES.get(type_name)
    if cls is None:
        raise PayloadError(f"unknown payload type {type_name[:80]!r}")
    msg = cls()
    try:
        msg.ParseFromString(fields[b"data"])
    except (DecodeError, ValueError) as exc:
        raise PayloadError(f"{type_name} payload does not parse: {exc}") from None
    if msg.id != entry_id:
        raise PayloadError(f"entry id {entry_id[:80]!r} differs from the payload's {msg.id[:80]!r}")
    validate_payload(msg)
    return msg


def _stamp(msg: Message) -> Message:
    if not msg.id:
        msg.id = uuid.uuid4().hex
    if not msg.HasField("created"):
        msg.created.FromNanoseconds(time.time_ns())
    return msg


class QueueProducer:
    """Pushes payloads to Redis Streams (sync; thread-safe like the redis client it wraps).

    Each push returns the payload's id: the caller's, or a fresh uuid4 when unset. `created` is
    stamped with the current time when unset. A payload that breaks the rules (see
    `validate_payload`) raises `PayloadError` and is not pushed.

    `maxlen` trims each stream to about that many entries (approximate `MAXLEN ~`). Trimming
    drops the oldest entries whether or not a trainer has read them: leave it unset unless the
    stream's backlog is known to stay far below it. Streams need no bound here: the trainer
    trims entries once every consumer group has acked them (`stream_retention_s`,
    `stream_max_entries`; see "Retention" in docs/operations.md), and never unread ones.
    """

    def __init__(self, client: redis.Redis, *, maxlen: int | None = None,
                 min_replicas_ack: int = 0, replicas_ack_timeout_ms: int = 1000):
        self.r = client
        self.maxlen = maxlen
        # each push WAITs until this many replicas have it (`ReplicationLag` otherwise: push
        # again, same payload id — the trainer applies a payload id once)
        self.min_replicas_ack = min_replicas_ack
        self.replicas_ack_timeout_ms = replicas_ack_timeout_ms

    @classmethod
    def from_url(cls, url: str, **kwargs) -> "QueueProducer":
        return cls(connect(url), **kwargs)

    # -------------------------------------------------------------- one payload
    def push(self, msg: Payload, *, stream: str | None = None) -> str:
        """Push any payload to `stream` (default: the stream for its type)."""
        msg = _stamp(msg)
        stream = stream or DEFAULT_STREAMS[msg.DESCRIPTOR.full_name]
        with tracing.producer_span(stream):
            fields = encode_entry(msg)
            self.r.xadd(stream, fields, maxlen=self.maxlen, approximate=True)
            wait_replicas(self.r, self.min_replicas_ack, self.replicas_ack_timeout_ms)
        return msg.id

    def push_pair(self, pair: samples_pb2.PreferencePair | None = None, *, stream: str | None = None,
                  **fields) -> str:
        """Push a `PreferencePair`, given as a message or as its fields
        (`prompt=`, `chosen=`, `rejected=`, optional `id=`, `source=`)."""
        return self.push(_message(samples_pb2.PreferencePair, pair, fields), stream=stream)

    def push_ranking(self, ranking: samples_pb2.Ranking | None = None, *, stream: str | None = None,
                     **fields) -> str:
        """Push a `Ranking` (`prompt=`, `responses=[...]`, `ranks=[...]`, lower rank is better)."""
        return self.push(_message(samples_pb2.Ranking, ranking, fields), stream=stream)

    def push_sft_example(self, example: samples_pb2.SFTExample | None = None, *,
                         stream: str | None = None, **fields) -> str:
        """Push an `SFTExample` (`prompt=`, `completion=`, optional `prefix=`: text after the
        prompt that is conditioned on but not trained, `id=`, `source=`) to `SFT_STREAM` by
        default."""
        return self.push(_message(samples_pb2.SFTExample, example, fields), stream=stream)

    def push_sample(self, sample: samples_pb2.ScoredSample | None = None, *,
                    stream: str | None = None, **fields) -> str:
        """Push a `ScoredSample` (`prompt_ids=`, `completion_ids=`, `reward=`, log-probs ...)."""
        return self.push(_message(samples_pb2.ScoredSample, sample, fields), stream=stream)

    def push_prompt(self, prompt: samples_pb2.RolloutPrompt | str | None = None, *,
                    stream: str | None = None, **fields) -> str:
        """Push a `RolloutPrompt` for the rollout workers: a message, its text, or its fields
        (`prompt=`, optional `id=`, `source=`). Give an `id` to make a re-push of the same prompt
        a duplicate the workers answer once; unset, a fresh uuid4 is used."""
        if isinstance(prompt, str):
            fields = {"prompt": prompt, **fields}
            prompt = None
        return self.push(_message(samples_pb2.RolloutPrompt, prompt, fields), stream=stream)

    # -------------------------------------------------------------- many payloads
    def push_many(self, messages: Iterable[Payload], *, stream: str | None = None,
                  chunk: int = 500) -> list[str]:
        """Push payloads in pipelined round trips of `chunk`; all are validated before any is sent."""
        stamped = [_stamp(m) for m in messages]
        with tracing.producer_span(stream or (lambda: ",".join(sorted(
                {DEFAULT_STREAMS[m.DESCRIPTOR.full_name] for m in stamped}))), count=len(stamped)):
            encoded = [(m.id, DEFAULT_STREAMS[m.DESCRIPTOR.full_name], encode_entry(m))
                       for m in stamped]
            for start in range(0, len(encoded), chunk):
                pipe = self.r.pipeline(transaction=False)
                for _, default, fields in encoded[start:start + chunk]:
                    pipe.xadd(stream or default, fields, maxlen=self.maxlen, approximate=True)
                pipe.execute()
            wait_replicas(self.r, self.min_replicas_ack, self.replicas_ack_timeout_ms)
        return [i for i, _, _ in encoded]

    # -------------------------------------------------------------- inspection
    def length(self, stream: str = PREFERENCES_STREAM) -> int:
        """Entries in the stream (read or not; the trainer's depth metric counts unfinished ones)."""
        return int(self.r.xlen(stream))

    def dead_letters(self, stream: str = PREFERENCES_STREAM, count: int = 100) -> list[dict]:
        """The newest dead-lettered entries of `stream`: each with its reason and origin."""
        out = []
        for entry_id, fields in self.r.xrevrange(dead_letter_stream(stream), count=count):
            row = {_text(k): (v if _text(k) == "data" else _text(v)) for k, v in fields.items()}
            row["dead_letter_entry"] = _text(entry_id)
            out.append(row)
        return out

    def close(self) -> None:
        self.r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)


def _message(cls: type[Message], msg: Message | None, fields: dict) -> Message:
    if msg is not None and fields:
        raise TypeError("pass a message or its fields, not both")
    if msg is None:
        try:
            msg = cls(**fields)
        except (TypeError, ValueError) as exc:
            raise PayloadError(f"{cls.DESCRIPTOR.name}: {exc}") from None
    elif not isinstance(msg, cls):
        raise TypeError(f"expected {cls.DESCRIPTOR.full_name}, got {type(msg).__name__}")
    return msg
