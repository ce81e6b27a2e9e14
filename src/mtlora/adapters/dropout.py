"""The adapter-input dropout mask: one definition for every route, device and recomputation.

A layer's mask is a function of one seed drawn from torch's generator (``dropout_draw``): element i
is dropped when its 16-bit half of a keyed hash of ``(seed, i // 2)`` falls below
``drop16 = round(p * 65536)``, an exact Bernoulli draw with ``p`` realised to 1/65536 (0.05 ->
0.0500031) and rescaled by that realised rate. ``kernels.keep_mask`` computes those bits (in C, or
its bit-identical numpy twin); the C kernels form the same bits inside their own pass over ``x``.

Why a hash of a seed and not ``torch.rand``: ``torch.manual_seed`` still fixes the masks,
checkpoints restore them (the trainer saves torch's RNG state) and activation checkpointing replays
them, while the C route never materialises a mask (it keeps 1 bit per element for backward) and
the mask costs a fraction of ``torch.rand(...) >= p`` (docs/performance.md). Off the CPU, and
inside ``torch.compile``, the mask is ``torch.rand(...) >= p`` (the device's or the compiled graph's
own generator): the same distribution, other draws.
"""

from __future__ import annotations

import torch
from torch import nn

from mtlora.adapters import kernels


def dropout_draw(p: float) -> tuple[int, int, float]:
    """One dropout draw for one layer: ``(seed, drop16, rescale)`` (see the module docstring)."""
    drop16 = round(p * 65536)
    seed = int(torch.randint(0, 2**62, (1,)))
    return seed, drop16, 65536.0 / (65536 - drop16)


def dropout_keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A Bernoulli keep mask shaped like ``x`` (bool) and the rescale it needs."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.rand_like(x, dtype=torch.float32) >= p, 1.0 / (1.0 - p)
    seed, drop16, rescale = dropout_draw(p)
    return kernels.keep_mask(x.shape, seed, drop16).view(torch.bool), rescale


class InputDropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``dropout_keep_mask``.

    ``keep_mask(x)`` returns the mask (uint8, or None when nothing is dropped) and the rescale
    separately, so a fast route can project ``x * keep`` without keeping it and apply the rescale
    after its ``r``-wide projection instead of over the ``d_in``-wide input.
    """

    def keep_mask(self, x: torch.Tensor) -> tuple[torch.Tensor | None, float]:
        if not self.training or self.p == 0:
            return None, 1.0
        keep, rescale = dropout_keep_mask(x, self.p)
        return keep.view(torch.uint8), rescale  # uint8, not bool: its cast to float is vectorised

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, rescale = self.keep_mask(x)
        return x if keep is None else x * keep * rescale
