"""Where the models and tensors live: ``auto | cpu | cuda | cuda:N | mps``, shared with ``mtlora``.

This is the one device resolver of the repository. It lives here, not in ``mtlora.models``,
because ``cvlm`` must not depend on ``mtlora`` (it is installed, tested and cited on its own)
while ``mtlora`` may import a leaf module of ``cvlm`` (both ship in one distribution), so the two
command lines read ``--device`` / ``device=`` the same way.
"""

from __future__ import annotations

import re
from itertools import chain

import torch

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str | torch.device, *, where: str = "device") -> torch.device:
    """``auto`` (CUDA, else MPS, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device this
    machine lacks is a ``UserError`` at ``where`` (one line, exit 2), never a fallback to another
    device: a run asked to use a GPU that silently trains on the CPU wastes the hours it takes."""
    if isinstance(name, torch.device):
        return name
    key = str(name).strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if key == "cpu":
        return torch.device("cpu")
    if key == "mps":
        if not has_mps:
            raise UserError(where, "mps requested but this machine has no MPS device (Apple GPU)")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", key)
    if match is None:
        raise UserError(where, f"expected one of {list(DEVICES)}, got {name!r}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        use = f"{where} cpu" if where.startswith("--") else f"{where}=cpu"
        raise UserError(where, f"{key} requested but this machine has no CUDA device ({build}); use {use} or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(where, f"{key} requested but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(key if match.group(1) else "cuda")


def device_of(model) -> torch.device:
    """The device of a model's first parameter or buffer (for a ``ReportGenerator`` that wraps a
    module as ``.model``, that module's); the CPU for one without any. The evaluation builds its
    image batches there, so a generator moved to a GPU is explained on the GPU."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "model", None)
    if isinstance(module, torch.nn.Module):
        for t in chain(module.parameters(), module.buffers()):
            return t.device
    return torch.device("cpu")
