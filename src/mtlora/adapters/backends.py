"""The fast routes of a LoRA layer, each computing ``LoraLinear.reference_forward`` exactly.

::

    adapter.backend   route (LoraLinear.forward -> forward(layer, x) below)
    ---------------   ---------------------------------------------------------------------------
    reference         LoraLinear.reference_forward: base(x) + s * B(A(drop(x))), plain torch ops
    torch             one autograd node for the whole layer (_FusedLoraLinear); where it cannot
                      apply (a subclass with its own maths, hooks on the frozen layer, autocast,
                      mixed dtypes, per-example adapters) the two-node route: the frozen layer,
                      then project_kept + add_low_rank
    c                 the fused node's adapter side in C (kernels.py, a torch.library custom op),
                      fp32 on a CPU; the torch route anywhere else
    auto (default)    c where it applies and its library is built, else torch

Why a fused node: with the frozen layer and the adapter as two autograd nodes, backward forms the
adapter's share of ``grad_x`` as its own ``tokens x d_in`` product and autograd then sums it with
the frozen layer's; one node forms ``grad_x`` in one GEMM against ``W0 + s B A`` (no dropout) or
accumulates the masked share in place. Why the C kernels: with dropout every layer multiplies a
``tokens x d_in`` mask into its input in the forward and again in the backward; the kernels hash the
mask inside their one pass over ``x`` and keep it at 1 bit per element. What each route buys is
measured by ``benchmarks/train_step.py`` (a row per backend) and recorded in docs/performance.md;
every route is tested against the reference (tests/test_backends.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters import kernels
from mtlora.adapters.context import current_context
from mtlora.adapters.dropout import dropout_draw
from mtlora.errors import UserError

BACKENDS = ("auto", "c", "torch", "reference")


class _MaskedDown(torch.autograd.Function):
    """``(x * keep) @ A.T`` that keeps the 1-byte mask for backward instead of the masked input.

    Autograd of ``F.linear(x * keep, A)`` would save ``x * keep``: a fresh full-precision copy of
    every adapted layer's input (q, k and v each keep their own). Here backward re-forms
    ``x * keep`` from ``x`` (alive anyway) and the mask.
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

    The same maths as ``base + s * F.linear(z, B)``, arranged for speed: the GEMM accumulates into
    ``base`` in place (``addmm_``; ``base`` is the frozen layer's fresh output, which nothing else
    keeps) and the backward forms its two thin products as ``(B.T @ g.T).T`` and ``(z.T @ g).T``,
    k-row GEMMs that CPU BLAS runs several times faster than the k-column ``g @ B`` / ``g.T @ z``
    autograd would issue (``benchmarks/adapter_kernels.py``).
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


def _fused_backward_torch(ctx_needs, g2, g_phi, x2, k2, w0, a, b, z, s: float, rescale: float):
    """The fused node's gradients on torch ops, ``(grad_x, grad_A, grad_B)`` for 2-D ``g2`` / ``x2``
    and a uint8 ``k2`` (None: no dropout). Differentiable, so a second-order backward (MeTA-LoRA)
    runs through it; ``ctx_needs``: which of x, A, B need a gradient."""
    need_x, need_a, need_b = ctx_needs
    grad_x = grad_a = grad_b = gz = None
    if need_x or need_a:
        # d loss / d ((x * keep) A.T): through the output, and through phi when a loss reads it
        gz = _up_grad_z(g2, b, s)
        if g_phi is not None:
            gz = gz + g_phi.reshape(gz.shape)
        gz = gz * rescale
    if need_x:
        if k2 is None and g_phi is None:
            grad_x = g2 @ torch.addmm(w0, b, a, alpha=s * rescale)  # one GEMM against W0 + s B A
        else:
            grad_x = g2 @ w0  # then the adapter's share, accumulated in place (one pass)
            if k2 is None:
                grad_x.add_(gz @ a)
            else:
                grad_x.addcmul_(gz @ a, k2)
    if need_a:
        grad_a = gz.mT @ (x2 if k2 is None else x2 * k2)
    if need_b:
        if torch.is_grad_enabled():  # a second-order backward: z must be a function of x and A
            z = ((x2 if k2 is None else x2 * k2) @ a.mT) * rescale
        grad_b = _up_grad_b(z, g2, s)
    return grad_x, grad_a, grad_b


