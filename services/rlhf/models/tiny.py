"""Tiny models made on the spot: a real Hugging Face directory with no download.

`make_tiny_model("policy", d)` writes a randomly initialised Qwen2 causal LM (or, for
`"reward"`, a Qwen2 sequence classifier with one output) together with a byte-level BPE
tokenizer trained here on a fixed synthetic English corpus. Tests, demos and benchmarks use
these directories exactly as they would use a user's checkpoint: they load through
`rlhf.models.loading`, and vLLM can serve the policy (head_dim is 32 or more, which its CPU
attention needs).

Determinism: the same `(kind, size, seed, tie_embeddings)` gives a byte-identical directory
(every file). The corpus is generated from a fixed seed, BPE training is deterministic, the
weights come from `torch.manual_seed(seed)`, and nothing writes a timestamp.

One tokenizer for every tiny model: its vocabulary never depends on `kind`, `size` or `seed`
(only `model_max_length` follows the size), so any two tiny models share token ids — a tiny
policy, a small reward model and a reference model can be mixed freely. BPE is trained towards
4096 tokens, but the synthetic corpus saturates first (1232 tokens: 256 bytes, the four
specials, and merges; every listed word, after a space, is one token); the model's
`vocab_size` is exactly `len(tokenizer)`. The tokenizer is trained under Qwen2's own text
pipeline, so it tokenizes identically however it is loaded (transformers 5's AutoTokenizer
rebuilds it as `Qwen2Tokenizer`; vLLM does the same).

Special tokens (the same ids for both sizes):

    0  <|endoftext|>   eos, pad and bos (as in Qwen2; the tokenizer never adds it itself)
    1  <|reset|>       the backtracking reset token, always a single token
    2  <|im_start|>
    3  <|im_end|>
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

__all__ = [
    "EOS_TOKEN",
    "RESET_TOKEN",
    "IM_START_TOKEN",
    "IM_END_TOKEN",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "SIZES",
    "TinySize",
    "make_tiny_model",
    "make_tokenizer",
    "model_config",
    "quiet_progress_bars",
    "synthetic_corpus",
]

Kind = Literal["policy", "reward"]
Size = Literal["tiny", "small"]

EOS_TOKEN = "<|endoftext|>"
RESET_TOKEN = "<|reset|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
# Order fixes the ids: <|endoftext|>=0, <|reset|>=1, <|im_start|>=2, <|im_end|>=3.
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, RESET_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
#: The chat template `make_tiny_model(..., chat_template=True)` gives the tokenizer: ChatML.
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START_TOKEN + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END_TOKEN
    + "\n{% endfor %}{% if add_generation_prompt %}" + IM_START_TOKEN + "assistant\n{% endif %}"
)

_CORPUS_SEED = 20240601
# Qwen2's pre-tokenizer split (as in transformers' Qwen2 tokenizer): digits split one by one.
_QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class TinySize:
    """Shape of one model size (vocab_size is always len(tokenizer), shared by all sizes)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


SIZES: dict[str, TinySize] = {
    # ~0.45M parameters (0.61M untied): builds in well under a second.
    "tiny": TinySize(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        intermediate_size=256,
        max_position_embeddings=512,
    ),
    # ~24.2M parameters with tied embeddings (~24.9M untied): big enough to learn a task.
    "small": TinySize(
        hidden_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_hidden_layers=8,
        intermediate_size=1408,
        max_position_embeddings=1024,
    ),
}

# ---------------------------------------------------------------------------------------------
# The synthetic corpus
# ---------------------------------------------------------------------------------------------

_COLOURS = (
    "red blue green yellow orange purple pink black white brown grey gray gold silver"
).split()
_ANIMALS = (
    "cat dog bird fish horse cow pig sheep goat mouse rabbit fox wolf bear lion tiger "
    "elephant monkey duck chicken owl frog snake whale dolphin shark bee ant spider turtle"
).split()
_FRUITS = (
    "apple banana orange pear grape lemon cherry peach plum mango melon strawberry "
    "kiwi lime berry coconut"
).split()
_FOODS = "bread cake soup rice pasta cheese milk tea coffee water juice pizza egg salad".split()
_THINGS = (
    "mat hat box ball book cup car bus train boat house tree door window chair table bed "
    "lamp phone pen paper bag key clock road park garden river hill sky sun moon star "
    "rain snow wind city town school shop room kitchen computer song game story letter"
).split()
_PEOPLE = (
    "man woman boy girl child friend teacher doctor farmer king queen baby mother father "
    "sister brother student driver cook"
).split()
_NAMES = (
    "Alice Bob Carol Dave Eve Frank Grace Henry Ivy Jack Kate Leo Mia Nick Olivia Paul "
    "Rose Sam Tom Uma Zoe"
).split()
_ADJECTIVES = (
    "good bad great nice happy sad big small little large old new young fast slow hot cold "
    "warm cool soft hard long short tall quiet loud clean dirty kind funny lovely terrible "
    "awful excellent wonderful fine sweet sour bright dark heavy light busy lazy clever "
    "brave safe wrong right true false best worst better worse"
).split()
_VERBS_PAST = (
    "sat ran jumped walked ate saw liked found took made gave went came looked played "
    "sang read wrote drew held opened closed bought sold loved wanted helped watched"
).split()
_VERBS = (
    "sit run jump walk eat see like find take make give go come look play sing read write "
    "draw hold open close buy sell love want help watch need know think say tell ask"
).split()
_PREPS = "on in under over near by with behind beside into onto from to at".split()
_ADVERBS = "very really quite too so always never often sometimes today now here there".split()
_REPLIES = (
    "yes no please thanks thank you sorry hello hi goodbye bye okay sure maybe of course"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve twenty thirty "
    "forty fifty hundred thousand first second third last"
).split()
_QUESTION_WORDS = "what where when who why how which".split()


