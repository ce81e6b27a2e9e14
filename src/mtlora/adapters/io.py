"""Adapter files in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys follow PEFT: a module path ``model.layers.0.mlp.up_proj`` with tensor ``lora_A.weight`` is
saved as ``base_model.model.model.layers.0.mlp.up_proj.lora_A.weight`` (PEFT drops the adapter name
``default`` when saving). A plain LoRA adapter of ours therefore loads with
``peft.PeftModel.from_pretrained``. Multi-head adapters use the same layout with their own tensor
names and ``peft_type`` set to our method name (PEFT cannot run them; our loader can). Our own
fields (the method's full config, task names, ...) live beside it in ``mtlora_config.json``, so
PEFT reads a config with nothing it does not know.

Files are written to a temporary folder and renamed into place: an interrupted save never
leaves a half-written adapter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mtlora.adapters.inject import (
    adapter_state_dict,
    inject_adapters,
    make_adapter_config,
    uses_fan_in_fan_out,
)
from mtlora.adapters.lora import LoraConfig
from mtlora.errors import UserError
from mtlora.fileio import atomic_write_dir, atomic_write_text

CONFIG_NAME = "adapter_config.json"
OURS_NAME = "mtlora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_type_of(config: LoraConfig) -> str:
    """PEFT's ``peft_type``. A multi-head adapter gets a sentence instead of a type name: stock PEFT
    cannot run it and fails on the unknown type with ``KeyError: <this text>``, which then says why."""
    if config.method == "lora":
        return "LORA"
    return (f"{config.method.upper()}: a multi-head adapter of mtlora ({config.method}); stock PEFT cannot run it. "
            "Load it with mtlora (mtlora.train.load_trained / mtlora eval --adapter)")


def peft_config_dict(config: LoraConfig, base_model: str | None, fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json content: PEFT's LoraConfig fields (``fan_in_fan_out``: GPT-2's Conv1D)."""
    targets = config.target_modules
    return {
        "peft_type": peft_type_of(config),
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": targets if isinstance(targets, str) else sorted(targets),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None,
                 base_model_name: str | None = None) -> Path:
    """Save the injected adapter of ``model`` to ``path`` (a folder), atomically.

    ``base_model_name`` is what ``adapter_config.json`` names as the base (a hub id travels; this
    machine's folder does not); the folder the weights came from goes to ``mtlora_config.json``.
    """
    config: LoraConfig | None = getattr(model, "mtlora_config", None)
    if config is None:
        raise ValueError("model has no adapters to save")
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    local = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_cfg = peft_config_dict(config, base_model_name or local, uses_fan_in_fan_out(model))
    ours = {"adapter": config.to_dict(), **(extra or {})}
    if base_model_name and local and base_model_name != local:
        ours["base_model_path"] = local

    def write(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(peft_cfg, indent=2) + "\n")
        atomic_write_text(tmp / OURS_NAME, json.dumps(ours, indent=2) + "\n")

    atomic_write_dir(Path(path), write)
    return Path(path)


def read_adapter_config(path: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    """Our adapter config (and the extra ``mtlora`` fields) from an adapter folder."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(path, f"not an adapter folder (no {CONFIG_NAME})")
    raw = _read_json(cfg_path)
    ours_path = Path(path) / OURS_NAME
    ours = _read_json(ours_path) if ours_path.is_file() else None
    if ours is None:  # a plain PEFT LoRA adapter: read PEFT's fields
        if raw.get("peft_type") != "LORA" or not all(k in raw for k in ("r", "lora_alpha", "target_modules")):
            raise UserError(cfg_path, f"unsupported peft_type {raw.get('peft_type')!r}; expected LORA")
        adapter = dict(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            use_rslora=raw.get("use_rslora", False),
            target_modules=raw["target_modules"],
        )
        return make_adapter_config("lora", **adapter), {}
    if not isinstance(ours.get("adapter"), dict) or "method" not in ours["adapter"]:
        raise UserError(ours_path, "expected an object with an 'adapter' config naming its 'method'")
    adapter = dict(ours["adapter"])
    method = adapter.pop("method")
    extra = {k: v for k, v in ours.items() if k != "adapter"}
    return make_adapter_config(method, **adapter), extra


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise UserError(path, f"expected a JSON object, got {type(data).__name__}")
        return data
    except json.JSONDecodeError as exc:
        raise UserError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from None
    except UnicodeDecodeError:
        raise UserError(path, "not UTF-8 text; expected a JSON file") from None


def load_adapter(model: nn.Module, path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Inject the adapter saved at ``path`` into ``model`` and load its weights (strict)."""
    config, extra = read_adapter_config(path)
    if not (Path(path) / WEIGHTS_NAME).is_file():
        raise UserError(path, f"adapter folder has no {WEIGHTS_NAME}")
    inject_adapters(model, config)
    load_adapter_weights(model, path)
    return model, extra


def load_adapter_weights(model: nn.Module, path: str | Path) -> None:
    """Copy saved adapter tensors into a model that already holds the same adapter (strict)."""
    weights = Path(path) / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(path, f"adapter folder has no {WEIGHTS_NAME}")
    try:
        loaded = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error type for a truncated or corrupt file
        raise UserError(weights, f"unreadable safetensors file (truncated or corrupt: {str(exc)[:100]})") from None
    for key, tensor in loaded.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise UserError(weights, f"{key}: non-finite values (NaN/inf); the adapter's weights are broken")
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in loaded.items()}
    # PEFT keeps the adapter name in keys of a live model but not in files; accept both spellings.
    saved = {k.replace(".default.", "."): v for k, v in saved.items()}
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(weights, f"adapter does not fit this model: {what}")
    with torch.no_grad():
        for key, tensor in expected.items():
            if tensor.shape != saved[key].shape:
                raise UserError(weights, f"{key}: expected shape {tuple(tensor.shape)}, got {tuple(saved[key].shape)}")
            tensor.copy_(saved[key])
