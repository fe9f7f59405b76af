"""The files a training job reads, checked without torch: JSONL rows and checkpoint directories.

Submit-time checks (`rlhf_client.jobspecs`) and the trainer read data files with the same code,
kept here (the base install: protobuf, no torch) and imported by the server:

- `jsonl_objects`: the line loop of every JSONL reader (`DataError` naming the file and line);
- preference rows: `read_jsonl` → `Pair`s (a pair, or a ranking expanded to every strictly
  ordered pair; see `expand_ranking`);
- SFT rows: `read_sft_jsonl` → `SFTExample`s (`{"id", "prompt", "completion"[, "prefix"]}`,
  a pair's chosen response, a ranking's best response(s));
- scored samples: `read_samples_jsonl` → `SampleRecord`s (PPO's trajectories);
- prompt rows: `read_prompt_rows` → (id, text) (`{"id", "prompt"}` rows);
- checkpoints: `check_safe_dir` — a Hugging Face directory with safetensors weights only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfpb.v1 import samples_pb2

from rlhf_client.queues import MAX_PROMPT_ID_CHARS, PayloadError, validate_payload

__all__ = [
    "DataError",
    "jsonl_objects",
    "Pair",
    "expand_ranking",
    "pairs_from_payload",
    "read_jsonl",
    "SFTExample",
    "examples_from_payload",
    "read_sft_jsonl",
    "SampleRecord",
    "read_samples_jsonl",
    "read_prompt_rows",
    "REFUSED_SUFFIXES",
    "SAFETENSORS_INDEX",
    "UnsafeCheckpoint",
    "CheckpointNotFound",
    "check_safe_dir",
]

class DataError(ValueError):
    """Input data that cannot be used (names the file and line, or the payload)."""


@dataclass(frozen=True)
class Pair:
    """One preference: `chosen` ≻ `rejected` for `prompt`, from payload `source_id`."""

    source_id: str
    prompt: str
    chosen: str
    rejected: str


def expand_ranking(
    prompt: str, responses: Sequence[str], ranks: Sequence[int], *, source_id: str = ""
) -> list[Pair]:
    """Every strictly ordered pair of a ranking (lower rank is better; ties give no pair).

    Pairs come in a fixed order: by the better response's position, then the worse one's.
    """
    if len(responses) != len(ranks):
        raise DataError(f"ranking {source_id!r}: {len(ranks)} ranks for {len(responses)} responses")
    n = len(responses)
    return [
        Pair(source_id, prompt, responses[i], responses[j])
        for i in range(n)
        for j in range(n)
        if ranks[i] < ranks[j]
    ]


def pairs_from_payload(payload) -> list[Pair]:
    """The pairs of one queue payload (a PreferencePair, or a Ranking expanded).

    Raises `DataError` for any other payload type: a preference job cannot use a ScoredSample.
    """
    if isinstance(payload, samples_pb2.PreferencePair):
        return [Pair(payload.id, payload.prompt, payload.chosen, payload.rejected)]
    if isinstance(payload, samples_pb2.Ranking):
        return expand_ranking(payload.prompt, list(payload.responses), list(payload.ranks),
                              source_id=payload.id)
    raise DataError(f"{payload.DESCRIPTOR.full_name} is not preference data (pairs or rankings)")


def jsonl_objects(path: str | Path) -> Iterator[tuple[str, str, dict]]:
    """(`file:line` for messages, a default id `name:line`, the row) for every non-blank line
    of a JSONL file; `DataError` naming the file (and line) when it is missing, a line is not
    JSON, or a row is not an object. Every JSONL reader of the trainer goes through this."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected an object")
            yield where, f"{path.name}:{lineno}", obj


def read_jsonl(path: str | Path) -> list[Pair]:
    """Pairs from a JSONL file (pairs and rankings; see the module docstring)."""
    pairs: list[Pair] = []
    for where, default_id, obj in jsonl_objects(path):
        pid = str(obj.get("id") or default_id)
        try:
            if "responses" in obj:
                msg = samples_pb2.Ranking(id=pid, prompt=str(obj.get("prompt", "")),
                                          responses=list(obj["responses"]), ranks=list(obj["ranks"]))
            else:
                msg = samples_pb2.PreferencePair(id=pid, prompt=str(obj.get("prompt", "")),
                                                 chosen=obj["chosen"], rejected=obj["rejected"])
            validate_payload(msg)
        except KeyError as exc:
            raise DataError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError, PayloadError) as exc:
            raise DataError(f"{where}: {exc}") from None
        pairs.extend(pairs_from_payload(msg))
    return pairs


