"""The reward of a token sequence: a sequence classifier's score at its last real token.

transformers' `*ForSequenceClassification` pools at the rightmost token that is not the pad id.
When the pad id is also eos (Qwen2, Llama, GPT-2 ... and the tiny models) a sequence that ends
with eos is scored at the token before it, so score(ids + [eos]) == score(ids): the model cannot
tell a finished response from one cut off, and training cannot teach it to. The pooled position
here is each row's last attended position (the attention mask's last 1) instead, whatever the
token there is; on a sequence without a trailing pad id it is the position transformers pools.

Every service and trainer that reads a reward goes through `sequence_rewards` (scorer, reward
model training, golden probes), so they agree on every sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["sequence_rewards"]


def _linear_score_head(model):
    """The model's `score` head when the reward is exactly `score(hidden state)` (the layout of
    every decoder `*ForSequenceClassification` in transformers), else None."""
    import torch

    head = getattr(model, "score", None)
    # a LoRA reward model (peft) keeps its trained head in a wrapper around the original linear
    plain = getattr(head, "original_module", head)
    if not isinstance(plain, torch.nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    return head


def sequence_rewards(model, input_ids: "torch.Tensor",
                     attention_mask: "torch.Tensor") -> "torch.Tensor":
    """Rewards `(B,)` (the model's dtype, graph attached when grad is on) of `(B, T)` rows, each
    read at its last attended position (right or left padding alike).

    Runs the backbone once and the score head only on the B pooled hidden states. A model whose
    head is not a plain `score` linear layer (an encoder that pools elsewhere) keeps its own
    forward and pooling.
    """
    import torch

    if hasattr(model, "get_base_model"):  # a peft model: its adapters live in the layers
        model = model.get_base_model()
    head = _linear_score_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
    mask = attention_mask.to(torch.long)
    index = torch.arange(mask.shape[1], device=mask.device)
    last = (index[None, :] * mask).argmax(-1)  # (B,) the last position with mask 1
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state  # (B, T, H)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]
    return head(pooled)[:, 0]  # (B,)
