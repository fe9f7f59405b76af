"""Add a special token to a model (the backtracking reset token): tokenizer, embeddings, version.

`add_special_token(model_dir, out_dir, token)` writes a copy of a checkpoint whose tokenizer
holds `token` as one special token (never split, never merged with its neighbours, dropped by
`decode(..., skip_special_tokens=True)`) and whose embeddings have a row for it:

- the id is the tokenizer's next one (`len(tokenizer)` before the add);
- when the embedding matrix already has a spare row there (many checkpoints pad their
  vocabulary: Qwen2's 151936 rows for 151665 tokens) nothing is resized and `vocab_size` stays;
  otherwise the input embedding, and an untied output embedding (with its bias, if any), grow
  to `len(tokenizer)` rows and `config.vocab_size` follows (a tied output layer grows with the
  input one);
- the new token's input row, and its output row when untied, are set to the mean of the rows
  of the tokenizer's existing tokens: deterministic, and a start that neither dominates nor
  vanishes from the softmax (the new token's initial probability is about the average token's).

Every other weight is copied unchanged, so the model's outputs on text without the new token are
the same (its log-probs shift only by the new token's share of the softmax). A token that is
already one token of the model is left alone: nothing is written, and the result says so.

`add_token_version(store, registry, name, token)` does that to a version of a model in the store
(default: the active one) and publishes the result as the next version with that version as its
parent, golden probes computed, the change recorded in the manifest's `extra["add_token"]`;
activation is asked separately (`activate=True`), so services following the registry hot-swap
to it like to any other version. A token already there publishes nothing.

CLI: `rlhf models add-token NAME TOKEN [--version V] [--activate]` (a store version) or
`rlhf models add-token --model-dir DIR --out DIR TOKEN` (a plain directory):
`add_add_token_parser(models_subparsers)` and `cmd_add_token(args, settings)`.
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_client.registry import Registry

    from rlhf.models.store import Manifest, ModelStore

__all__ = [
    "AddTokenResult",
    "TokenError",
    "add_special_token",
    "add_token_version",
    "add_add_token_parser",
    "cmd_add_token",
]


class TokenError(ValueError):
    """The token cannot be added (empty, or the checkpoint is inconsistent)."""


@dataclass(frozen=True)
class AddTokenResult:
    token: str
    token_id: int
    added: bool  # False: it already was one token of the model; nothing was written
    vocab_size_before: int  # rows of the input embedding
    vocab_size_after: int
    resized: bool  # the embeddings grew (False: a spare row took the token, or nothing added)
    tied: bool  # the output layer shares the input embedding
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _single_id(tokenizer, token: str) -> int | None:
    ids = tokenizer.encode(token, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def _add_to_tokenizer(tokenizer, token: str) -> None:
    """Register `token` as an extra special token, keeping the ones already there."""
    from tokenizers import AddedToken

    added = AddedToken(token, special=True, normalized=False, lstrip=False, rstrip=False)
    params = inspect.signature(tokenizer.add_special_tokens).parameters
    if "replace_extra_special_tokens" in params:  # transformers 5
        tokenizer.add_special_tokens({"extra_special_tokens": [added]},
                                     replace_extra_special_tokens=False)
    else:  # transformers 4
        tokenizer.add_special_tokens({"additional_special_tokens": [added]},
                                     replace_additional_special_tokens=False)


def _load(model_dir: Path, kind: str):
    from rlhf.models.loading import load_causal_lm, load_reward_model

    if kind == "reward":
        return load_reward_model(model_dir)
    if kind in ("policy", "reference"):
        return load_causal_lm(model_dir)
    raise TokenError(f"kind must be 'policy', 'reference' or 'reward', got {kind!r}")


def add_special_token(model_dir: str | Path, out_dir: str | Path, token: str, *,
                      kind: str = "policy") -> AddTokenResult:
    """Write `model_dir` with `token` added (see the module docstring) to `out_dir`.

    Returns what was done; when the token already is one token of the model nothing is written
    (`added` False). Raises `TokenError` for an empty token or a tokenizer whose ids the
    embeddings do not cover."""
    import torch

    from rlhf.models.loading import load_tokenizer
    from rlhf.models.tiny import quiet_progress_bars

    if not token or token.strip() != token:
        raise TokenError(f"the token must be non-empty without surrounding spaces, got {token!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    tok = load_tokenizer(model_dir)
    model = _load(model_dir, kind)
    emb = model.get_input_embeddings()
    rows = int(emb.weight.shape[0])
    head = model.get_output_embeddings() if kind != "reward" else None
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    have = _single_id(tok, token)
    if have is not None:
        if have >= rows:
            raise TokenError(f"{token!r} is token {have} of the tokenizer but the embeddings have "
                             f"only {rows} rows: the checkpoint is inconsistent")
        return AddTokenResult(token, have, False, rows, rows, False, tied,
                              f"{token!r} already is one token of the model (id {have}): "
                              "nothing to do")
    n_old = len(tok)
    _add_to_tokenizer(tok, token)
    new_id = _single_id(tok, token)
    if new_id is None or len(tok) != n_old + 1:
        raise TokenError(f"the tokenizer did not take {token!r} as one new token")
    if new_id < n_old:
        raise TokenError(f"the tokenizer gave {token!r} the existing id {new_id}")
    resized = new_id >= rows
    with torch.no_grad():
        if resized:
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            emb = model.get_input_embeddings()
            head = model.get_output_embeddings() if kind != "reward" else None
        emb.weight[new_id] = emb.weight[:n_old].mean(0)
        if head is not None and not tied:
            head.weight[new_id] = head.weight[:n_old].mean(0)
            if getattr(head, "bias", None) is not None:
                head.bias[new_id] = head.bias[:n_old].mean()
    after = int(model.get_input_embeddings().weight.shape[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_progress_bars():
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    _keep_extras(model_dir, out_dir)
    how = (f"embeddings resized {rows} → {after} rows" if resized
           else f"a spare embedding row took it ({rows} rows, vocab_size unchanged)")
    return AddTokenResult(token, new_id, True, rows, after, resized, tied,
                          f"added {token!r} as special token {new_id}; {how}")


def _keep_extras(src: Path, dst: Path) -> None:
    """Files of the source the save did not write (a generation config save_pretrained skipped,
    a chat template kept beside the tokenizer)."""
    for name in ("generation_config.json", "chat_template.jinja", "chat_template.json"):
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def add_token_version(store: "ModelStore", registry: "Registry", name: str, token: str, *,
                      version: str | None = None, activate: bool = False
                      ) -> tuple["Manifest | None", AddTokenResult]:
    """Add `token` to `version` of `name` (default: its active version) and publish the result
    as a new version whose parent is that version; register it, activate it when asked.
    Returns (the new manifest, or None when the token was already there; the result)."""
    from rlhf.models.probes import compute_probes

    if version is None:
        version = registry.active(name)
        if version is None:
            raise TokenError(f"model {name!r} has no active version; name one with --version")
    base = store.verify(name, version)  # a tampered version is refused
    kind = base.kind or "policy"
    with tempfile.TemporaryDirectory(prefix="rlhf-add-token-") as tmp:
        result = add_special_token(store.path(name, version), tmp, token, kind=kind)
        if not result.added:
            return None, result
        manifest = store.publish(name, tmp, parent=version, kind=kind,
                                 probes=compute_probes(kind, tmp),
                                 extra={"add_token": {**result.as_dict(), "base": version}})
    registry.register(manifest.name, manifest.version, manifest.created)
    if activate:
        registry.activate(manifest.name, manifest.version)
    return manifest, result


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_add_token_parser(sub) -> None:
    """`add-token` under `rlhf models` (`sub`: its subparsers)."""
    from pathlib import Path as _P

    p = sub.add_parser("add-token", help="add a special token (e.g. the reset token) to a model: "
                       "tokenizer and embeddings, published as a new version")
    p.add_argument("name", nargs="?", help="model in the store (unless --model-dir)")
    p.add_argument("token", help='the token, e.g. "<|reset|>"')
    p.add_argument("--version", default=None, help="version to start from (default: the active one)")
    p.add_argument("--activate", action="store_true", help="make the new version the active one")
    p.add_argument("--kind", choices=["policy", "reference", "reward"], default=None,
                   help="--model-dir only: what the checkpoint is (default policy)")
    p.add_argument("--model-dir", dest="source_dir", type=_P, default=None,
                   help="a plain checkpoint directory instead of a store version (writes --out)")
    p.add_argument("--out", type=_P, default=None, help="with --model-dir: where to write")
    p.add_argument("--store", dest="store_dir", type=_P, default=None, help="model store root")
    p.add_argument("--redis-url", dest="redis_url", default=None, help="Redis (registry)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_add_token(args, settings=None) -> int:
    """Run `rlhf models add-token`; 0 on success (a token already there included), 2 on bad
    arguments, 1 when the token cannot be added. `settings` (the process's Settings) gives the
    store and Redis unless the flags do."""
    import sys

    def out(payload: dict[str, Any], text: str) -> None:
        print(json.dumps(payload, indent=2) if args.json else text)

    try:
        if args.source_dir is not None:
            if args.out is None:
                print("rlhf models add-token: --model-dir needs --out", file=sys.stderr)
                return 2
            result = add_special_token(args.source_dir, args.out, args.token,
                                       kind=args.kind or "policy")
            out({**result.as_dict(), "out": str(args.out) if result.added else None},
                result.message + (f"; written to {args.out}" if result.added else ""))
            return 0
        if not args.name:
            print("rlhf models add-token: name a model (or give --model-dir)", file=sys.stderr)
            return 2
        from rlhf_client.redis_conn import connect
        from rlhf_client.registry import Registry

        from rlhf.models.store import ModelStore

        if settings is None:
            from rlhf.config import Settings

            settings = Settings(**{k: v for k, v in (("store_dir", args.store_dir),
                                                      ("redis_url", args.redis_url)) if v is not None})
        store_dir = args.store_dir or settings.store_dir
        url = args.redis_url or settings.redis_url.get_secret_value()
        client = connect(url, decode_responses=True)
        try:
            manifest, result = add_token_version(ModelStore(store_dir), Registry(client), args.name,
                                                 args.token, version=args.version,
                                                 activate=args.activate)
        finally:
            client.close()
        if manifest is None:
            out({**result.as_dict(), "version": None}, result.message)
        else:
            out({**result.as_dict(), "version": manifest.version, "parent": manifest.parent,
                 "activated": args.activate},
                f"{result.message}; published {args.name} {manifest.version} (parent "
                f"{manifest.parent}){', active' if args.activate else ''}")
        return 0
    except (ValueError, OSError) as exc:  # TokenError, a missing / tampered version ...
        print(f"rlhf models add-token: {exc}", file=sys.stderr)
        return 1