# ---------------------------------------------------------------------------------------------
# SFT examples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: train on `completion` after `prompt` + `prefix`.

    `source_id` is the payload (or JSONL row) it came from: the held-out split and the applied-id
    bookkeeping work per payload, as for preference pairs."""

    source_id: str
    prompt: str
    completion: str
    prefix: str = ""

    @classmethod
    def of(cls, obj: Any) -> "SFTExample":
        """From an SFTExample or a mapping with prompt / completion (/ prefix, id)."""
        if isinstance(obj, cls):
            return obj
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        sid = get("source_id", None) or get("id", None) or ""
        return cls(str(sid), str(get("prompt", "") or ""), str(get("completion", "") or ""),
                   str(get("prefix", "") or ""))

    def to_json(self) -> dict[str, str]:
        row = {"id": self.source_id, "prompt": self.prompt, "completion": self.completion}
        if self.prefix:
            row["prefix"] = self.prefix
        return row


def _best(prompt: str, responses: Sequence[str], ranks: Sequence[int], sid: str) -> list[SFTExample]:
    if len(responses) != len(ranks) or not responses:
        raise ValueError(f"ranking {sid!r}: {len(ranks)} ranks for {len(responses)} responses")
    top = min(ranks)
    return [SFTExample(sid, prompt, r) for r, k in zip(responses, ranks) if k == top]


def examples_from_payload(payload) -> list[SFTExample]:
    """The SFT examples of one queue payload: an `SFTExample` payload as it is (prompt,
    completion, prefix), a PreferencePair's chosen response, a Ranking's best-ranked
    response(s). Raises `DataError` for any other payload type or an empty completion."""
    if isinstance(payload, samples_pb2.SFTExample):
        if not payload.completion:
            raise DataError(f"SFT example {payload.id!r}: empty completion")
        return [SFTExample(payload.id, payload.prompt, payload.completion, payload.prefix)]
    if isinstance(payload, samples_pb2.PreferencePair):
        return [SFTExample(payload.id, payload.prompt, payload.chosen)]
    if isinstance(payload, samples_pb2.Ranking):
        try:
            return _best(payload.prompt, list(payload.responses), list(payload.ranks), payload.id)
        except ValueError as exc:
            raise DataError(str(exc)) from None
    raise DataError(f"{payload.DESCRIPTOR.full_name} is not SFT data (SFT examples; pairs or "
                    "rankings: their preferred responses)")


def read_sft_jsonl(path: str | Path) -> list[SFTExample]:
    """SFT examples from a JSONL file: `{"id", "prompt", "completion"[, "prefix"]}` rows,
    preference-pair rows (their chosen response) and ranking rows (their best response(s)).
    Raises `DataError` naming the file and line."""
    out: list[SFTExample] = []
    for where, default_id, obj in jsonl_objects(path):
        sid = str(obj.get("id") or default_id)
        prompt = obj.get("prompt", "")
        try:
            if "completion" in obj:
                ex = [SFTExample(sid, _str(prompt, "prompt"), _str(obj["completion"], "completion"),
                                 _str(obj.get("prefix", ""), "prefix"))]
            elif "chosen" in obj:
                ex = [SFTExample(sid, _str(prompt, "prompt"), _str(obj["chosen"], "chosen"))]
            elif "responses" in obj:
                ex = _best(_str(prompt, "prompt"), [_str(r, "responses") for r in obj["responses"]],
                           [int(k) for k in obj["ranks"]], sid)
            else:
                raise KeyError("completion")
        except KeyError as exc:
            raise DataError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: {exc}") from None
        for e in ex:
            if not e.completion:
                raise DataError(f"{where}: empty completion")
        out.extend(ex)
    return out


def _str(v, name: str) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a string, got {type(v).__name__}")
    return v


# ---------------------------------------------------------------------------------------------
# Scored samples (PPO)
# ---------------------------------------------------------------------------------------------

_ENDED = {1, 3}  # FinishReason STOP, EOS: the sample ended; LENGTH / ABORT / unset: it did not


@dataclass(frozen=True)
class SampleRecord:
    """One scored trajectory as the trainer uses it (from a ScoredSample, or a JSONL row with
    these keys). `completion_ids` is everything the policy sampled (a generated eos and reset
    tokens included); `behaviour_logprobs` / `reference_logprobs` are one value per completion
    token."""

    id: str
    group_id: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    behaviour_logprobs: tuple[float, ...]
    reference_logprobs: tuple[float, ...]
    score: float
    ended: bool = True
    policy_version: str = ""

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if not self.id:
            raise ValueError("id: must be set (each sample is applied once)")
        if not self.prompt_ids:
            raise ValueError(f"sample {self.id!r}: prompt_ids must not be empty")
        if n == 0:
            raise ValueError(f"sample {self.id!r}: completion_ids must not be empty")
        for name in ("behaviour_logprobs", "reference_logprobs"):
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(f"sample {self.id!r}: {name} has {len(values)} values for {n} "
                                 "completion tokens (PPO needs one per token)")
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"sample {self.id!r}: {name} holds a non-finite value")
        if not math.isfinite(self.score):
            raise ValueError(f"sample {self.id!r}: score is not finite")

    @staticmethod
    def default_group(prompt_ids: Sequence[int], policy_version: str) -> str:
        """The group of a sample that names none: the samples of one prompt by one version."""
        digest = hashlib.sha1(",".join(map(str, prompt_ids)).encode()).hexdigest()[:16]
        return f"prompt:{policy_version}:{digest}"

    @classmethod
    def from_payload(cls, msg) -> "SampleRecord":
        """From a ScoredSample message; `ValueError` for any other payload or a sample PPO
        cannot use (no per-token behaviour or reference log-probs, a non-finite value)."""
        if not isinstance(msg, samples_pb2.ScoredSample):
            raise ValueError(f"{msg.DESCRIPTOR.full_name} is not a ScoredSample")
        prompt = tuple(int(t) for t in msg.prompt_ids)
        version = msg.policy.version
        return cls(
            id=msg.id,
            group_id=msg.group_id or cls.default_group(prompt, version),
            prompt_ids=prompt,
            completion_ids=tuple(int(t) for t in msg.completion_ids),
            behaviour_logprobs=tuple(float(v) for v in msg.behaviour_logprobs),
            reference_logprobs=tuple(float(v) for v in msg.reference_logprobs),
            score=float(msg.reward),
            ended=int(msg.finish_reason) in _ENDED,
            policy_version=version,
        )

    @classmethod
    def from_mapping(cls, obj: Mapping[str, Any]) -> "SampleRecord":
        """From a mapping with this class's keys (group_id, ended and policy_version optional;
        `reward` is accepted for `score`)."""
        try:
            prompt = tuple(int(t) for t in obj["prompt_ids"])
            version = str(obj.get("policy_version") or "")
            score = obj["score"] if "score" in obj else obj["reward"]
            return cls(
                id=str(obj["id"]),
                group_id=str(obj.get("group_id") or cls.default_group(prompt, version)),
                prompt_ids=prompt,
                completion_ids=tuple(int(t) for t in obj["completion_ids"]),
                behaviour_logprobs=tuple(float(v) for v in obj["behaviour_logprobs"]),
                reference_logprobs=tuple(float(v) for v in obj["reference_logprobs"]),
                score=float(score),
                ended=bool(obj.get("ended", True)),
                policy_version=version,
            )
        except KeyError as exc:
            raise ValueError(f"missing field {exc.args[0]!r}") from None
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_completion(cls, completion, *, score: float, reference_logprobs: Sequence[float],
                        policy_version: str, group_id: str,
                        id: str | None = None) -> "SampleRecord":
        """From a policy completion (`rlhf_client.Completion`, or the service's own): the whole
        trajectory with its log-probs as sampled (asked with `return_logprobs=True`), `score`
        from the reward model, `reference_logprobs` of the same trajectory tokens. The id
        defaults to the rollout's convention `<group_id>:<policy_version>:<sample_index>`."""
        ids = list(completion.trajectory_token_ids) or list(completion.token_ids)
        lps = list(completion.trajectory_logprobs) or list(completion.logprobs)
        finish = getattr(completion, "finish_reason", None)
        if finish is None:
            finish = getattr(completion, "finish")
        return cls(
            id=id or f"{group_id}:{policy_version}:{completion.sample_index}",
            group_id=group_id,
            prompt_ids=tuple(completion.prompt_token_ids),
            completion_ids=tuple(ids),
            behaviour_logprobs=tuple(float(v) for v in lps),
            reference_logprobs=tuple(float(v) for v in reference_logprobs),
            score=float(score),
            ended=int(finish) in _ENDED,
            policy_version=policy_version,
        )

    @classmethod
    def of(cls, obj: Any) -> "SampleRecord":
        """A SampleRecord from a SampleRecord, a ScoredSample or a mapping."""
        if isinstance(obj, cls):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_mapping(obj)
        return cls.from_payload(obj)

    def to_json(self) -> dict[str, Any]:
        """The JSONL row of this sample (what `read_samples_jsonl` reads back)."""
        return {"id": self.id, "group_id": self.group_id, "prompt_ids": list(self.prompt_ids),
                "completion_ids": list(self.completion_ids),
                "behaviour_logprobs": list(self.behaviour_logprobs),
                "reference_logprobs": list(self.reference_logprobs), "score": self.score,
                "ended": self.ended, "policy_version": self.policy_version}


def read_samples_jsonl(path: str | Path) -> list[SampleRecord]:
    """Samples from a JSONL file, one `SampleRecord` row per line (see `SampleRecord.to_json`);
    `DataError` naming the file and line for anything unusable."""
    out: list[SampleRecord] = []
    for where, default_id, obj in jsonl_objects(path):
        try:
            out.append(SampleRecord.from_mapping(obj))
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def read_prompt_rows(path: str | Path) -> list[tuple[str, str]]:
    """(id, prompt) of every row {"id": ..., "prompt": "..."} of a JSONL file (blank lines
    skipped). `DataError` (a ValueError) naming the file and line for a row that is not an
    object, lacks either key, repeats an id, has an empty prompt or an id longer than
    MAX_PROMPT_ID_CHARS."""
    out: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for where, _, row in jsonl_objects(path):
        if "id" not in row or "prompt" not in row:
            raise DataError(f'{where}: expected an object with "id" and "prompt"')
        pid, text = row["id"], row["prompt"]
        if not isinstance(pid, (str, int)) or isinstance(pid, bool) or str(pid) == "":
            raise DataError(f"{where}: id must be a non-empty string or an integer")
        pid = str(pid)
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: prompt must be a non-empty string")
        if len(pid) > MAX_PROMPT_ID_CHARS:
            raise DataError(f"{where}: id longer than {MAX_PROMPT_ID_CHARS} characters")
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} repeats line {seen[pid].rsplit(':', 1)[1]}")
        seen[pid] = where
        out.append((pid, text))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------

