"""Typed settings: one object per process, built once in the entry point, passed down.

Every field can be set by an environment variable `RLHF_<FIELD>` (upper case) or by the CLI
flag that overrides it. Nothing else in the code base reads `os.environ`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["hf", "vllm"]
DType = Literal["float32", "bfloat16", "float16", "auto"]


class Settings(BaseSettings):
    """All settings of an rlhf process (services, worker, CLI)."""

    model_config = SettingsConfigDict(env_prefix="RLHF_", extra="forbid", validate_default=True)

    # --- network -------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the gRPC server binds (0.0.0.0 in pods).")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        9090, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one, unset disables."
    )
    http_port: int | None = Field(
        None, ge=0, le=65535,
        description="Policy service: port of the OpenAI-compatible HTTP front (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health); 0 picks a free one, unset disables.",
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    otel: bool = Field(
        False, description="OpenTelemetry tracing (the otel extra): spans go over OTLP/gRPC to "
        "the collector the standard OTEL_EXPORTER_OTLP_* variables name (rlhf.tracing).",
    )

    # --- auth ----------------------------------------------------------------------------------
    auth_token: SecretStr | None = Field(
        None, description="Bearer token every RPC must carry (unset: no auth on data RPCs)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin RPCs (LoadVersion); unset: admin RPCs refused."
    )

    # --- gRPC TLS (issue 18, helper D; rlhf.serving.server) --------------------------------------
    # Unset: plaintext. Clients read RLHF_TLS_CA_FILE / RLHF_TLS_CLIENT_CERT_FILE /
    # RLHF_TLS_CLIENT_KEY_FILE / RLHF_TLS_SERVER_NAME (rlhf_client.channel.TlsOptions), not these.
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the gRPC server: set with tls_key_file to "
        "serve TLS instead of plaintext.",
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: set, the server requires client certificates signed "
        "by it (mutual TLS); needs tls_cert_file.",
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="A second, plaintext port serving only grpc.health.v1 "
        "(Kubernetes gRPC probes speak no TLS); 0 picks a free one, unset: none.",
    )

    @model_validator(mode="after")
    def _check_tls(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            missing = "tls_key_file" if self.tls_key_file is None else "tls_cert_file"
            raise ValueError(f"{missing}: TLS needs both tls_cert_file and tls_key_file")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file")
        return self

    # --- limits --------------------------------------------------------------------------------
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Max gRPC message size.")
    max_concurrent_rpcs: int = Field(256, gt=0, description="Beyond this: RESOURCE_EXHAUSTED.")
    max_prompts_per_request: int = Field(64, gt=0, description="Prompts/items per request.")
    max_samples_per_request: int = Field(256, gt=0, description="prompts × n per request.")
    max_new_tokens_limit: int = Field(512, gt=0, description="Upper bound on max_new_tokens.")
    default_max_new_tokens: int = Field(64, gt=0, description="max_new_tokens when unset.")
    drain_grace_s: float = Field(10.0, ge=0, description="SIGTERM: seconds in-flight RPCs get.")

    # --- micro-batching ------------------------------------------------------------------------
    batch_max_size: int = Field(64, gt=0, description="Most sequences in one forward batch.")
    batch_max_tokens: int = Field(65536, gt=0, description="Most padded tokens in one batch.")
    batch_max_wait_ms: float = Field(5.0, ge=0, description="Longest a request waits for company.")
    batch_prefill_chunk: int = Field(
        512, gt=0, description="hf policy: most prompt tokens (rows × columns) of samples joining "
        "a running batch prefilled between two decode steps; longer prompts take several steps."
    )
    share_prompts: bool = Field(
        True, description="Reward/reference: a prompt shared by items of a batch is computed once "
        "(packed forward, shared prefix); false: every item from scratch."
    )

    # --- model ---------------------------------------------------------------------------------
    model_dir: Path | None = Field(None, description="Serve this directory, pinned.")
    model_name: str | None = Field(None, description="Serve this model's active version (registry).")
    store_dir: Path = Field(Path("./model-store"), description="Model store root.")
    backend: Backend = Field("hf", description="Policy engine: hf (transformers) or vllm.")
    device: str = Field("cpu", description="torch device for the hf backend and the trainer.")
    dtype: DType = Field(
        "float32",
        description="Weights dtype of the policy (hf backend), reward and reference services "
        "(logits are upcast to fp32 for log-softmax and sampling; a training job's precision, "
        "its local reference's included, is the job's own `dtype` field). auto: bfloat16 on "
        "CUDA and on CPUs with bf16 matrix instructions (AMX / "
        "AVX512-BF16), else float32 (rlhf.models.loading.resolve_dtype). bfloat16 on a CPU "
        "without them is correct but slower than float32 (docs/benchmarks.md, issue 19).",
    )
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads (unset: torch's default, one per core)."
    )
    swap_poll_s: float = Field(5.0, gt=0, description="Registry poll period (missed events).")

    # --- vLLM engine ---------------------------------------------------------------------------
    vllm_max_model_len: int | None = Field(None, gt=0, description="Engine context length.")
    vllm_gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1,
        description="GPU memory fraction vLLM may use (on CPU builds: fraction of RAM). Unset: "
        "0.9 on a GPU; on the CPU build the KV cache is sized from the model instead.",
    )
    vllm_kv_cache_space_gb: float | None = Field(
        None, gt=0,
        description="KV-cache space in GiB (on CPU: VLLM_CPU_KVCACHE_SPACE). Unset on the CPU "
        "build: room for the context length × min(max_num_seqs, 32) sequences, at most half "
        "the RAM left after the weights.",
    )
    vllm_tensor_parallel_size: int = Field(1, gt=0, description="Tensor-parallel GPUs.")
    vllm_enforce_eager: bool = Field(False, description="Disable CUDA graphs / compilation.")
    vllm_max_num_seqs: int = Field(256, gt=0, description="Most sequences the engine schedules.")
    # LoRA adapter versions on vLLM (issue 20, helper I2; rlhf.policy.engines.vllm / lora)
    vllm_enable_lora: bool = Field(
        False,
        description="Start every vLLM engine with LoRA support, so an adapter version swaps in "
        "without a new engine. An engine started for an adapter version has it anyway.",
    )
    vllm_max_loras: int = Field(
        2, gt=0, description="Adapters one vLLM batch may mix (the serving one + a candidate's probes)."
    )
    vllm_max_lora_rank: int = Field(
        16, gt=0, description="Largest LoRA rank vLLM serves (one of 1, 8, 16, 32, 64, 128, 256, 320, "
        "512); an adapter of a higher rank is refused.",
    )

    # --- queues, registry, trainer -------------------------------------------------------------
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"), description="Redis for queues, registry, jobs."
    )

    # --- trainer: Celery worker, job records, stream consumers (rlhf.trainer) ------------------
    celery_visibility_timeout_s: float = Field(
        3600.0, gt=0,
        description="Redis broker: seconds a delivered, unacked job waits before it is handed to "
        "another worker (a SIGKILLed worker's job). Must exceed the longest job.",
    )
    worker_pool: Literal["prefork", "solo"] = Field(
        "prefork", description="Celery pool: prefork keeps the main process answering pings "
        "(probes) while a job trains in the child; solo runs jobs in the main process.",
    )
    worker_concurrency: int = Field(1, gt=0, description="Jobs one worker runs at a time.")
    worker_soft_shutdown_s: float = Field(
        120.0, ge=0,
        description="SIGTERM: seconds a running job gets to finish before it is cancelled and "
        "requeued (Celery soft shutdown). Keep the pod's grace period above it.",
    )
    job_lease_s: float = Field(
        60.0, gt=0,
        description="A running job holds a lease renewed every third of this; a redelivered copy "
        "of a job whose lease is still held waits instead of running twice.",
    )
    job_max_retries: int = Field(3, ge=0, description="Retries of a job after a transient error.")
    job_record_ttl_s: int = Field(
        30 * 24 * 3600, gt=0, description="How long a finished job's record stays in Redis."
    )
    job_metrics_maxlen: int = Field(
        20_000, gt=0,
        description="Rows a job's history stream (rlhf:job:<id>:metrics, one per progress call) "
        "keeps: the newest; it expires job_record_ttl_s after its last row.",
    )
    job_logging_dir: Path | None = Field(
        None, description="Root of the TensorBoard logs of jobs with report_to tensorboard and no "
        "logging_dir of their own (<root>/<job id>); unset: <store_dir>/.runs.",
    )
    queue_max_deliveries: int = Field(
        5, gt=0, description="A stream entry delivered more often than this is dead-lettered."
    )
    queue_claim_idle_ms: int = Field(
        600_000, gt=0,
        description="Entries pending this long with one consumer are reclaimed by another "
        "(XAUTOCLAIM); a live job's heartbeat keeps its own entries below it.",
    )
    queue_metrics_interval_s: float = Field(
        15.0, gt=0, description="Worker: seconds between queue-depth metric refreshes."
    )
    # retention (rlhf.trainer.queues, "Retention"): nothing is trimmed that a group still needs
    stream_retention_s: float | None = Field(
        24 * 3600.0, ge=0,
        description="Stream entries every consumer group has acked are trimmed once older than "
        "this (by push time; kept meanwhile for audits and re-reads); 0 trims them at once, "
        "unset keeps them (no age bound).",
    )
    stream_max_entries: int | None = Field(
        100_000, gt=0,
        description="A stream longer than this loses its oldest acked entries (unread or "
        "pending ones are kept even past it); unset: no count bound.",
    )
    applied_ids_retention_s: float | None = Field(
        7 * 24 * 3600.0, ge=0,
        description="A group forgets an applied payload id this long after applying it, once it "
        "has finished every entry pushed until then: a duplicate pushed later than this after "
        "the original is applied again. Unset: never forget (the index grows without bound).",
    )
    # --- Redis replication (issue 18, helper E; rlhf_client.redis_conn.wait_replicas) -----------
    redis_min_replicas_ack: int = Field(
        0, ge=0,
        description="After a job commits stream entries (applied ids + XACK), WAIT until this "
        "many Redis replicas have the commit (failing over to one that lacks it would deliver "
        "the entries again); fewer in time: the commit is retried like a Redis outage. 0: no "
        "WAIT (replication stays asynchronous).",
    )
    redis_replicas_ack_timeout_ms: int = Field(
        1000, gt=0, description="How long one WAIT of redis_min_replicas_ack waits (ms).",
    )

    dead_letter_max_entries: int | None = Field(
        10_000, gt=0,
        description="Each dead-letter stream keeps this many newest entries; unset: all.",
    )
    stream_trim_interval_s: float = Field(
        60.0, ge=0,
        description="Worker main process: seconds between trim passes over every stream, dead "
        "letters and applied indexes (jobs also trim the stream they commit to). 0 disables.",
    )
    rollout_claim_idle_ms: int = Field(
        30_000, ge=100,
        description="Rollout workers: a prompt pending this long is claimed again (XAUTOCLAIM), by "
        "any worker: a dead worker's prompts, and a failed attempt's (the retry backoff). A live "
        "worker touches the prompts it works on every third of this.",
    )

    # --- trainer: Redis outages, the reaper, temp dirs, probes (rlhf.trainer) -------------------
    job_redis_wait_s: float = Field(
        600.0, gt=0,
        description="A running job whose Redis goes away keeps training and waits this long "
        "(backoff capped at 10 s) for it to come back at each step that needs it; past that it "
        "gives its Celery message back for redelivery.",
    )
    job_reap_interval_s: float = Field(
        60.0, ge=0,
        description="Worker main process: seconds between reaper passes (re-queue jobs whose "
        "Celery message was lost; remove dead attempts' temp dirs). 0 disables the loop.",
    )
    job_reap_grace_s: float = Field(
        120.0, gt=0,
        description="The reaper re-queues a queued/running job only when its record has not "
        "changed for this long (and its lease is gone, and no message for it exists).",
    )
    job_tmp_dir: Path | None = Field(
        None, description="Root of the jobs' per-attempt temp dirs (checkpoints before publish); "
        "unset: <system temp dir>/rlhf-jobs.",
    )
    worker_heartbeat_file: Path | None = Field(
        None, description="Worker main process: heartbeat file `rlhf worker-probe` checks "
        "(liveness / readiness probes); unset: none written.",
    )
    worker_heartbeat_s: float = Field(
        10.0, gt=0, description="Worker: seconds between heartbeat writes; a heartbeat older "
        "than 3 × this is stale.",
    )

    @model_validator(mode="after")
    def _check(self) -> "Settings":
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_limit")
        if self.model_dir is not None and self.model_name is not None:
            raise ValueError("set model_dir (pinned) or model_name (follow the registry), not both")
        if self.queue_claim_idle_ms < 1000 * self.job_lease_s:
            raise ValueError(
                "queue_claim_idle_ms must be at least job_lease_s (in ms): a live job touches its "
                "entries every third of its lease, so only a dead job's entries go idle that long"
            )
        return self

    def redacted(self) -> dict:
        """The settings as a dict fit for logs: secrets masked."""
        out = {}
        for key, value in self.model_dump().items():
            out[key] = "***" if isinstance(value, SecretStr) and value is not None else value
            if isinstance(value, Path):
                out[key] = str(value)
        return out
