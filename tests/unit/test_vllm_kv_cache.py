"""The vLLM KV-cache size (`plan_kv_cache`): explicit settings win, a GPU keeps vLLM's default,
the CPU build gets the cache sized from the model, capped by the RAM it can spare. Pure
functions: no engine is started, vLLM is not needed (one test reads this machine through it)."""

from __future__ import annotations

import pytest

from rlhf.errors import StartupError
from rlhf.policy.engines.vllm import (
    GPU_MEMORY_UTILIZATION,
    KV_BLOCK_TOKENS,
    KV_CACHE_MAX_SEQS,
    GiB,
    kv_cache_bytes_per_token,
    plan_kv_cache,
)

MiB = 1 << 20
# A Qwen2-7B-like shape: 28 layers, 4 KV heads of 128, bf16 → 57,344 bytes per token.
BIG = dict(num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, hidden_size=3584,
           dtype="bfloat16", max_position_embeddings=32768)
# The tiny test policy (rlhf.models.tiny, size "tiny"): 2 layers, 2 KV heads of 32.
TINY = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=128,
            head_dim=32, dtype="float32", max_position_embeddings=512)


def plan(**overrides):
    args = dict(on_cpu=True, kv_cache_space_gb=None, gpu_memory_utilization=None, bytes_per_token=1024,
                max_model_len=512, max_num_seqs=256, total_bytes=24 * GiB, available_bytes=20 * GiB,
                weights_bytes=1 * GiB)
    args.update(overrides)
    return plan_kv_cache(**args)


# ------------------------------------------------------------------------------------------------
# bytes per token
# ------------------------------------------------------------------------------------------------


def test_bytes_per_token_is_layers_kv_heads_head_dim_dtype_times_two():
    assert kv_cache_bytes_per_token(TINY, "float32") == 2 * 2 * 32 * 4 * 2
    assert kv_cache_bytes_per_token(TINY, "bfloat16") == 2 * 2 * 32 * 2 * 2
    # head_dim from hidden_size / heads when the config has none; "auto" reads the checkpoint's
    assert kv_cache_bytes_per_token(BIG, "auto") == 28 * 4 * 128 * 2 * 2 == 57344
    assert kv_cache_bytes_per_token(BIG, "float32") == 57344 * 2


def test_bytes_per_token_defaults():
    mha = dict(num_hidden_layers=3, num_attention_heads=8, hidden_size=256)  # no kv heads, no dtype
    assert kv_cache_bytes_per_token(mha, "auto") == 3 * 8 * 32 * 4 * 2  # all heads, float32
    nested = {"text_config": mha, "dtype": "bfloat16"}
    assert kv_cache_bytes_per_token(nested, "auto") == 3 * 8 * 32 * 2 * 2


# ------------------------------------------------------------------------------------------------
# CPU default: sized from the model
# ------------------------------------------------------------------------------------------------


def test_cpu_default_holds_capped_number_of_full_sequences():
    p = plan()
    assert p.engine_kwargs == {"kv_cache_memory_bytes": 1024 * 512 * KV_CACHE_MAX_SEQS}
    assert "gpu_memory_utilization" not in p.engine_kwargs
    assert f"{KV_CACHE_MAX_SEQS} sequences of 512 tokens" in p.reason


def test_cpu_default_uses_max_num_seqs_below_the_cap():
    p = plan(max_num_seqs=4)
    assert p.engine_kwargs == {"kv_cache_memory_bytes": 1024 * 512 * 4}
    assert "4 sequences" in p.reason


def test_cpu_default_rounds_a_sequence_up_to_whole_blocks():
    p = plan(max_model_len=KV_BLOCK_TOKENS + 1, max_num_seqs=1)
    assert p.engine_kwargs == {"kv_cache_memory_bytes": 1024 * 2 * KV_BLOCK_TOKENS}


def test_cpu_default_takes_at_most_half_the_ram_left_after_the_weights():
    bpt = kv_cache_bytes_per_token(BIG, "auto")
    p = plan(bytes_per_token=bpt, max_model_len=32768, available_bytes=40 * GiB, weights_bytes=15 * GiB)
    # 32 × 32768 tokens × 56 KiB = 56 GiB wanted; half of (40 − 15) GiB = 12.5 GiB spared
    assert p.engine_kwargs == {"kv_cache_memory_bytes": int(12.5 * GiB)}
    assert "56.00 GiB" in p.reason and "12.50 GiB" in p.reason


