"""Faster kernels for the training step where they help: Liger's RMSNorm/SwiGLU/RoPE
(GPU, when installed), LoRA layers fed bf16 under autocast, and each decoder layer compiled
once with torch.compile.
"""

from __future__ import annotations


def apply_liger(model, log=lambda msg: None) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE kernels on the model (before adapters are added),
    where Liger supports its architecture; False if Liger or a GPU is missing."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )
    except Exception:  # noqa: BLE001
        return False
    if getattr(model.config, "model_type", None) not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return False
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log(f"Liger kernels (RMSNorm, SwiGLU, RoPE) on {model.config.model_type}")
    return True


class adapter_autocast:
    """While active, LoRA layers leave their input in the autocast dtype instead of casting it
    to the adapters' fp32 (peft's default): under bf16 autocast the adapter matmuls run in bf16
    either way, and the cast copied every linear layer's input (~20% of a LoRA step's GPU
    time on Llama-3.2-1B, measured). Adapter weights stay fp32 for the optimizer."""

    def __init__(self, model, active: bool):
        self.layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")] if active else []

    def __enter__(self):
        for m in self.layers:
            m.cast_input_dtype_enabled = False
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.cast_input_dtype_enabled = True
        return False


def compile_layers(model, log=lambda msg: None) -> int:
    """torch.compile every decoder layer in place (regional compilation: the layers share one
    code object, so one compile serves all of them); the token dimension turns dynamic on the
    first new length, so packed micro-batches of any length reuse the graph. Returns how many layers were compiled (0 off CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return 0
    # Every decoder layer shares one code object, so its graphs (training and no-grad
    # validation, static then dynamic shapes, each model a process trains) count against one
    # recompile limit; torch's default of 8 was hit by one test process training 4 models.
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers if hasattr(base, "get_decoder") else []
    for layer in layers:
        layer.compile()
    log(f"torch.compile: {len(layers)} decoder layers (dynamic shapes)")
    return len(layers)
