"""Mixed precision for a stock transformers model: the frozen base in bf16/fp16, fp32 adapters.

The frozen weights are stored in the low-precision dtype (half the memory, the fast matmuls);
adapters stay fp32 master weights (``inject_adapters`` creates them so); autocast runs each adapter
matmul in the base dtype against its fp32 weights, and their gradients land in fp32.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen base (its input embeddings), whatever dtype the adapters have."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def _autocast_forward(self, *args, **kwargs):
    """A model's own forward under autocast to its base dtype (bound per instance: deepcopy-safe)."""
    device = next(self.parameters()).device.type
    with torch.autocast(device, dtype=self._mtlora_autocast_dtype):
        return type(self).forward(self, *args, **kwargs)


def apply_precision(model: nn.Module) -> nn.Module:
    """Run the model's forward (and its decoder's) under autocast when the base is bf16/fp16.

    Why autocast on top of a low-precision base: the frozen weights are stored in bf16/fp16 (half
    the memory, the fast matmuls), while adapters stay fp32 master weights
    (``inject_adapters`` creates them so); autocast runs each adapter matmul in the base dtype
    against its fp32 weights, and its gradients land in fp32. The wrapper sits on ``forward``
    itself, so everything *after* the model call (the fp32 cross-entropy, Align-LoRA's moment
    statistics, MeTA's per-task losses) stays outside autocast, in fp32. Idempotent.
    """
    dtype = base_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return model
    modules = [model]
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        modules.append(decoder)
    for module in modules:
        module._mtlora_autocast_dtype = dtype
        if "forward" not in module.__dict__:
            module.forward = types.MethodType(_autocast_forward, module)
    return model
