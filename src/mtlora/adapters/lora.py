"""LoRA on any ``nn.Linear`` of a stock transformers model.

::

          x ──────────────► W0 (frozen) ─────────────┐
          │                                          + ──► h
          └─► drop ─► A (r x d_in) ─► B (d_out x r) ─┘
                            │            × s,  s = alpha / r   (rsLoRA: alpha / sqrt(r))
                            └─► phi = A drop(x)   (captured for Align-LoRA when asked)

    init: A kaiming-uniform(a=sqrt(5)), B = 0  =>  the initial update B A is exactly zero.

The layer keeps PEFT's attribute names (``base_layer``, ``lora_A``, ``lora_B``), so a state dict of
ours maps onto PEFT's adapter file by a fixed prefix (see ``io.py``). Multi-head variants subclass
``LoraLinear`` and override ``_init_adapter`` / ``adapter_delta``; the injector, merge logic,
trainable-parameter marking and I/O are shared.

Speed (``docs/performance.md``): a plain LoRA layer runs as one autograd function with its frozen
layer (``_FusedLoraLinear``: without dropout its input gradient is one GEMM against ``W0 + s B A``).
The multi-head family uses two small functions: ``project_kept`` computes ``A (x * keep)`` but
keeps only the 1-byte dropout mask for backward; ``add_low_rank`` accumulates ``s * B phi`` into the
frozen layer's output in place and forms its backward products in the layout CPU BLAS runs
fastest for a rank-r factor.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters import kernels
from mtlora.adapters.context import current_context
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

    def __post_init__(self) -> None:
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


def dropout_draw(p: float) -> tuple[int, int, float]:
    """One dropout draw for one layer: ``(seed, drop16, rescale)``.

    The mask itself is a function of ``seed`` (``kernels.keep_mask``: element i is dropped when its
    16-bit half of a keyed hash of i // 2 falls below ``drop16 = round(p * 65536)``, an exact Bernoulli
    draw with ``p`` realised to 1/65536, 0.05 -> 0.0500031, rescaled by that realised rate). The
    seed comes from torch's generator, so ``torch.manual_seed`` fixes the masks, checkpoints
    restore them (the trainer saves torch's RNG state) and activation checkpointing replays them;
    the C kernel forms the mask in its forward pass over ``x`` and keeps it packed at 1 bit per
    element for backward (``_FusedLoraLinear``).
    """
    drop16 = round(p * 65536)
    seed = int(torch.randint(0, 2**62, (1,)))
    return seed, drop16, 65536.0 / (65536 - drop16)


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep mask shaped like ``x`` (bool) and the rescale ``1 / (1 - p)`` it needs.

    On CPU the mask comes from ``dropout_draw`` (see there; 0.12 ms per 1024 x 576 mask with the C
    kernel vs 2.0 ms for ``torch.rand(...) >= p``, docs/performance.md); elsewhere ``torch.rand``.
    """
    if x.device.type != "cpu":
        return torch.rand_like(x, dtype=torch.float32) >= p, 1.0 / (1.0 - p)
    seed, drop16, rescale = dropout_draw(p)
    return kernels.keep_mask(x.shape, seed, drop16).view(torch.bool), rescale


class InputDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``dropout_keep_mask`` (cheap on CPU, see there).

    ``keep_mask(x)`` returns the mask (uint8, or None when nothing is dropped) and the rescale
    separately, so a layer can project ``x * keep`` without keeping it (``project_kept``) and apply
    the rescale after its ``r``-wide projection instead of over the ``d_in``-wide input.
    """

    def keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        if not self.training or self.p == 0:
            return None, 1.0
        keep, rescale = dropout_keep_mask(x, self.p)
        return keep.view(torch.uint8), rescale  # uint8, not bool: its cast to float is vectorised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, rescale = self.keep_mask(x)
        return x if keep is None else x * keep * rescale


class _MaskedDown(torch.autograd.Function):
    """``(x * keep) @ A.T`` that keeps the 1-byte mask for backward instead of the masked input.

    Autograd of ``F.linear(x * keep, A)`` would save ``x * keep``: a fresh 4-byte copy of every
    adapted layer's input (q, k and v each keep their own), ~600 MB per SmolLM2 step of 8 x 128
    tokens. Here backward re-forms ``x * keep`` from ``x`` (alive anyway) and the mask.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, keep, a)  # the inputs, so a second-order backward reaches them
        return (x * keep) @ a.mT

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, keep, a = ctx.saved_tensors
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ a) * keep
        if ctx.needs_input_grad[2]:
            grad_a = g.reshape(-1, g.shape[-1]).mT @ (x * keep).reshape(-1, x.shape[-1])
        return grad_x, None, grad_a