# Weight files in formats that execute code on load: refused outright.
REFUSED_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class UnsafeCheckpoint(ValueError):
    """The directory is not a checkpoint we load: unsafe weight format, or incomplete."""


class CheckpointNotFound(ValueError, FileNotFoundError):
    """The directory, or its config.json, does not exist."""


def check_safe_dir(model_dir: str | Path) -> None:
    """Raise unless `model_dir` is a Hugging Face directory with safetensors weights only.

    Raises `CheckpointNotFound` when the directory or its `config.json` is missing, and
    `UnsafeCheckpoint` when the top level holds a file with a refused suffix (`.bin`, `.pt`,
    `.pth`, `.pkl`, `.ckpt` — these formats run code on load), holds no `*.safetensors` file, or
    has a `model.safetensors.index.json` that is unreadable or names a shard that is missing.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointNotFound(f"checkpoint directory not found: {d}")
    if not (d / "config.json").is_file():
        raise CheckpointNotFound(f"no config.json in checkpoint directory {d}")
    names = sorted(p.name for p in d.iterdir() if p.is_file())
    refused = [n for n in names if n.lower().endswith(REFUSED_SUFFIXES)]
    if refused:
        raise UnsafeCheckpoint(
            f"{d} holds weights in a format that can run code when loaded ({', '.join(refused)}); "
            "only safetensors checkpoints are accepted — convert them and remove these files"
        )
    if not any(n.endswith(".safetensors") for n in names):
        raise UnsafeCheckpoint(f"{d} holds no *.safetensors weights")
    index = d / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UnsafeCheckpoint(f"{index} is not a valid safetensors index: {e}") from None
        for shard in shards:
            p = Path(str(shard))
            # A shard must be a plain file name in this directory (no paths, no escaping it).
            if p.name != str(shard) or not p.name.endswith(".safetensors"):
                raise UnsafeCheckpoint(f"{index} names an invalid shard {shard!r}")
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise UnsafeCheckpoint(f"{index} names missing shard(s): {', '.join(missing)}")

