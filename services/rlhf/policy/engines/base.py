"""The one seam between transport and compute: every policy backend implements `PolicyEngine`.

The servicer and the generator talk only to this protocol; `hf.py` (transformers) and `vllm.py`
(vLLM's AsyncLLM) implement it. Heavy imports stay inside each backend module.

Contract every engine keeps (tests hold both backends to it):
- `generate` yields `SampleDelta`s for the given samples, each sample's deltas in order, its last
  one with `finish` set: EOS (model eos token, included in token_ids), STOP (a stop id, included;
  or a stop string in the decoded text), LENGTH (max_new_tokens), ABORT (cancelled).
- eos and stop ids cannot end a sample before `min_new_tokens` tokens.
- greedy is `params.greedy` (temperature below 1e-5, 0 included); otherwise tokens are drawn
  from softmax(logits / T) restricted to the top-k tokens and then to the smallest nucleus
  (by descending probability) whose mass reaches top-p.
- log-probs are log π(token | context) under the raw model distribution (temperature 1, before
  top-k / top-p), equal to a teacher-forced forward pass of the same checkpoint.
- with `params.return_prompt_logprobs`: the first delta of at least one sample of each prompt
  carries `prompt_logprobs`, log π(prompt[i + 1] | prompt[:i + 1]) for each prompt token after
  the first (a teacher-forced pass of the prompt on the model the sample runs on; raw
  distribution, as every log-prob here).
- with `params.reset_token_id`: stop strings are matched on the text after the last reset token
  only; and when log-probs are asked and a sample contains the reset token, its last delta
  carries `kept_logprobs` (the tokens after the last reset token, teacher-forced with the prompt
  and those tokens only as context) computed on the model that generated the sample.
- a sample with a seed draws the same tokens every time it is asked with that seed.
- when the consumer stops iterating (client cancelled, deadline passed), the engine stops all
  work for those samples.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol, Sequence, runtime_checkable

from rlhf.models.info import ModelInfo
from rlhf.policy.types import SampleDelta, SampleSpec, SamplingConfig


@runtime_checkable
class PolicyEngine(Protocol):
    """A loaded policy model that generates."""

    @property
    def info(self) -> ModelInfo:
        """The model and version serving new requests."""
        ...

    @property
    def tokenizer(self):
        """The model's Hugging Face tokenizer (used for text prompts and decoding)."""
        ...

    async def start(self) -> None:
        """Load the model and warm it up; health turns SERVING only after this returns."""
        ...

    def generate(self, samples: Sequence[SampleSpec], params: SamplingConfig) -> AsyncIterator[SampleDelta]:
        """Generate every sample; see the module docstring for the contract."""
        ...

    async def load_version(self, model_dir, ref) -> None:
        """Swap to the checkpoint in `model_dir` (named `ref`); on failure the old one stays."""
        ...

    def health(self) -> bool:
        """True while the engine can serve."""
        ...

    async def close(self) -> None:
        """Stop background work and free the model."""
        ...