def test_cpu_default_refuses_when_one_sequence_does_not_fit():
    bpt = kv_cache_bytes_per_token(BIG, "auto")
    with pytest.raises(StartupError) as err:
        plan(bytes_per_token=bpt, max_model_len=32768, available_bytes=17 * GiB, weights_bytes=15 * GiB)
    assert "not enough memory for the KV cache" in err.value.cause
    assert "one sequence of 32768 tokens needs 1.75 GiB" in err.value.cause
    assert err.value.settings == ("vllm_kv_cache_space_gb", "vllm_max_model_len")


# ------------------------------------------------------------------------------------------------
# explicit settings win; GPUs keep vLLM's default
# ------------------------------------------------------------------------------------------------


def test_explicit_kv_cache_space_wins_on_cpu_and_gpu():
    assert plan(kv_cache_space_gb=1.5).engine_kwargs == {"kv_cache_memory_bytes": int(1.5 * GiB)}
    gpu = plan(on_cpu=False, kv_cache_space_gb=2.0, gpu_memory_utilization=0.5)
    assert gpu.engine_kwargs == {"kv_cache_memory_bytes": 2 * GiB}


def test_explicit_kv_cache_space_larger_than_memory_is_refused_on_cpu():
    with pytest.raises(StartupError) as err:
        plan(kv_cache_space_gb=64.0, available_bytes=20 * GiB, weights_bytes=1 * GiB)
    assert "not enough memory for the KV cache: 64.00 GiB asked, 19.00 GiB available" in err.value.cause
    assert err.value.settings == ("vllm_kv_cache_space_gb",)
    # on a GPU vLLM itself checks GPU memory
    assert plan(on_cpu=False, kv_cache_space_gb=64.0).engine_kwargs == {"kv_cache_memory_bytes": 64 * GiB}


def test_explicit_kv_cache_space_below_one_sequence_is_refused():
    with pytest.raises(StartupError) as err:
        plan(kv_cache_space_gb=0.001, bytes_per_token=4096, max_model_len=1024)
    assert "too small" in err.value.cause and "one sequence of 1024 tokens" in err.value.cause


def test_explicit_gpu_memory_utilization_wins():
    assert plan(gpu_memory_utilization=0.3).engine_kwargs == {"gpu_memory_utilization": 0.3}
    assert plan(on_cpu=False, gpu_memory_utilization=0.5).engine_kwargs == {"gpu_memory_utilization": 0.5}


def test_explicit_gpu_memory_utilization_over_available_ram_is_refused_on_cpu():
    with pytest.raises(StartupError) as err:
        plan(gpu_memory_utilization=0.9, total_bytes=24 * GiB, available_bytes=10 * GiB)
    assert "gpu_memory_utilization 0.9" in err.value.cause
    assert err.value.settings[0] == "vllm_gpu_memory_utilization"


def test_gpu_default_is_vllms():
    p = plan(on_cpu=False, total_bytes=0, available_bytes=0, weights_bytes=0)
    assert p.engine_kwargs == {"gpu_memory_utilization": 0.9} and GPU_MEMORY_UTILIZATION == 0.9
    assert "GPU default" in p.reason


# ------------------------------------------------------------------------------------------------
# on this machine (reads vLLM's view of memory; starts nothing)
# ------------------------------------------------------------------------------------------------


def test_kv_cache_plan_on_this_machine_sizes_the_tiny_model(tiny_policy_dir):
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    from rlhf.config import Settings
    from rlhf.policy.engines.vllm import engine_args, kv_cache_plan

    if not current_platform.is_cpu():
        pytest.skip("the CPU sizing applies to vLLM's CPU build")
    settings = Settings(backend="vllm", metrics_port=None)
    p = kv_cache_plan(settings, tiny_policy_dir)
    per_token = 2 * 2 * 32 * 4 * 2  # float32, the settings' default dtype
    assert p.engine_kwargs == {"kv_cache_memory_bytes": per_token * 512 * KV_CACHE_MAX_SEQS}
    args = engine_args(settings, tiny_policy_dir, p)
    assert args.kv_cache_memory_bytes == per_token * 512 * KV_CACHE_MAX_SEQS
    explicit = kv_cache_plan(Settings(backend="vllm", metrics_port=None, vllm_kv_cache_space_gb=1.0),
                             tiny_policy_dir)
    assert explicit.engine_kwargs == {"kv_cache_memory_bytes": 1 * GiB}