def _nouns(r: random.Random) -> str:
    pool = r.choice((_ANIMALS, _FRUITS, _FOODS, _THINGS, _PEOPLE))
    return r.choice(pool)


def _noun_phrase(r: random.Random) -> str:
    det = r.choice(("the", "the", "a", "my", "your", "this", "that", "his", "her", "our"))
    if r.random() < 0.45:
        adj = r.choice(_COLOURS if r.random() < 0.5 else _ADJECTIVES)
        det_adj = f"{det} {adj}"
        if det == "a" and adj[0] in "aeiou":
            det_adj = f"an {adj}"
        return f"{det_adj} {_nouns(r)}"
    noun = _nouns(r)
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    return f"{det} {noun}"


def _number(r: random.Random) -> str:
    roll = r.random()
    if roll < 0.35:
        return str(r.randint(0, 99))
    if roll < 0.65:
        return str(r.randint(100, 9999))
    if roll < 0.8:
        return f"{r.randint(0, 999)}.{r.randint(0, 99)}"
    return r.choice(_NUMBER_WORDS)


def _sentence(r: random.Random) -> str:
    t = r.randrange(14)
    if t == 0:
        s = f"{_noun_phrase(r)} {r.choice(_VERBS_PAST)} {r.choice(_PREPS)} {_noun_phrase(r)}."
    elif t == 1:
        s = f"{_noun_phrase(r)} is {r.choice(_ADVERBS)} {r.choice(_ADJECTIVES)}."
    elif t == 2:
        s = f"the {r.choice(_ANIMALS)} is {r.choice(_COLOURS)}."
    elif t == 3:
        s = f"I like {r.choice(_FRUITS)}s and {r.choice(_FRUITS)}s."
    elif t == 4:
        s = f"{r.choice(_NAMES)} has {_number(r)} {r.choice(_FRUITS + _ANIMALS)}s."
    elif t == 5:
        s = f"{r.choice(_QUESTION_WORDS)} did {_noun_phrase(r)} {r.choice(_VERBS)}?"
    elif t == 6:
        s = f"{r.choice(_REPLIES)}, {r.choice(_REPLIES)}!"
    elif t == 7:
        s = f"that is a {r.choice(_ADJECTIVES)} answer. {r.choice(('yes', 'no'))}."
    elif t == 8:
        a, b = r.randint(0, 999), r.randint(0, 999)
        s = f"{a} plus {b} is {a + b}, and {a} + {b} = {a + b}."
    elif t == 9:
        s = f"please {r.choice(_VERBS)} {_noun_phrase(r)}, thanks."
    elif t == 10:
        s = f"{r.choice(_NAMES)} said: \"{_noun_phrase(r)} was {r.choice(_ADJECTIVES)}.\""
    elif t == 11:
        s = f"the answer is {_number(r)}; it was {r.choice(('good', 'bad', 'great'))}."
    elif t == 12:
        s = f"{r.choice(_NAMES)} and {r.choice(_NAMES)} {r.choice(_VERBS_PAST)} {_noun_phrase(r)} ({_number(r)})."
    else:
        s = f"my favourite colour is {r.choice(_COLOURS)} and my favourite fruit is {r.choice(_FRUITS)}."
    s = s[0].upper() + s[1:] if r.random() < 0.6 else s
    return s


@lru_cache(maxsize=1)
def synthetic_corpus(n_lines: int = 6000) -> tuple[str, ...]:
    """A fixed English-like corpus: the same lines every call, on every machine."""
    r = random.Random(_CORPUS_SEED)
    lines: list[str] = []
    # Every listed word at least once, bare and after a space, so each has a clean encoding.
    vocab_words = sorted(
        set(
            _COLOURS + _ANIMALS + _FRUITS + _FOODS + _THINGS + _PEOPLE + _NAMES + _ADJECTIVES
            + _VERBS_PAST + _VERBS + _PREPS + _ADVERBS + _REPLIES + _NUMBER_WORDS
            + _QUESTION_WORDS
        )
    )
    # Repeated (shuffled) so BPE merges each listed word into one token where the budget allows.
    for _ in range(120):
        shuffled = list(vocab_words)
        r.shuffle(shuffled)
        lines.append(" ".join(shuffled))
    lines.append(" ".join(str(i) for i in range(1000)))
    lines.append("the cat sat on the mat. The cat sat on the mat.")
    for _ in range(n_lines):
        k = r.choice((1, 1, 2, 3))
        lines.append(" ".join(_sentence(r) for _ in range(k)))
    return tuple(lines)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


