"""Multi-head LoRA family (HydraLoRA, R-LoRA, M-LoRA), registered as adapter types on import.

``mtlora.adapters`` imports this package, so ``make_adapter_config("rlora", ...)`` and
``inject_adapters`` know the three methods without an explicit import. See ``layer.py`` for the
maths and ``mtlora.analysis`` for the head-similarity and router-weight analyses of the papers.
"""

from mtlora.adapters.multihead.layer import (
    METHODS,
    MultiHeadLoraConfig,
    MultiHeadLoraLinear,
    router_aux_loss,
)
from mtlora.adapters.registry import register_adapter_type

for _method in METHODS:
    register_adapter_type(_method, MultiHeadLoraLinear)

__all__ = ["METHODS", "MultiHeadLoraConfig", "MultiHeadLoraLinear", "router_aux_loss"]