class _FusedLoraLinear(torch.autograd.Function):
    """The whole adapted layer as one node: ``(x W0.T + bias + s * phi B.T, phi)`` with
    ``phi = rescale * (x * keep) A.T`` (``phi`` is the feature Align-LoRA reads; ``keep`` uint8 or None).

    The thin product is formed first and the frozen layer's GEMM accumulates into it (beta = 1):
    adding the thin product afterwards re-read the GEMM's freshly written output from memory.
    """

    @staticmethod
    def forward(ctx, x, keep, w0, bias, a, b, scale: float, rescale: float):
        x2 = x.reshape(-1, x.shape[-1])
        xk = x2 if keep is None else x2 * keep.reshape(x2.shape)
        z = (a @ xk.mT).mT  # an r-row GEMM, faster than xk @ a.mT on CPU BLAS (benchmarks/adapter_kernels.py)
        if rescale != 1.0:
            z.mul_(rescale)
        sb = (b * scale).mT
        out = torch.addmm(bias, z, sb) if bias is not None else z @ sb
        out.addmm_(x2, w0.mT)
        ctx.save_for_backward(x, keep, w0, a, b, z)
        ctx.scale, ctx.rescale = scale, rescale
        ctx.set_materialize_grads(False)  # phi is usually unused: a zero g_phi would cost the W_eff path
        return out.reshape(*x.shape[:-1], w0.shape[0]), z.reshape(*x.shape[:-1], a.shape[0])

    @staticmethod
    def backward(ctx, g, g_phi):
        x, keep, w0, a, b, z = ctx.saved_tensors
        if g is None:  # only phi reached the loss (rare): the output's gradient is zero
            g = x.new_zeros(*x.shape[:-1], w0.shape[0])
        g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
        needs = ctx.needs_input_grad
        k2 = None if keep is None else keep.reshape(x2.shape)
        grad_x, grad_a, grad_b = _fused_backward_torch(
            (needs[0], needs[4], needs[5]), g2, g_phi, x2, k2, w0, a, b, z, ctx.scale, ctx.rescale)
        grad_w0 = g2.mT @ x2 if needs[2] else None
        grad_bias = g2.sum(0) if needs[3] else None
        grad_x = None if grad_x is None else grad_x.reshape(x.shape)
        return grad_x, None, grad_w0, grad_bias, grad_a, grad_b, None, None


def _c_setup_context(ctx, inputs, output, eager: bool = False):
    x2, w0, bias, a, b, scale, rescale, _seed, _drop16 = inputs
    _, z, bits = output
    ctx.save_for_backward(x2, w0, a, b, z, bits)
    ctx.scale, ctx.rescale, ctx.eager = scale, rescale, eager
    ctx.set_materialize_grads(False)


def _c_backward(ctx, g, g_phi, _g_bits):
    """The C route's gradients: its backward kernel, or (second order) the torch formulas over the
    same mask, unpacked from the forward's bits."""
    x2, w0, a, b, z, bits = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if g is None:
        g = x2.new_zeros(x2.shape[0], w0.shape[0])
    if torch.is_grad_enabled():  # create_graph: differentiable torch ops
        keep = kernels.unpack_bits(bits, x2.shape[1])
        grad_x, grad_a, grad_b = _fused_backward_torch(
            (needs[0], needs[3], needs[4]), g, g_phi, x2, keep, w0, a, b, z, ctx.scale, ctx.rescale)
    else:
        backward = kernels.linear_backward if ctx.eager else kernels.lora_linear_backward
        grad_x, grad_a, grad_b = backward(g, g_phi, x2, w0, a, b, z, bits, ctx.scale, ctx.rescale)
    grad_w0 = g.mT @ x2 if needs[1] else None
    grad_bias = g.sum(0) if needs[2] else None
    return (grad_x if needs[0] else None, grad_w0, grad_bias, grad_a if needs[3] else None,
            grad_b if needs[4] else None, None, None, None, None)  # fmt: skip


kernels.lora_linear.register_autograd(_c_backward, setup_context=_c_setup_context)


class _CLoraLinear(torch.autograd.Function):
    """The C route in eager mode: ``kernels.linear_forward`` / ``linear_backward`` called directly,
    with the custom op's own autograd formula (``_c_backward``). The op (``kernels.lora_linear``)
    is what ``torch.compile`` sees; called eagerly, its Python dispatch cost ~1 % of a step
    (docs/performance.md)."""

    @staticmethod
    def forward(ctx, x2, w0, bias, a, b, scale: float, rescale: float, seed: int, drop16: int):
        out = kernels.linear_forward(x2, w0, bias, a, b, scale, rescale, seed, drop16)
        _c_setup_context(ctx, (x2, w0, bias, a, b, scale, rescale, seed, drop16), out, eager=True)
        ctx.mark_non_differentiable(out[2])
        return out

    @staticmethod
    def backward(ctx, g, g_phi, g_bits):
        return _c_backward(ctx, g, g_phi, g_bits)


