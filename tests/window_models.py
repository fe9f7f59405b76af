"""Tiny sliding-window causal LMs made on the spot (random init, the tiny models' tokenizer),
saved as Hugging Face directories and opened through the normal loading path.

- "mistral": MistralConfig with `sliding_window` (every layer slides; no `layer_types`);
- "qwen2-sliding": Qwen2Config with `use_sliding_window` and max_window_layers=0 (every layer
  slides, named in `layer_types`);
- "qwen2-mixed": Qwen2Config with `use_sliding_window` and max_window_layers=1 (layer 0 full,
  layer 1 sliding).
"""

from __future__ import annotations

from pathlib import Path

ARCHS = ("mistral", "qwen2-sliding", "qwen2-mixed")


def make_window_model(arch: str, out_dir: Path, *, window: int = 4, seed: int = 0) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rlhf.models.tiny import make_tokenizer, quiet_progress_bars

    tok = make_tokenizer()
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch == "mistral":
        cls, cfg = MistralForCausalLM, MistralConfig(**common, sliding_window=window)
    elif arch in ("qwen2-sliding", "qwen2-mixed"):
        cls = Qwen2ForCausalLM
        cfg = Qwen2Config(**common, use_sliding_window=True, sliding_window=window,
                          max_window_layers=0 if arch == "qwen2-sliding" else 1)
    else:
        raise ValueError(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg).float().eval()
    out = Path(out_dir)
    with quiet_progress_bars():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out
