"""Safe checkpoint loading: the one path by which services and the trainer open a model.

Every loader here
- checks the directory first (`check_safe_dir`): safetensors weights only, every shard named by
  an index present, nothing in a format that runs code when read;
- passes `use_safetensors=True`, `trust_remote_code=False` and `local_files_only=True`, so
  nothing is downloaded and no code from the checkpoint runs;
- returns the model in eval mode on the requested device, with gradients left enabled (the
  trainer needs them; services call `.requires_grad_(False)` themselves).

Directories are Hugging Face model directories: a user's checkpoint, a model-store version, or
one made by `rlhf.models.tiny.make_tiny_model`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rlhf_client.datafiles import (  # file checks only: they live with the client (submit)
    REFUSED_SUFFIXES,  # noqa: F401 - re-exported
    SAFETENSORS_INDEX,  # noqa: F401 - re-exported
    CheckpointNotFound,
    UnsafeCheckpoint,
    check_safe_dir,
)

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "UnsafeCheckpoint",
    "CheckpointNotFound",
    "check_safe_dir",
    "check_checkpoint",
    "load_config",
    "load_tokenizer",
    "load_causal_lm",
    "load_reward_model",
    "max_context",
    "resolve_dtype",
    "cpu_has_fast_bf16",
]

_DTYPES = ("float32", "float16", "bfloat16")

log = logging.getLogger(__name__)


def check_checkpoint(model_dir: str | Path) -> None:
    """`check_safe_dir`, plus the manifest's sha256 of every file when the directory is a
    model-store version (has a manifest.json): a tampered version is refused before loading."""
    check_safe_dir(model_dir)
    if (Path(model_dir) / "manifest.json").is_file():
        from rlhf.models.store import verify  # store imports this module

        verify(model_dir)


def load_config(model_dir: str | Path) -> PretrainedConfig:
    """The checkpoint's config (no weights read; no remote code)."""
    from transformers import AutoConfig

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise CheckpointNotFound(f"no config.json in checkpoint directory {d}")
    return AutoConfig.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)


def load_tokenizer(
    model_dir: str | Path, *, padding_side: Literal["left", "right"] = "left"
) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (fast tokenizer via AutoTokenizer, local files only).

    `padding_side` defaults to "left", which batched generation and last-token reward
    scoring want; training code that pads on the right passes "right". A tokenizer with no pad
    token gets its eos token as pad.
    """
    from transformers import AutoTokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointNotFound(f"checkpoint directory not found: {d}")
    tok = AutoTokenizer.from_pretrained(
        str(d), local_files_only=True, trust_remote_code=False, padding_side=padding_side
    )
    tok.padding_side = padding_side
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """A causal LM (policy or reference) from a safe directory, in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    check_checkpoint(model_dir)
    return _load(AutoModelForCausalLM, model_dir, dtype=dtype, device=device)


def load_reward_model(
    model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu"
) -> PreTrainedModel:
    """A sequence-classification reward model with exactly one output (the scalar reward).

    Raises `UnsafeCheckpoint` (a `ValueError`) when the config has `num_labels != 1`. Batches
    are padded with a pad id, so it needs one: the config's `pad_token_id`, else the tokenizer's
    pad (or eos) id; neither raises too. Read rewards with `rlhf.models.reward_head`, which pools
    at each row's last attended token: the model's own forward pools at the last token that is
    not the pad id, which skips a trailing eos when pad == eos.
    """
    from transformers import AutoModelForSequenceClassification

    check_checkpoint(model_dir)
    cfg = load_config(model_dir)
    if cfg.num_labels != 1:
        raise UnsafeCheckpoint(
            f"{model_dir} is not a reward model: it has num_labels={cfg.num_labels}, a reward "
            "model has exactly one output (num_labels=1)"
        )
    pad_id = getattr(cfg, "pad_token_id", None)
    if pad_id is None:
        # The model finds each sequence's last real token through pad_token_id; take the
        # tokenizer's pad (or eos) when the config leaves it out.
        try:
            pad_id = load_tokenizer(model_dir).pad_token_id
        except (OSError, ValueError):
            pad_id = None
        if pad_id is None:
            raise UnsafeCheckpoint(
                f"{model_dir}: the reward model has no pad_token_id in its config and no "
                "pad/eos token in its tokenizer; set config.pad_token_id"
            )
    model = _load(AutoModelForSequenceClassification, model_dir, dtype=dtype, device=device)
    model.config.pad_token_id = pad_id
    return model


def max_context(config: Any) -> int:
    """Longest sequence (prompt + completion, in tokens) the model accepts.

    Takes a config, or anything with a `.config` (a model)."""
    cfg = getattr(config, "config", config)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"config of type {type(cfg).__name__} states no maximum context length")


# ---------------------------------------------------------------------------------------------


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Without them (e.g. an AVX2-only CPU) torch still runs bf16 matmuls, through slow fallback
    kernels: measured 0.4–0.8 GFLOP/s bf16 against 10–33 fp32 on an AVX2 EPYC (bench/dtype.py).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: trust torch's view of the CPU
        import torch

        return torch.backends.cpu.get_cpu_capability() == "AVX512" and bool(
            getattr(torch.backends.mkldnn, "is_available", lambda: False)()
        )
    return bool({"amx_bf16", "avx512_bf16"} & set(flags))


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """The weights dtype a setting (`Settings.dtype`, `RLHF_DTYPE`) means on `device`.

    "float32" / "bfloat16" / "float16" are taken as given (bfloat16 on a CPU without bf16
    matrix instructions works, slowly: a warning says so); "auto" is bfloat16 on CUDA and on
    CPUs with bf16 matrix instructions (`cpu_has_fast_bf16`), float32 elsewhere.
    """
    import torch

    kind = torch.device(device).type
    if dtype == "auto":
        fast = kind == "cuda" or (kind == "cpu" and cpu_has_fast_bf16())
        return "bfloat16" if fast else "float32"
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} or 'auto', got {dtype!r}")
    if dtype == "bfloat16" and kind == "cpu" and not cpu_has_fast_bf16():
        global _warned_slow_bf16
        if not _warned_slow_bf16:
            _warned_slow_bf16 = True
            log.warning("dtype bfloat16 on a CPU without bf16 matrix instructions (no AMX / "
                        "AVX512-BF16): correct but much slower than float32 here")
    return dtype


_warned_slow_bf16 = False


def _torch_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    import torch

    return getattr(torch, resolve_dtype(dtype, device))


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes `dtype=`; older releases take `torch_dtype=`."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _load(auto_cls: Any, model_dir: str | Path, *, dtype: str, device: str) -> PreTrainedModel:
    from transformers.utils import logging as hf_logging

    kwargs = {
        _dtype_kwarg(): _torch_dtype(dtype, device),
        "use_safetensors": True,
        "trust_remote_code": False,
        "local_files_only": True,
    }
    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled:
        hf_logging.disable_progress_bar()
    try:
        model = auto_cls.from_pretrained(str(model_dir), **kwargs)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()
