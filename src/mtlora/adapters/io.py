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
import os
import shutil
import tempfile
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

CONFIG_NAME = "adapter_config.json"
OURS_NAME = "mtlora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_config_dict(config: LoraConfig, base_model: str | None, fan_in_fan_out: bool = False) -> dict:
    """The adapter_config.json content: PEFT's LoraConfig fields (``fan_in_fan_out``: GPT-2's Conv1D)."""
    targets = config.target_modules
    return {
        "peft_type": "LORA" if config.method == "lora" else config.method.upper(),
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


def atomic_write_dir(target: Path, write) -> None:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``target`` (replacing an older one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_adapter(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Save the injected adapter of ``model`` to ``path`` (a folder), atomically."""
    config: LoraConfig | None = getattr(model, "mtlora_config", None)
    if config is None:
        raise ValueError("model has no adapters to save")
    state = {PEFT_PREFIX + k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    peft_cfg = peft_config_dict(config, base, uses_fan_in_fan_out(model))
    ours = {"adapter": config.to_dict(), **(extra or {})}

    def write(tmp: Path) -> None:
        save_file(state, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2) + "\n")
        (tmp / OURS_NAME).write_text(json.dumps(ours, indent=2) + "\n")

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
        if raw.get("peft_type") != "LORA":
            raise UserError(cfg_path, f"unsupported peft_type {raw.get('peft_type')!r}; expected LORA")
        adapter = dict(
            r=raw["r"],
            alpha=raw["lora_alpha"],
            dropout=raw.get("lora_dropout", 0.0),
            use_rslora=raw.get("use_rslora", False),
            target_modules=raw["target_modules"],
        )
        return make_adapter_config("lora", **adapter), {}
    adapter = dict(ours["adapter"])
    method = adapter.pop("method")
    extra = {k: v for k, v in ours.items() if k != "adapter"}
    return make_adapter_config(method, **adapter), extra


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(path, f"invalid JSON ({exc.msg})", line=exc.lineno) from exc


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
    saved = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
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
