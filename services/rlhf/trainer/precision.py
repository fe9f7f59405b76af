"""Training precision and memory: the one place that turns a job's `dtype` and
`gradient_checkpointing` into the model it trains, the optimizer that steps it and the autocast
context its forward passes run under. Every job type (DPO, the PPO family, SFT, reward model)
builds its models through `Precision`, so later ways of training (adapters, data-parallel
wrappers) have one place to hook into: `Precision.prepare`.

`dtype` (a job spec field; `rlhf_client.jobspecs.TRAINING_DTYPES`):
- `float32` (default): fp32 weights, gradients, optimizer state and arithmetic.
- `bf16-mixed`: fp32 master weights, gradients and AdamW state; every forward pass (and so its
  backward) of the job runs under `torch.autocast(<job device>, bfloat16)`: matmuls in bf16,
  reductions and norms as autocast keeps them (fp32). On a CPU without bf16 matrix instructions
  (no AMX / AVX512-BF16) this is correct but slower than float32 (`loading.cpu_has_fast_bf16`).
- `bfloat16`: pure bf16 — weights, gradients and AdamW's moments in bf16 (half the memory of
  each). Caveat: an update smaller than half a bf16 step of the weight it applies to (8 bits of
  mantissa: ~0.4 % of the weight) rounds away to nothing, so with the small learning rates of
  preference tuning (1e-6 on weights of ~1e-2) most updates are lost; there is no fp32 master
  copy, Kahan summation or stochastic rounding here. Use it where memory rules out the rest and
  the learning rate is large enough, and prefer `bf16-mixed` otherwise. A checkpoint it
  publishes holds bf16 weights.

Whatever the weights, log-probs are taken from fp32 logits and an fp32 log-softmax (the fused
head of `rlhf.trainer.logprobs` leaves autocast off for the LM head), and DPO's local reference
is computed in the job's own precision (`reference_precision`), so the reference terms are the
policy's own at step 0.

`gradient_checkpointing`: `model.gradient_checkpointing_enable(use_reentrant=False)` and
`config.use_cache = False`: each decoder layer's activations are recomputed in backward instead
of kept (memory for compute). transformers checkpoints a layer only while that layer is in
training mode and the trainers keep their models in eval mode (no dropout: policy and reference
compared like for like), so `prepare` sets the training flag of the checkpointed layers alone
(`_arm_checkpointed_layers`); their submodules (attention, dropout) stay in eval mode.

`lora` (issue 20): `prepare` wraps the model in a fresh peft LoRA adapter (`with_lora`): the
base frozen, the adapter (and a sequence classifier's `score` head, `modules_to_save`)
trainable, so `make_optimizer` (trainable parameters only) steps the adapter alone. Saved with
`save_pretrained`, the model writes the adapter alone, and the job publishes an adapter version
(`rlhf.models.adapters`). A DPO job's reference is then the policy with its adapter off
(`dpo.AdapterOffReference`); `reference_precision` carries no `lora`. A PPO job's critic keeps
full weights (`prepare(critic, adapter=False)`).

The job records what it used (`Precision.record()`) in its metrics — the job record and the
published version's manifest: `dtype`, `weights_dtype`, `compute_dtype`,
`gradient_checkpointing`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

if TYPE_CHECKING:
    import torch

__all__ = ["DTYPES", "Precision", "make_optimizer"]

#: The job spec's `dtype` values (kept equal to `rlhf_client.jobspecs.TRAINING_DTYPES` by a test).
DTYPES = ("float32", "bf16-mixed", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """How a job's models are built and run: `dtype` (one of `DTYPES`), gradient checkpointing,
    the torch device."""

    dtype: str = "float32"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    #: LoRA (issue 20): the spec's `lora` as a dict (r, alpha, dropout, target_modules), or None
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")

    @classmethod
    def of(cls, spec: Any, device: str = "cpu") -> "Precision":
        """A job spec's precision (a spec without the fields: float32, no checkpointing)."""
        lora = getattr(spec, "lora", None)
        return cls(getattr(spec, "dtype", "float32"),
                   bool(getattr(spec, "gradient_checkpointing", False)), device,
                   lora.model_dump(mode="json") if hasattr(lora, "model_dump") else lora)

    @property
    def weights_dtype(self) -> str:
        """The dtype the weights (and gradients, optimizer state) are held in."""
        return "bfloat16" if self.dtype == "bfloat16" else "float32"

    @property
    def compute_dtype(self) -> str:
        """The dtype the matmuls run in: what a reference must match (`ReferenceSource.dtype`)."""
        return "float32" if self.dtype == "float32" else "bfloat16"

    @property
    def mixed(self) -> bool:
        return self.dtype == "bf16-mixed"

    def autocast(self) -> ContextManager:
        """The context every forward pass of the job runs in: bf16 autocast on the job's device
        for `bf16-mixed`, nothing otherwise. Call `backward()` outside it."""
        if not self.mixed:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)

    # --- models ----------------------------------------------------------------------------

    def load_causal_lm(self, model_dir: str | Path):
        """A policy to train: weights in `weights_dtype` on the device, eval mode, prepared."""
        from rlhf.models.loading import load_causal_lm

        return self.prepare(load_causal_lm(model_dir, dtype=self.weights_dtype,
                                           device=self.device).eval())

    def load_reward_model(self, model_dir: str | Path):
        """A sequence classifier to train (reward model, critic), like `load_causal_lm`."""
        from rlhf.models.loading import load_reward_model

        return self.prepare(load_reward_model(model_dir, dtype=self.weights_dtype,
                                              device=self.device).eval())

    def prepare(self, model, *, adapter: bool = True):
        """Make a loaded model trainable the job's way: weights cast to `weights_dtype`;
        gradient checkpointing (non-reentrant, no KV cache) when asked; with `lora` (and
        `adapter`), wrapped in a trainable LoRA adapter (`with_lora`: a peft model whose base
        is frozen). Call it after setting the model's mode (`eval()` / `train()`). Returns the
        model."""
        import torch

        want = getattr(torch, self.weights_dtype)
        if next(model.parameters()).dtype != want:
            model.to(dtype=want)
        if self.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"gradient_checkpointing: {type(model).__name__} does not "
                                 "support gradient checkpointing")
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
            _arm_checkpointed_layers(model)
        if self.lora is not None and adapter:
            model = with_lora(model, self.lora, self.gradient_checkpointing)
        return model

    def record(self) -> dict[str, Any]:
        """What the job used, for its metrics (job record, version manifest)."""
        out = {"dtype": self.dtype, "weights_dtype": self.weights_dtype,
               "compute_dtype": self.compute_dtype,
               "gradient_checkpointing": self.gradient_checkpointing}
        if self.lora is not None:
            out["lora"] = dict(self.lora)
        return out

    def reference_precision(self) -> "Precision":
        """How a local reference is computed for this job: the same dtype, no checkpointing
        (it runs without gradients)."""
        return Precision(self.dtype, False, self.device)


