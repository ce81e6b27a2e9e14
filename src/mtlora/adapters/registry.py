"""Adapter types by name: each registers its layer class (which names its config class).

Low in the adapters package so the injector and every adapter family import it, never each other.
``mtlora.adapters`` imports the built-in families, so importing any part of it registers them.
"""

from __future__ import annotations

from typing import Any

ADAPTER_TYPES: dict[str, Any] = {}


def register_adapter_type(method: str, layer_class: Any) -> None:
    ADAPTER_TYPES[method] = layer_class