def project_kept(x: torch.Tensor, keep: torch.Tensor | None, a: torch.Tensor) -> torch.Tensor:
    """``F.linear(x * keep, a)`` (``keep`` None: no dropout), the adapter's down-projection."""
    if keep is None:
        return F.linear(x, a)
    if torch.is_autocast_enabled(x.device.type) or x.dtype != a.dtype:
        return F.linear(x * keep, a)
    return _MaskedDown.apply(x, keep, a)


def _grouped(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``t`` as ``(tokens, width)``, or ``(n, tokens per adapter, width)`` for n stacked ``b``."""
    return t.reshape(-1, t.shape[-1]) if b.dim() == 2 else t.reshape(b.shape[0], -1, t.shape[-1])


class _LowRankUp(torch.autograd.Function):
    """``base + s * z @ B.T`` for a thin ``z`` (..., k), k = r (LoRA) or N * r (all heads at once).

    ``B`` is one ``(d_out, k)`` matrix, or n stacked ``(n, d_out, k)`` (per-example adapters: the
    rows of ``z`` / ``base`` split into n equal consecutive groups, group i uses ``B[i]``).

    The same maths as ``base + s * F.linear(z, B)``, arranged for speed (``benchmarks/train_step.py``):
    the GEMM accumulates into ``base`` in place (``addmm_``; ``base`` is the frozen layer's fresh
    output, which nothing else keeps) and the backward forms its two thin products as
    ``(B.T @ g.T).T`` and ``(z.T @ g).T``: a k-row GEMM that CPU BLAS runs ~3x faster than the
    k-column ``g @ B`` / ``g.T @ z`` autograd would issue (1024 tokens, k = 8, d_out = 1536).
    """

    @staticmethod
    def forward(ctx, base: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        if b.dim() == 2:
            _grouped(base, b).addmm_(_grouped(z, b), b.mT, alpha=scale)
        else:
            _grouped(base, b).baddbmm_(_grouped(z, b), b.mT, alpha=scale)
        ctx.mark_dirty(base)
        ctx.save_for_backward(z, b)  # the inputs themselves, so a second-order backward reaches them
        ctx.scale = scale
        return base

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        z, b = ctx.saved_tensors
        zg, gg = _grouped(z, b), _grouped(g, b)
        grad_z = grad_b = None
        if ctx.needs_input_grad[1]:
            grad_z = _up_grad_z(gg, b, ctx.scale).reshape(z.shape)
        if ctx.needs_input_grad[2]:
            grad_b = _up_grad_b(zg, gg, ctx.scale)
        return (g if ctx.needs_input_grad[0] else None), grad_z, grad_b, None


def _up_grad_z(g: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * g @ B`` formed as the k-row GEMM ``(B.T @ g.T).T`` (see ``_LowRankUp``)."""
    return (b.mT.contiguous() @ g.mT).mT.mul(scale)


def _up_grad_b(z: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * g.T @ z`` formed as the k-row GEMM ``(z.T @ g).T`` (see ``_LowRankUp``)."""
    return (z.mT @ g).mT.mul(scale).contiguous()


def add_low_rank(base: torch.Tensor, z: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * z @ b.T``: the up-projection every adapter type ends with (see ``_LowRankUp``
    for stacked ``b``)."""
    if (
        torch.is_autocast_enabled(z.device.type)
        or not base.dtype == z.dtype == b.dtype
        or not base.is_contiguous()
        or base._base is not None  # a view of something else: do not write into it
        or (base.is_leaf and base.requires_grad)
    ):  # the plain formula; autocast / dtype promotion decide the precision
        delta = (_grouped(z, b) @ b.mT).reshape(base.shape)
        return base + (delta * scale).to(base.dtype)
    return _LowRankUp.apply(base, z, b, scale)


class _FusedLoraLinear(torch.autograd.Function):
    """The whole adapted layer, ``x W0.T + bias + s * phi B.T`` with ``phi = rescale * (x * keep) A.T``,
    as one function returning ``(output, phi)`` (``phi`` is the feature Align-LoRA reads).

    Why: with the frozen layer and the adapter as separate autograd nodes, backward forms the
    adapter's share of ``grad_x`` as its own ``tokens x d_in`` product and autograd then sums it
    with the frozen layer's: extra full-width passes per adapted layer. Measured:
    ``fused_over_two_node`` 0.94-0.99 in ``benchmarks/train_step.py`` (2026-11-28, with the C
    kernels, which only this form uses; docs/performance.md). For float32 on CPU the C kernels
    (``kernels.py``) do the adapter's side: the forward forms ``A (x * m)`` with the dropout mask
    hashed from ``seed`` / ``drop16`` (``dropout_draw``; ``drop16 = 0``: no dropout, nothing hashed)
    and keeps the mask packed (1 bit per element); the backward writes the masked share of
    ``grad_x`` and forms ``grad_A`` in one pass over ``x``, and the frozen layer's GEMM then adds
    ``g W0`` into it. Elsewhere (no compiler, another dtype or device, a second-order backward),
    torch ops: without dropout ``grad_x = g (W0 + s B A)``, one GEMM against a weight-sized matrix
    (the dense ``B A`` costs a ``tokens / r`` fraction of that GEMM); with an explicit uint8 ``keep``
    mask the masked share is accumulated in place. ``python benchmarks/train_step.py``
    measures the step; ``LoraLinear.forward`` falls back to the two-node form wherever this one
    would change behaviour (hooks on the frozen layer, autocast, stacked adapters). The choice never
    depends on ``capture``: activation checkpointing recomputes a block without the context, and
    the recomputation must save the same tensors as the first pass.
    """

    @staticmethod
    def forward(ctx, x, keep, w0, bias, a, b, scale: float, rescale: float, seed: int | None = None, drop16: int = 0):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.seed, ctx.drop16, bits = None, drop16, None
        if seed is not None and kernels.usable(x2, w0, a, b, *([] if bias is None else [bias])):
            out, z, bits = kernels.lora_forward(x2, a, b, bias, seed, drop16, rescale, scale)
            ctx.seed = seed
        else:
            if seed is not None and drop16 > 0:
                keep = kernels.keep_mask(x.shape, seed, drop16)
            xk = x2 if keep is None else x2 * keep.reshape(x2.shape)
            z = (a @ xk.mT).mT  # an r-row GEMM: 0.6x the time of xk @ a.mT on CPU BLAS (adapter_kernels.py)
            if rescale != 1.0:
                z.mul_(rescale)
            sb = (b * scale).mT
            out = torch.addmm(bias, z, sb) if bias is not None else z @ sb
        # the thin product first, then the frozen layer's GEMM accumulates into it (beta = 1): adding
        # the thin product afterwards re-read the GEMM's freshly written output from memory
        out.addmm_(x2, w0.mT)
        ctx.save_for_backward(x, keep, w0, a, b, z, bits)
        ctx.scale, ctx.rescale = scale, rescale
        ctx.set_materialize_grads(False)  # phi is usually unused: a zero g_phi would cost the W_eff path
        return out.reshape(*x.shape[:-1], w0.shape[0]), z.reshape(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, g, g_phi):
        x, keep, w0, a, b, z, bits = ctx.saved_tensors
        s, rescale = ctx.scale, ctx.rescale
        if g is None:  # only phi reached the loss (rare): the output's gradient is zero
            g = x.new_zeros(*x.shape[:-1], w0.shape[0])
        g2 = g.reshape(-1, g.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        grad_x = grad_a = grad_b = grad_w0 = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_w0 = g2.mT @ x2
        if ctx.needs_input_grad[3]:
            grad_bias = g2.sum(0)
        if ctx.seed is not None and not torch.is_grad_enabled():  # the C kernel (first order only)
            grad_x = torch.empty_like(x2)  # the adapter's share first, then g W0 added into it (kernels.c)
            grad_a, grad_b = kernels.lora_backward(g2, b, z, g_phi, x2, a, bits, grad_x, s * rescale, s, rescale)
            grad_x = grad_x.addmm_(g2, w0).reshape(x.shape) if ctx.needs_input_grad[0] else None
            return (grad_x, None, grad_w0, grad_bias, grad_a if ctx.needs_input_grad[4] else None,
                    grad_b if ctx.needs_input_grad[5] else None, None, None, None, None)  # fmt: skip
        if ctx.seed is not None and ctx.drop16 > 0:  # a second-order backward: the mask from the seed
            keep = kernels.keep_mask(x.shape, ctx.seed, ctx.drop16)
        k2 = None if keep is None else keep.reshape(x2.shape)
        gz = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            # d loss / d ((x * keep) A.T): through the output, and through phi when a loss reads it
            gz = _up_grad_z(g2, b, s)
            if g_phi is not None:
                gz = gz + g_phi.reshape(gz.shape)
            gz = gz * rescale
        if ctx.needs_input_grad[0]:
            if k2 is None and g_phi is None:
                grad_x = g2 @ torch.addmm(w0, b, a, alpha=s * rescale)
            else:
                grad_x = g2 @ w0  # then the adapter's share, accumulated in place (one pass)
                if k2 is None:
                    grad_x.add_(gz @ a)
                else:
                    grad_x.addcmul_(gz @ a, k2)
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[4]:
            grad_a = gz.mT @ (x2 if k2 is None else x2 * k2)
        if ctx.needs_input_grad[5]:
            if torch.is_grad_enabled():  # a second-order backward: z must be a function of x and A
                z = ((x2 if k2 is None else x2 * k2) @ a.mT) * rescale
            grad_b = _up_grad_b(z, g2, s)
        return grad_x, None, grad_w0, grad_bias, grad_a, grad_b, None, None, None, None


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
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self._fusable(x):
            drop = self.lora_dropout
            keep, seed, drop16, rescale = None, None, 0, 1.0
            if drop.training and drop.p > 0:
                if x.device.type == "cpu":  # the mask travels as its seed (C kernel, see _FusedLoraLinear)
                    seed, drop16, rescale = dropout_draw(drop.p)
                else:
                    keep, rescale = drop.keep_mask(x)
            elif x.device.type == "cpu":
                seed = 0  # no dropout: drop16 = 0 keeps every element, the kernels run without a hash
            out, phi = _FusedLoraLinear.apply(
                x, keep, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                self.scaling, rescale, seed, drop16,
            )  # fmt: skip
            capture = current_context().capture
            if capture is not None:
                capture.append((self.name, phi))
            return out
        return self.adapter_delta(x, base=self.base_layer(x))

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether ``_FusedLoraLinear`` computes exactly what the two-node form would: plain LoRA
        (not a subclass), a stock ``nn.Linear`` without hooks, one dtype, no autocast, and no
        per-example adapters for this layer."""
        base = self.base_layer
        ctx = current_context()
        return (
            type(self) is LoraLinear
            and type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and x.dtype == base.weight.dtype == self.lora_A.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and (ctx.stacked is None or self.name not in ctx.stacked)
        )

    def adapter_delta(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The update ``s * B A drop(x)``, added to ``base`` (the frozen layer's output) when given."""
        ctx = current_context()
        stacked = ctx.stacked is not None and self.name in ctx.stacked
        keep, rescale = self.lora_dropout.keep_mask(x)
        if stacked:
            phi, b = self._stacked_phi(x if keep is None else x * keep, ctx)
        else:
            phi, b = project_kept(x, keep, self.lora_A.weight), self.lora_B.weight
        if rescale != 1.0:
            phi = phi * rescale  # the dropout rescale, applied r-wide instead of d_in-wide
        if ctx.capture is not None:
            ctx.capture.append((self.name, phi.reshape(*x.shape[:-1], self.r)))
        if base is None:
            base = torch.zeros(*x.shape[:-1], self.out_features, dtype=phi.dtype, device=phi.device)
        return add_low_rank(base, phi, b, self.scaling)

    def _stacked_phi(self, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example adapters (row j uses ``A[idx[j]], B[idx[j]]``): ``(A x, the B to apply)``.

        When the rows come as n equal consecutive blocks, one per adapter (``collate_slots``'
        layout, MeTA-LoRA), each block is one GEMM against its own ``A[i]`` with no copy of the
        weights; any other index gathers one ``(A, B)`` per row.
        """
        a_stack, b_stack = ctx.stacked[self.name]  # (n, r, d_in), (n, d_out, r)
        idx, n, rows = ctx.adapter_index, a_stack.shape[0], x.shape[0]
        blocks = torch.arange(n, device=idx.device).repeat_interleave(rows // n)
        if rows % n == 0 and torch.equal(idx, blocks):
            return x.reshape(n, -1, x.shape[-1]) @ a_stack.mT, b_stack  # (n, rows/n * T, r)
        return x @ a_stack.index_select(0, idx).mT, b_stack.index_select(0, idx)  # (rows, T, r)

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
