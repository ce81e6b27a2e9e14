"""A line-by-line port of R-LoRA's released initialisation, the oracle for ``init_scale: repo``.

Source: github.com/jinda-liu/R-LoRA, ``reinit.py`` (``reinit_lora_modules``) and the layer it
re-initialises, ``peft/tuners/lora.py`` (``Linear``: router ``lora_route``, shared ``lora_A``,
heads ``lora_B{i}``, kaiming router init in ``reset_parameters``, ``forward``). Only the branches
the published run takes are kept (``fine-tuning.sh``: ``lora_A=unit lora_B=unit init_scale=stable
stable_gamma=64 --rank_stablization True``); the bf16 cast (``torch_dtype``) is left out because the
tests run in fp32, and ``norm_clip`` is not an argument of that run. Statements, their order and
their indentation (the scale block inside the head loop) are the original's.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn


class RepoLinear(nn.Module):
    """The fields of R-LoRA's ``Linear`` that ``reinit_lora_modules`` and ``forward`` touch."""

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float, lora_nums: int, lora_dropout: float = 0.0):
        super().__init__()
        in_features, out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.r, self.lora_alpha, self.lora_num = r, lora_alpha, lora_nums
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else (lambda x: x)
        self.lora_route = nn.Linear(in_features, self.lora_num, bias=False)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        for i in range(self.lora_num):
            setattr(self, f"lora_B{i}", nn.Linear(r, out_features, bias=False))
        self.scaling = self.lora_alpha / self.r

    def reset_parameters_adapter(self) -> None:
        """``Linear.reset_parameters`` without the base layer's own reset."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        for i in range(self.lora_num):
            nn.init.zeros_(getattr(self, f"lora_B{i}").weight)
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.functional.linear(x, self.weight, bias=self.bias)
        route_weight = nn.functional.softmax(self.lora_route(x), dim=-1, dtype=torch.float32).to(result.dtype)
        for i in range(self.lora_num):
            result = result + torch.unsqueeze(route_weight[:, :, i], -1) * getattr(self, f"lora_B{i}")(
                self.lora_dropout(self.lora_A(x))
            ) * self.scaling
        return result


def fine_tuning_sh_config(stable_gamma: float = 64) -> SimpleNamespace:
    """The ``model_args`` fields ``reinit_lora_modules`` reads, as ``fine-tuning.sh`` sets them."""
    return SimpleNamespace(
        rank_stablization=True, lora_A_init="unit", lora_B_init="unit", init_scale="stable", stable_gamma=stable_gamma
    )


@torch.no_grad()
def reinit_lora_modules(name, module, init_config, **kwargs):
    m_B, n_B = getattr(module, f"lora_B{0}").weight.shape
    b_dim = max(m_B, n_B)
    m_A, n_A = module.lora_A.weight.shape
    lora_r = min(m_A, n_A)
    if init_config.rank_stablization:
        module.scaling = module.lora_alpha / math.sqrt(lora_r)

    match init_config.lora_A_init:
        case "unit":
            a_dim = max(m_A, n_A)
            torch.nn.init.normal_(module.lora_A.weight, mean=0.0, std=1.0 / (a_dim**0.5))
        case _:
            raise ValueError(f"port keeps only the published branch, got {init_config.lora_A_init}")

    for i in range(module.lora_num):
        lora_B = getattr(module, f"lora_B{i}")
        match init_config.lora_B_init:
            case "unit":
                torch.nn.init.normal_(lora_B.weight, mean=0.0, std=1.0 / (b_dim**0.5))
            case _:
                raise ValueError(f"port keeps only the published branch, got {init_config.lora_B_init}")

        if init_config.init_scale == "stable":
            gamma = init_config.stable_gamma
            module.lora_A.weight.data *= (m_A**0.25) / gamma**0.5
            for i in range(module.lora_num):
                lora_B = getattr(module, f"lora_B{i}")
                lora_B.weight.data *= (n_B**0.25) / gamma**0.5

    with torch.no_grad():
        if init_config.lora_B_init != "zero":
            offset = torch.zeros_like(module.weight.data)
            for i in range(module.lora_num):
                lora_B = getattr(module, f"lora_B{i}")
                offset += (lora_B.weight @ module.lora_A.weight).to(module.weight.data.device)
            offset /= module.lora_num
            offset *= module.scaling
            module.weight.data -= offset
