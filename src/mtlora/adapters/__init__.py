"""Adapters as plain functions over the modules of a stock transformers model."""

from mtlora.adapters import multihead  # noqa: E402,F401 (registers HydraLoRA / R-LoRA / M-LoRA)
from mtlora.adapters.context import ForwardContext, current_context, forward_context
from mtlora.adapters.inject import (
    ADAPTER_TYPES,
    adapter_layers,
    adapter_state_dict,
    count_parameters,
    find_target_modules,
    inject_adapters,
    make_adapter_config,
    merge_adapters,
    register_adapter_type,
    set_adapters_enabled,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from mtlora.adapters.io import load_adapter, read_adapter_config, save_adapter
from mtlora.adapters.lora import LoraConfig, LoraLinear

__all__ = [
    "ADAPTER_TYPES",
    "ForwardContext",
    "LoraConfig",
    "LoraLinear",
    "adapter_layers",
    "adapter_state_dict",
    "count_parameters",
    "current_context",
    "find_target_modules",
    "forward_context",
    "inject_adapters",
    "load_adapter",
    "make_adapter_config",
    "merge_adapters",
    "read_adapter_config",
    "register_adapter_type",
    "save_adapter",
    "set_adapters_enabled",
    "trainable_parameters",
    "unload",
    "unmerge_adapters",
]
