"""The tiny-model factory and the safe loading path, on real checkpoints made on the spot."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from rlhf.models import tiny  # noqa: E402
from rlhf.models.loading import (  # noqa: E402
    CheckpointNotFound,
    UnsafeCheckpoint,
    check_safe_dir,
    load_causal_lm,
    load_config,
    load_reward_model,
    load_tokenizer,
    max_context,
)
from rlhf.models.tiny import SIZES, make_tiny_model, make_tokenizer, model_config  # noqa: E402


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="module")
def policy_dir(root) -> Path:
    return make_tiny_model("policy", root / "policy", seed=0)


@pytest.fixture(scope="module")
def reward_dir(root) -> Path:
    return make_tiny_model("reward", root / "reward", seed=0)


# --- the factory ----------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_directory(policy_dir, tmp_path):
    # Retrain the tokenizer from scratch (fresh hash maps inside `tokenizers`) for the rebuild.
    tiny._tokenizer_json.cache_clear()
    tiny.synthetic_corpus.cache_clear()
    again = make_tiny_model("policy", tmp_path / "again", seed=0)
    assert again == tmp_path / "again"
    first, second = _digests(policy_dir), _digests(again)
    assert first == second
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(
        first
    )
    assert not [n for n in first if n.endswith((".bin", ".pt", ".pth"))]


def test_different_seed_gives_different_weights(policy_dir, tmp_path):
    other = make_tiny_model("policy", tmp_path / "other", seed=1)
    a = load_file(str(policy_dir / "model.safetensors"))
    b = load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(t.dtype == torch.float32 for t in a.values())
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert "model.embed_tokens.weight" in differing
    # Only the weights change: config and tokenizer do not depend on the seed.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (policy_dir / name).read_bytes() == (other / name).read_bytes()


def test_factory_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model("policy", tmp_path / "p", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tie_embeddings_flag(tmp_path):
    untied = make_tiny_model("policy", tmp_path / "untied", tie_embeddings=False)
    assert json.loads((untied / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(str(untied / "model.safetensors"))


@pytest.mark.parametrize("size", sorted(SIZES))
def test_head_dim_and_context_per_size(size):
    cfg = model_config("policy", size)
    spec = SIZES[size]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert head_dim >= 32  # vLLM's CPU attention needs it
    assert getattr(cfg, "head_dim", head_dim) == head_dim == spec.head_dim
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert max_context(cfg) == spec.max_position_embeddings
    assert cfg.vocab_size == len(make_tokenizer(size))


def test_small_policy_has_about_25m_parameters(tmp_path):
    d = make_tiny_model("policy", tmp_path / "small", size="small", seed=0)
    check_safe_dir(d)
    model = load_causal_lm(d)
    n = sum(p.numel() for p in model.parameters())
    assert 20_000_000 <= n <= 30_000_000, n
    assert model.config.hidden_size == 512 and model.config.num_hidden_layers == 8
    assert max_context(model) == 1024


# --- tokenizer -------------------------------------------------------------------------------


def test_special_tokens_and_ids(policy_dir):
    tok = load_tokenizer(policy_dir)
    cfg = load_config(policy_dir)
    gen = json.loads((policy_dir / "generation_config.json").read_text())
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == tok.pad_token_id == eos == 0
    assert cfg.eos_token_id == cfg.pad_token_id == cfg.bos_token_id == eos
    assert gen["eos_token_id"] == gen["pad_token_id"] == eos
    assert tok.padding_side == "left"
    for i, t in enumerate(("<|endoftext|>", "<|reset|>", "<|im_start|>", "<|im_end|>")):
        assert tok(t, add_special_tokens=False).input_ids == [i]
    ids = tok("no, bad<|reset|>yes, good", add_special_tokens=False).input_ids
    assert ids.count(1) == 1
    assert tok.decode(ids[ids.index(1) + 1 :]) == "yes, good"
    assert len(tok) == cfg.vocab_size


def test_loaded_tokenizer_matches_the_trained_one(policy_dir):
    # AutoTokenizer may rebuild it (transformers 5: as Qwen2Tokenizer, with Qwen2's own
    # pre-tokenizer); the tokenizer is trained under that pipeline, so both agree.
    loaded, trained = load_tokenizer(policy_dir), make_tokenizer()
    texts = list(tiny.synthetic_corpus()[-300:]) + [
        "The cat sat on the mat.  Hello\n\nworld 12345",
        "café naïve 日本 <|im_start|>user\nhi<|im_end|>",
    ]
    for t in texts:
        assert loaded(t).input_ids == trained(t).input_ids, t
        assert loaded.decode(loaded(t).input_ids) == t


def test_common_words_are_single_tokens(policy_dir):
    tok = load_tokenizer(policy_dir)
    words = ["cat", "dog", "red", "blue", "good", "bad", "great", "yes", "no", "please",
             "thanks", "banana", "apple", "the", "mat"]  # fmt: skip
    for w in words:
        assert len(tok(" " + w, add_special_tokens=False).input_ids) == 1, w


# --- loading ---------------------------------------------------------------------------------


def test_policy_loads_and_gives_logits(policy_dir):
    model = load_causal_lm(policy_dir)
    tok = load_tokenizer(policy_dir)
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())  # the trainer needs grads
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("the cat sat on the mat", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_reward_model_returns_one_score_per_sequence(reward_dir):
    cfg = load_config(reward_dir)
    assert cfg.num_labels == 1 and cfg.pad_token_id == 0
    assert cfg.architectures == ["Qwen2ForSequenceClassification"]
    model = load_reward_model(reward_dir)
    tok = load_tokenizer(reward_dir)
    texts = ["a good answer", "the red cat sat on the mat, thanks"]
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**tok(texts[:1], return_tensors="pt")).logits
    assert scores.shape == (2, 1)
    # Left padding does not change the score: it is read at the last real token.
    torch.testing.assert_close(scores[0], alone[0], rtol=1e-4, atol=1e-4)


def test_reward_loader_refuses_a_policy(policy_dir):
    with pytest.raises(ValueError, match="num_labels"):
        load_reward_model(policy_dir)


# --- check_safe_dir --------------------------------------------------------------------------


def test_check_safe_dir_accepts_a_tiny_dir(policy_dir, reward_dir):
    check_safe_dir(policy_dir)
    check_safe_dir(str(reward_dir))


def test_refuses_pickle_weights_beside_safetensors(policy_dir, tmp_path):
    d = shutil.copytree(policy_dir, tmp_path / "m")
    (d / "pytorch_model.bin").write_bytes(b"not loaded, only refused")
    with pytest.raises(UnsafeCheckpoint, match="pytorch_model.bin"):
        check_safe_dir(d)
    with pytest.raises(UnsafeCheckpoint):
        load_causal_lm(d)  # refused before anything is read


@pytest.mark.parametrize("name", ["training_args.bin", "model.pt", "w.pth", "x.pkl", "y.ckpt"])
def test_refuses_each_code_running_suffix(policy_dir, tmp_path, name):
    d = shutil.copytree(policy_dir, tmp_path / "m")
    (d / name).write_bytes(b"")
    with pytest.raises(UnsafeCheckpoint):
        check_safe_dir(d)


def test_refuses_dir_without_safetensors(policy_dir, tmp_path):
    d = shutil.copytree(policy_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(UnsafeCheckpoint, match="safetensors"):
        check_safe_dir(d)


def test_sharded_index(policy_dir, tmp_path):
    d = shutil.copytree(policy_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(str(policy_dir / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {
        "model-00001-of-00002.safetensors": names[:half],
        "model-00002-of-00002.safetensors": names[half:],
    }
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(d / shard), metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    check_safe_dir(d)  # complete: accepted
    model = load_causal_lm(d)
    assert torch.equal(model.model.embed_tokens.weight, tensors["model.embed_tokens.weight"])

    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UnsafeCheckpoint, match="model-00002-of-00002.safetensors"):
        check_safe_dir(d)


def test_missing_dir_or_config(policy_dir, tmp_path):
    with pytest.raises(CheckpointNotFound):
        check_safe_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError, and a ValueError
        load_causal_lm(tmp_path / "nope")
    d = shutil.copytree(policy_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        check_safe_dir(d)


def test_bad_dtype_is_refused(policy_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(policy_dir, dtype="float8")


def test_bfloat16_load(policy_dir):
    model = load_causal_lm(policy_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
