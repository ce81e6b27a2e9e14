"""LoRA on any ``nn.Linear`` of a stock transformers model: the config and the reference layer.

::

          x ──────────────► W0 (frozen) ─────────────┐
          │                                          + ──► h
          └─► drop ─► A (r x d_in) ─► B (d_out x r) ─┘
                            │            × s,  s = alpha / r   (rsLoRA: alpha / sqrt(r))
                            └─► phi = A drop(x)   (captured for Align-LoRA when asked)

    init: A kaiming-uniform(a=sqrt(5)), B = 0  =>  the initial update B A is exactly zero.

``LoraLinear.reference_forward`` is that picture in four lines of torch, and it is the definition:
every faster route (``backends.py``: one fused autograd node on torch ops, or the C kernels on a CPU)
computes the same thing and is tested against it, outputs and gradients. ``adapter.backend``
chooses the route (``auto``: the fastest one that applies). The dropout mask is one concept with
one home, ``dropout_keep_mask`` below: every route draws it the same way, so a route changes the
speed, never the masks.

The layer keeps PEFT's attribute names (``base_layer``, ``lora_A``, ``lora_B``), so a state dict of
ours maps onto PEFT's adapter file by a fixed prefix (see ``io.py``). Multi-head variants subclass
``LoraLinear`` and override ``_init_adapter`` / ``adapter_delta``; the injector, merge logic,
trainable-parameter marking and I/O are shared.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from mtlora.adapters import backends
from mtlora.adapters.context import current_context
from mtlora.adapters.dropout import InputDropout
from mtlora.errors import UserError

ALL_LINEAR = "all-linear"


@dataclass
class LoraConfig:
    """Plain LoRA. Every multi-head config subclasses this (PEFT style: one dataclass per method)."""

    method: str = field(default="lora", metadata={"help": "adapter type: lora, hydralora, rlora, mlora"})
    r: int = field(default=8, metadata={"help": "rank of the update B A"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: s = alpha / r (or / sqrt(r))"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter input"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilised scaling alpha / sqrt(r)"})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={
            "help": "module names (exact or dotted suffix), a regex matched against the full name, "
            "or 'all-linear' (every nn.Linear but the output head)"
        },
    )

    backend: str = field(
        default="auto",
        metadata={
            "help": "how the layer is computed (the same numbers, tested equal): auto (the fastest that "
            "applies: c, else torch), c (the C kernels for fp32 on a CPU; torch elsewhere), torch "
            "(one fused autograd node on torch ops), reference (LoraLinear.reference_forward, plain ops)"
        },
    )

    def __post_init__(self) -> None:
        if self.backend not in backends.BACKENDS:
            raise UserError("adapter.backend", f"expected one of {', '.join(backends.BACKENDS)}, got {self.backend!r}")
        if not isinstance(self.r, int) or self.r <= 0:
            raise UserError("adapter.r", f"expected a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise UserError("adapter.alpha", f"expected a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("adapter.dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise UserError("adapter.target_modules", f"not a valid regex ({exc})") from exc
        elif not isinstance(self.target_modules, str) and not self.target_modules:
            raise UserError("adapter.target_modules", "expected at least one module name")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class LoraLinear(nn.Module):
    """``h = W0 x + s * B A drop(x)`` around a frozen ``nn.Linear``."""

    config_class: ClassVar[type[LoraConfig]] = LoraConfig

    def __init__(self, base_layer: nn.Linear, config: LoraConfig, name: str = ""):
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.r = config.r
        self.scaling = config.scaling
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_dropout = InputDropout(config.dropout)
        self.backend = config.backend
        self.merged = False
        self.disabled = False
        self._init_adapter(config)

    # --- parameters -----------------------------------------------------------------------------
    def _init_adapter(self, config: LoraConfig) -> None:
        w = self.base_layer.weight
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s * B A`` (d_out x d_in), for merging."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    # --- forward --------------------------------------------------------------------------------
    fused_route: ClassVar[bool] = True
    """Whether the fused routes (``backends.py``) compute this class's maths. A subclass that
    overrides ``adapter_delta`` has maths of its own and runs it as written unless it says otherwise."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter_delta" in cls.__dict__ and "fused_route" not in cls.__dict__:
            cls.fused_route = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.backend == "reference":
            return self.reference_forward(x)
        return backends.forward(self, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``base(x) + s * B(A(drop(x)))``: the definition every route is tested against."""
        return self.base_layer(x) + self.adapter_delta(x)

    def adapter_delta(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The update ``s * B A drop(x)`` in plain ops; with ``base`` (the frozen layer's output) the
        same sum ``base + update`` on the two-node fast ops (``backends.two_node``)."""
        if base is not None:
            return backends.two_node(self, x, base)
        a, b = self._weights()
        phi = self.lora_dropout(x) @ a.mT
        capture = current_context().capture
        if capture is not None:  # Align-LoRA reads the adapter's feature phi = A drop(x)
            capture.append((self.name, phi))
        return self.scaling * (phi @ b.mT)

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)``; under per-example adapters (MeTA-LoRA) each row's own ``(rows, r, d_in)``,
        ``(rows, d_out, r)``."""
        ctx = current_context()
        if ctx.stacked is not None and self.name in ctx.stacked:
            a_stack, b_stack = ctx.stacked[self.name]
            return a_stack.index_select(0, ctx.adapter_index), b_stack.index_select(0, ctx.adapter_index)
        return self.lora_A.weight, self.lora_B.weight

    # --- merge ----------------------------------------------------------------------------------
    def can_merge(self) -> str | None:
        """None if ``delta_weight`` is exact for every input, else the reason it is not."""
        return None

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        reason = self.can_merge()
        if reason is not None:
            raise UserError(self.name, f"cannot merge this adapter into the base: {reason}")
        w = self.base_layer.weight
        w.add_(self.delta_weight().to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_layer.weight
        w.sub_(self.delta_weight().to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"
