"""Target-module names per model family: LoRA's roles (``q_proj`` ... ``down_proj``) mapped to
the modules each stock transformers family uses (``mtlora models`` prints the table)."""

from __future__ import annotations

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