# --- choosing the route ----------------------------------------------------------------------


def _fusable(layer, x: torch.Tensor) -> bool:
    """Whether one fused node computes exactly what the layer's own maths would: plain LoRA's
    formula (``fused_route``), a stock ``nn.Linear`` without hooks, one dtype, no autocast, and no
    per-example adapters for this layer."""
    base = layer.base_layer
    ctx = current_context()
    return (
        layer.fused_route
        and type(base) is nn.Linear
        and not (base._forward_hooks or base._forward_pre_hooks)
        and x.dtype == base.weight.dtype == layer.lora_A.weight.dtype
        and not torch.is_autocast_enabled(x.device.type)
        and (ctx.stacked is None or layer.name not in ctx.stacked)
    )


def uses_c(layer, x: torch.Tensor) -> bool:
    """Whether ``layer`` runs on the C kernels for this input (``backend`` c or auto)."""
    if layer.backend not in ("auto", "c") or not _fusable(layer, x):
        return False
    w = [layer.base_layer.weight, layer.lora_A.weight, layer.lora_B.weight]
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (x, *w)):
        return False
    if not kernels.available():
        if layer.backend == "c":
            raise UserError("adapter.backend", "c: the C kernels could not be built on this machine "
                            f"({kernels.build_failure() or 'disabled'}); expected auto or torch here")
        return False
    return True


def forward(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output on its fastest route for ``x`` (backend ``auto``, ``c`` or ``torch``)."""
    if not _fusable(layer, x):
        return layer.adapter_delta(x, base=layer.base_layer(x))
    drop, base = layer.lora_dropout, layer.base_layer
    a, b = layer.lora_A.weight, layer.lora_B.weight
    if uses_c(layer, x):
        # the mask travels as its seed (drop16 = 0: every element kept, nothing hashed)
        seed, drop16, rescale = dropout_draw(drop.p) if drop.training and drop.p > 0 else (0, 0, 1.0)
        x2 = x.reshape(-1, x.shape[-1])
        route = kernels.lora_linear if torch.compiler.is_compiling() else _CLoraLinear.apply
        out, phi, _ = route(x2, base.weight, base.bias, a, b, layer.scaling, rescale, seed, drop16)
        out, phi = out.reshape(*x.shape[:-1], -1), phi.reshape(*x.shape[:-1], -1)
    else:
        keep, rescale = drop.keep_mask(x)
        out, phi = _FusedLoraLinear.apply(x, keep, base.weight, base.bias, a, b, layer.scaling, rescale)
    capture = current_context().capture
    if capture is not None:
        capture.append((layer.name, phi))
    return out


def two_node(layer, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Plain LoRA's adapter added into the frozen layer's output ``base`` with the fast ops."""
    ctx = current_context()
    keep, rescale = layer.lora_dropout.keep_mask(x)
    if ctx.stacked is not None and layer.name in ctx.stacked:
        phi, b = _stacked_phi(layer, x if keep is None else x * keep, ctx)
    else:
        phi, b = project_kept(x, keep, layer.lora_A.weight), layer.lora_B.weight
    if rescale != 1.0:
        phi = phi * rescale  # the dropout rescale, applied r-wide instead of d_in-wide
    if ctx.capture is not None:
        ctx.capture.append((layer.name, phi.reshape(*x.shape[:-1], layer.r)))
    return add_low_rank(base, phi, b, layer.scaling)


def _stacked_phi(layer, x: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example adapters (row j uses ``A[idx[j]], B[idx[j]]``): ``(A x, the B to apply)``.

    When the rows come as n equal consecutive blocks, one per adapter (``collate_slots``' layout,
    MeTA-LoRA), each block is one GEMM against its own ``A[i]`` with no copy of the weights; any
    other index gathers one ``(A, B)`` per row, as the reference does.
    """
    a_stack, b_stack = ctx.stacked[layer.name]  # (n, r, d_in), (n, d_out, r)
    idx, n, rows = ctx.adapter_index, a_stack.shape[0], x.shape[0]
    blocks = torch.arange(n, device=idx.device).repeat_interleave(rows // n)
    if rows % n == 0 and torch.equal(idx, blocks):
        return x.reshape(n, -1, x.shape[-1]) @ a_stack.mT, b_stack  # (n, rows/n * T, r)
    return x @ a_stack.index_select(0, idx).mT, b_stack.index_select(0, idx)  # (rows, T, r)
