"""One per-forward context, set around a model call and read by the adapter layers.

Why not forward hooks: hooks fire again when gradient checkpointing recomputes a block during
backward, which is exactly how the released Align-LoRA trainer leaks or loses its features. A
context is set around the *main* forward call only; recomputation happens during ``backward()``,
after the ``with`` block has exited, so nothing is captured twice.

Fields (all optional):
- ``task_ids``: ``(batch,)`` long tensor, the explicit task id of each row.
- ``capture``: a list the adapter layers append ``(layer_name, phi)`` to, where ``phi = A drop(x)``
  is the r-dim adapter-space feature (Align-LoRA).
- ``adapter_index`` + ``stacked``: per-example adapters. ``stacked`` maps a layer name to its
  stacked weights ``(A: (n, r, d_in), B: (n, d_out, r))``; row ``b`` of the batch uses adapter
  ``adapter_index[b]``. MeTA-LoRA runs its n task adaptations as one forward this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ForwardContext:
    task_ids: torch.Tensor | None = None
    capture: list | None = None
    adapter_index: torch.Tensor | None = None
    stacked: dict | None = None


_EMPTY = ForwardContext()
_CURRENT: ContextVar[ForwardContext] = ContextVar("mtlora_forward_context", default=_EMPTY)


class _Traced:
    """What a ``torch.compile``'d forward reads. Dynamo cannot trace ``ContextVar.get`` (a graph
    break in every adapter layer), but it traces and guards a module attribute, so the context is
    also kept here; it is per process, not per thread, which only compiled forwards rely on."""

    ctx: ForwardContext = _EMPTY


def current_context() -> ForwardContext:
    if torch.compiler.is_compiling():
        return _Traced.ctx
    return _CURRENT.get()


@contextmanager
def forward_context(**fields) -> Iterator[ForwardContext]:
    """Set context fields for the duration of a forward call (nested contexts inherit)."""
    ctx = replace(_CURRENT.get(), **fields)
    token, traced = _CURRENT.set(ctx), _Traced.ctx
    _Traced.ctx = ctx
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
        _Traced.ctx = traced
