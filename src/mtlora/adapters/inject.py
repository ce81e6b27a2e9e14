"""Model-level injection: find target ``nn.Linear`` modules, wrap them, and manage the wrapped model.

Adapters are plain functions over modules (torchtune style): the model stays the user's stock
transformers model, with some ``nn.Linear`` children replaced by adapter layers. Every adapter
type registers its config and layer class in ``ADAPTER_TYPES``; nothing below depends on which.

GPT-2's ``Conv1D`` (a linear layer storing its weight as ``(in, out)``) is adapted as PEFT does
with ``fan_in_fan_out``: the adapter layer wraps an ``nn.Linear`` whose weight is the transposed
*view* of the Conv1D weight (no copy; every adapter type and fast path then sees a plain linear
layer), the saved adapter says ``fan_in_fan_out: true`` and has PEFT's tensor shapes, and
``unload`` puts a ``Conv1D`` back, so a merged model saves in the family's own layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from mtlora.adapters.lora import ALL_LINEAR, LoraConfig, LoraLinear
from mtlora.adapters.registry import ADAPTER_TYPES, register_adapter_type  # noqa: F401 (re-exported)
from mtlora.errors import UserError


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D`` (GPT-2), imported when first needed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D

# method name -> layer class (its ``config_class`` gives the config dataclass)
ADAPTER_TYPES["lora"] = LoraLinear


def make_adapter_config(method: str = "lora", **kwargs: Any) -> LoraConfig:
    """Build the config dataclass of ``method`` from keyword arguments, with clear errors."""
    if method not in ADAPTER_TYPES:
        raise UserError("adapter.method", f"unknown adapter type {method!r}; expected one of {sorted(ADAPTER_TYPES)}")
    config_class = ADAPTER_TYPES[method].config_class
    unknown = set(kwargs) - config_class.field_names()
    if unknown:
        raise UserError(
            f"adapter.{sorted(unknown)[0]}",
            f"unknown option for {method}; expected one of {sorted(config_class.field_names() - {'method'})}",
        )
    return config_class(method=method, **kwargs)




def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def _is_linear(module: nn.Module) -> bool:
    """A layer LoRA can adapt: ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2)."""
    if isinstance(module, nn.Linear):
        return True
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``conv`` does, sharing its storage (weight = ``conv.weight.T``)."""
    d_in, d_out = conv.weight.shape
    with torch.device("meta"):
        linear = nn.Linear(d_in, d_out, bias=conv.bias is not None)
    linear.weight = nn.Parameter(conv.weight.detach().T, requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    linear.fan_in_fan_out = True  # a plain attribute: it survives .to() and marks the saved adapter
    linear.train(conv.training)
    return linear


def linear_as_conv1d(linear: nn.Linear) -> nn.Module:
    """The inverse of ``conv1d_as_linear``: a ``Conv1D`` with the (possibly merged) weights."""
    conv = _conv1d_class()(linear.out_features, linear.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    return conv.train(linear.training)


def uses_fan_in_fan_out(model: nn.Module) -> bool:
    """Whether any adapted layer wraps a ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    return any(getattr(layer.base_layer, "fan_in_fan_out", False) for _, layer in adapter_layers(model))


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the linear modules an adapter config selects (PEFT's matching rules).

    A list matches a module whose full name equals an entry or ends with ``.entry``; the role names
    ``q_proj ... down_proj`` are first mapped to the model family's own modules
    (``mtlora.models.MODULE_NAMES``: GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, ...). A
    string is a regex that must match the full name; ``all-linear`` takes every ``nn.Linear`` (and
    ``Conv1D``) except the output head. Raises a ``UserError`` when nothing matches, so a typo never
    trains an empty adapter.
    """
    from mtlora.adapters.families import map_target_modules

    if not isinstance(target_modules, str):
        target_modules = map_target_modules(getattr(getattr(model, "config", None), "model_type", None),
                                            list(target_modules))
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        if not _is_linear(module) or isinstance(module, LoraLinear):
            continue
        if target_modules == ALL_LINEAR:
            hit = module is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and not name.endswith("base_layer"):
            names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        others = sorted({type(m).__name__ for n, m in model.named_modules()
                         if not list(m.children()) and any(n == t or n.endswith("." + t) for t in target_modules)}
                        ) if not isinstance(target_modules, str) else []
        kind = f" (it names {others} modules, which LoRA here cannot adapt)" if others else ""
        raise UserError(
            "adapter.target_modules",
            f"{target_modules!r} matches no nn.Linear module{kind}; this model has {linear}",
        )
    return names


def inject_adapters(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every selected ``nn.Linear`` of ``model`` in the config's adapter layer, in place.

    Freezes every base parameter; only adapter parameters train. Returns the same model, with the
    config kept on ``model.mtlora_config`` for saving. Over a bf16/fp16 base the adapters are fp32
    and the model's forward runs under autocast (``_build_layer``, ``mtlora.models.apply_precision``).
    """
    if getattr(model, "mtlora_config", None) is not None:
        raise ValueError("model already has adapters; load the base model again to inject new ones")
    layer_class = ADAPTER_TYPES[config.method]
    for param in model.parameters():
        param.requires_grad_(False)
    for name in find_target_modules(model, config.target_modules):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):  # Conv1D: adapt its nn.Linear view (module docstring)
            base = conv1d_as_linear(base)
        layer = _build_layer(layer_class, base, config, name)
        layer.train(base.training)  # a new module starts in training mode: keep the model's mode
        setattr(parent, child, layer)
    model.mtlora_config = config
    mark_only_adapters_trainable(model)
    if any(layer.base_layer.weight.dtype != layer.lora_A.weight.dtype for _, layer in adapter_layers(model)):
        from mtlora.adapters.precision import apply_precision

        apply_precision(model)  # fp32 adapters over a bf16/fp16 base compute under autocast
    return model


def _shape_twin(base: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """An ``nn.Linear`` with ``base``'s shape and device but ``dtype``, holding no memory (its weight
    is one expanded element): what an adapter layer reads to create and initialise its weights."""
    w = base.weight
    with torch.device("meta"):
        twin = nn.Linear(base.in_features, base.out_features, bias=False)
    twin.weight = nn.Parameter(torch.zeros((), dtype=dtype, device=w.device).expand(w.shape), requires_grad=False)
    return twin


def _build_layer(layer_class: type[LoraLinear], base: nn.Linear, config: LoraConfig, name: str) -> LoraLinear:
    """The adapter layer around ``base``; over a bf16/fp16 base its weights are fp32 master weights.

    Mixed precision keeps trainable weights (and so AdamW's state) in fp32 and lets autocast
    (``mtlora.models.apply_precision``) run the matmuls in the base dtype. The adapter is created
    and initialised in fp32 directly (around a zero-memory fp32 twin of ``base``), not rounded
    from a bf16 draw: R-LoRA's mean-centred heads must sum to ~0 in fp32.
    """
    if base.weight.dtype not in (torch.bfloat16, torch.float16):
        return layer_class(base, config, name=name)
    layer = layer_class(_shape_twin(base, torch.float32), config, name=name)
    layer.base_layer = base
    return layer


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, Any]:
    """Adapter tensors only (parameters and buffers, never the base layer), keyed by module path."""
    state = {}
    for name, layer in adapter_layers(model):
        for key, tensor in layer.state_dict().items():
            if not key.startswith("base_layer."):
                state[f"{name}.{key}"] = tensor
    return state


def mark_only_adapters_trainable(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        for pname, param in layer.named_parameters():
            param.requires_grad_(not pname.startswith("base_layer."))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for _, p in trainable_parameters(model))
    return trainable, sum(p.numel() for p in model.parameters())


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (inference at base speed; reversible by unmerge)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for _, layer in adapter_layers(model):
        layer.unmerge()


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch adapters off to get the base model's outputs without unloading them."""
    for _, layer in adapter_layers(model):
        layer.disabled = not enabled


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace adapter layers by their base layers (merged first when ``merge``): export a base model.

    A layer that was a ``Conv1D`` becomes one again, so the model saves in its family's layout.
    """
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = layer.base_layer
        setattr(parent, child, linear_as_conv1d(base) if getattr(base, "fan_in_fan_out", False) else base)
    model.mtlora_config = None
    return model
