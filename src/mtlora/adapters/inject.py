"""Model-level injection: find target ``nn.Linear`` modules, wrap them, and manage the wrapped model.

Adapters are plain functions over modules (torchtune style): the model stays the user's stock
transformers model, with some ``nn.Linear`` children replaced by adapter layers. Every adapter
type registers its config and layer class in ``ADAPTER_TYPES``; nothing below depends on which.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from mtlora.adapters.lora import ALL_LINEAR, LoraConfig, LoraLinear
from mtlora.adapters.registry import ADAPTER_TYPES, register_adapter_type  # noqa: F401 (re-exported)
from mtlora.errors import UserError

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


def find_target_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the ``nn.Linear`` modules an adapter config selects (PEFT's matching rules).

    A list matches a module whose full name equals an entry or ends with ``.entry``; a string is a
    regex that must match the full name; ``all-linear`` takes every ``nn.Linear`` except the output
    head. Raises a ``UserError`` when nothing matches, so a typo never trains an empty adapter.
    """
    head = _output_head(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoraLinear):
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
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            "adapter.target_modules",
            f"{target_modules!r} matches no nn.Linear module; this model has {linear}",
        )
    return names


def inject_adapters(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every selected ``nn.Linear`` of ``model`` in the config's adapter layer, in place.

    Freezes every base parameter; only adapter parameters train. Returns the same model, with the
    config kept on ``model.mtlora_config`` for saving.
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
        layer = layer_class(base, config, name=name)
        layer.train(base.training)  # a new module starts in training mode: keep the model's mode
        setattr(parent, child, layer)
    model.mtlora_config = config
    mark_only_adapters_trainable(model)
    return model


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
    """Replace adapter layers by plain ``nn.Linear`` (merged first when ``merge``): export a base model."""
    for name, layer in list(adapter_layers(model)):
        if merge:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    model.mtlora_config = None
    return model