_BPE_VOCAB_TARGET = 4096  # an upper bound: the corpus saturates below it


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train byte-level BPE on the synthetic corpus; the serialised tokenizer (deterministic)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from tokenizers.trainers import BpeTrainer

    # Exactly Qwen2's text pipeline (NFC, Qwen's split regex, byte-level, no post-processor):
    # AutoTokenizer may rebuild the tokenizer as `Qwen2Tokenizer` from vocab + merges with this
    # pipeline (transformers 5 does), so training under it makes every loader tokenize alike.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=_BPE_VOCAB_TARGET,
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()),
    )
    tok.train_from_iterator(list(synthetic_corpus()), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    # Canonical JSON: sorted keys, so nothing depends on map iteration order.
    return json.dumps(json.loads(tok.to_str()), sort_keys=True, ensure_ascii=False)


def _tf_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def make_tokenizer(size: Size = "tiny"):
    """A fresh `PreTrainedTokenizerFast` (trained once per process, then cached).

    The vocabulary is the same for every size; `size` sets only `model_max_length`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _size(size)
    backend = Tokenizer.from_str(_tokenizer_json())
    extra_key = "extra_special_tokens" if _tf_major() >= 5 else "additional_special_tokens"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        **{extra_key: [RESET_TOKEN, IM_START_TOKEN, IM_END_TOKEN]},
    )


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (e.g. "Writing model shards") for the block."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _size(size: str) -> TinySize:
    try:
        return SIZES[size]
    except KeyError:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}") from None


def model_config(
    kind: Kind, size: Size = "tiny", *, vocab_size: int | None = None, tie_embeddings: bool = True
):
    """The `Qwen2Config` that `make_tiny_model` uses (no weights built).

    `vocab_size` defaults to the length of the (shared) tokenizer.
    """
    from transformers import Qwen2Config

    if kind not in ("policy", "reward"):
        raise ValueError(f"kind must be 'policy' or 'reward', got {kind!r}")
    spec = _size(size)
    if vocab_size is None:
        vocab_size = len(make_tokenizer(size))
    eos = SPECIAL_TOKENS.index(EOS_TOKEN)
    extra: dict = {}
    if kind == "reward":
        extra = {"num_labels": 1, "id2label": {0: "score"}, "label2id": {"score": 0}}
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        max_window_layers=spec.num_hidden_layers,
        use_sliding_window=False,
        tie_word_embeddings=bool(tie_embeddings),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        architectures=["Qwen2ForCausalLM" if kind == "policy" else "Qwen2ForSequenceClassification"],
        **extra,
    )
    if getattr(cfg, "head_dim", None) is None:
        cfg.head_dim = spec.head_dim
    assert spec.head_dim >= 32, "vLLM's CPU attention needs head_dim >= 32"
    return cfg


def make_tiny_model(
    kind: Kind,
    out_dir: str | Path,
    *,
    size: Size = "tiny",
    seed: int = 0,
    tie_embeddings: bool = True,
    chat_template: bool = False,
) -> Path:
    """Write a random-init Qwen2 policy (`Qwen2ForCausalLM`) or reward model
    (`Qwen2ForSequenceClassification`, one label) with its tokenizer to `out_dir`.

    fp32, safetensors only, generation_config.json with eos = pad = bos = 0. The same arguments
    give a byte-identical directory; a different `seed` gives different weights. `out_dir` is
    created if missing (files already there with the same names are overwritten). Returns the
    directory as a `Path`.

    `chat_template=True` gives the tokenizer `CHAT_TEMPLATE` (ChatML turns, in
    tokenizer_config.json); by default it has none (chat prompts are refused).
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2ForCausalLM,
        Qwen2ForSequenceClassification,
    )

    out = Path(out_dir)
    tokenizer = make_tokenizer(size)
    cfg = model_config(kind, size, vocab_size=len(tokenizer), tie_embeddings=tie_embeddings)
    cls = Qwen2ForCausalLM if kind == "policy" else Qwen2ForSequenceClassification

    prev_default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev_default)
    model = model.to(torch.float32).eval()

    gen = GenerationConfig(
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    model.generation_config = gen

    out.mkdir(parents=True, exist_ok=True)
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4.x; 5.x writes safetensors only
    with quiet_progress_bars():
        model.save_pretrained(out, **save_kwargs)
        if kind == "reward":  # sequence classifiers don't write one; keep every tiny dir alike
            gen.save_pretrained(out)
        tokenizer.save_pretrained(out)
    if chat_template:  # as a string in tokenizer_config.json (every transformers version reads it)
        cfg_path = out / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg["chat_template"] = CHAT_TEMPLATE
        cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    stray = sorted(p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if stray or not any(out.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote unexpected weight files in {out}: {stray}")
    return out