def with_lora(model, lora: dict[str, Any], gradient_checkpointing: bool = False):
    """`model` wrapped in a fresh trainable LoRA adapter (peft `get_peft_model`): the base's
    parameters frozen, the adapter's trainable (peft keeps them fp32 over a bf16 base), and for a
    sequence classifier (reward model, critic) its `score` head trainable too (peft
    `modules_to_save`: a trained copy saved with the adapter). The base's modes are kept (eval:
    no dropout in the base); the adapter's dropout runs in training mode. Save it with
    `save_pretrained` (the adapter alone, safetensors); the adapter off (`disable_adapter()`)
    is the base, the reference of an adapter job."""
    import torch
    from peft import LoraConfig, get_peft_model

    seq_cls = type(model).__name__.endswith("ForSequenceClassification")
    targets = lora.get("target_modules", "all-linear")
    config = LoraConfig(
        r=int(lora.get("r", 8)), lora_alpha=float(lora.get("alpha", 16.0)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM",
        modules_to_save=["score"] if seq_cls else None)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed inputs need grad with a frozen embedding
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the base model
        raise ValueError(f"lora.target_modules: {e}") from None
    for name, module in peft_model.named_modules():
        if ".lora_dropout." in name and isinstance(module, torch.nn.Dropout):
            module.train()  # active in training steps; peft creates it so, kept explicit
    return peft_model


def _arm_checkpointed_layers(model) -> None:
    """transformers checkpoints a layer only when `layer.training` is set; set it on the
    checkpointed layers alone (not their submodules), so dropout stays off in eval mode. A
    later `model.eval()` / `model.train()` sets it as usual."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and \
                getattr(module, "_gradient_checkpointing_func", None) is not None:
            module.training = True


def make_optimizer(model, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                   weight_decay: float = 0.0) -> "torch.optim.Optimizer":
    """torch AdamW over the model's trainable parameters (the fused kernel where the
    parameters' device and dtype support it, else the default); weight decay on weight matrices
    only (not on biases, norms). Its state takes the parameters' dtype (bf16 for a pure bf16
    job: see the module's caveat)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError):  # a device / dtype without the fused kernel
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
