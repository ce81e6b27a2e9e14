"""Small C kernels for LoRA on CPU: the dropout-masked down-projection without a stored mask, and
the up-projection's two backward products in one pass.

Why: with dropout, every adapted layer draws a ``tokens x d_in`` Bernoulli mask, multiplies it
into its input once in the forward and again in the backward (``A (x * m)`` and its gradients),
and adds the masked share ``(gz A) * m`` to the input gradient: four full-width passes and a mask
held until backward (1 byte per input element, ~150 MB per SmolLM2 step of 8 x 128 tokens). These
were the largest item between our LoRA step and the frozen base's (``docs/performance.md``).
``kernels.c`` does the same maths row by row without forming the masked input: the mask comes from
``(seed, element index)`` through a counter-based hash in the forward, which packs it at 1 bit per
element for the backward (~19 MB per SmolLM2 step instead of ~150 MB as bytes; the backward reads the
bits instead of hashing again, ``docs/performance.md``).
For every LoRA layer, dropout or not, ``up_backward`` forms ``s g B`` and ``s g.T z`` reading the
output gradient ``g`` once instead of twice (r = 8 with AVX-512; BLAS otherwise).

The mask is the same function of the seed everywhere: ``keep_mask`` (the C kernel or its numpy
twin, bit-identical and tested to be) gives the mask the C kernel applies, so the plain formula,
the two-node layer, float64 gradchecks and machines without a C compiler all see the same bits.

Built at first use with the system C compiler (``cc -O3 -march=native -fopenmp``, ~1 s) into
``$MTLORA_CACHE/kernels/`` (atomic rename; keyed by source, flags and CPU), then loaded with
ctypes, which releases the GIL during the call. Its OpenMP regions bind to the ``libgomp.so.1``
torch has already loaded (same soname), so they use torch's threads and follow
``torch.set_num_threads``. Without a compiler, or with ``MTLORA_KERNELS=0``, the layer falls back
to torch ops over ``keep_mask`` (same masks, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fPIC", "-shared"]
_I64, _U32, _F32 = ctypes.c_int64, ctypes.c_uint32, ctypes.c_float
_PTR = ctypes.c_void_p


def _cpu_signature() -> str:
    """What -march=native compiled for: a library built on another CPU must not be reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (MTLORA_KERNELS=0, no compiler, or the build failed)."""
    if os.environ.get("MTLORA_KERNELS", "1") == "0" or not _SOURCE.exists():
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    from mtlora.models import cache_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lora_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)  # atomic: a concurrent or interrupted build never leaves half a file
        except (OSError, subprocess.SubprocessError):
            Path(tmp).unlink(missing_ok=True)
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    lib.keep_mask.argtypes = [_PTR, _I64, _U32, _U32, _U32]
    lib.keep_bits_row.argtypes = [_PTR, _I64, ctypes.c_uint64, _U32, _U32, _U32]
    lib.masked_down.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F32, _U32, _U32, _U32]
    lib.masked_down_backward.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64]
    lib.up_backward.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _F32, _F32]
    lib.up_rank = lib.up_backward_rank()  # asked once: a declined call would still cost its copies
    lib.masked_down.restype = lib.masked_down_backward.restype = lib.up_backward.restype = ctypes.c_int
    return lib


def _keys(seed: int) -> tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def _mix32(h: np.ndarray) -> np.ndarray:
    """numpy twin of ``mix32`` in kernels.c (uint32 arithmetic wraps the same way)."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    return h


def keep_mask_numpy(n: int, seed: int, drop16: int, first: int = 0) -> np.ndarray:
    """The keep bits of elements ``first .. first + n - 1`` (uint8), exactly as ``keep_bit`` in
    kernels.c: one two-round keyed hash per pair of elements, its low 16 bits for the even one, high
    for the odd."""
    k1, k2 = _keys(seed)
    skip = first & 1  # an odd start: the first pair's even element is not wanted
    n += skip
    c = np.arange(first // 2, first // 2 + (n + 1) // 2, dtype=np.uint64)
    lo = c.astype(np.uint32) ^ np.uint32(k1)
    hi = (c >> np.uint64(32)).astype(np.uint32) + np.uint32(k2)
    h = _mix32(_mix32(lo) ^ hi)
    halves = np.empty(2 * len(h), dtype=np.uint32)
    halves[0::2] = h & np.uint32(0xFFFF)
    halves[1::2] = h >> np.uint32(16)
    return (halves[skip:n] >= np.uint32(drop16)).astype(np.uint8)


def keep_mask(shape: torch.Size | tuple[int, ...], seed: int, drop16: int) -> torch.Tensor:
    """The uint8 keep mask (1 = kept) for ``shape``, element i kept iff its hash's top 16 bits
    are >= ``drop16``: an exact Bernoulli draw with ``P(drop) = drop16 / 65536``."""
    n = int(np.prod(shape))
    lib = library()
    if lib is None:
        return torch.from_numpy(keep_mask_numpy(n, seed, drop16)).view(shape)
    out = torch.empty(shape, dtype=torch.uint8)
    lib.keep_mask(out.data_ptr(), n, *_keys(seed), drop16)
    return out


def keep_bits_row(first: int, d: int, seed: int, drop16: int) -> np.ndarray:
    """The keep bits of elements ``first .. first + d - 1`` as the kernels pack them for one row,
    unpacked to uint8 (for tests: the packing's edge cases at any element index)."""
    words = np.empty((d + 31) // 32, dtype=np.uint32)
    library().keep_bits_row(words.ctypes.data, d, first, *_keys(seed), drop16)
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:d]


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the C kernel can take these tensors (float32, CPU) and is built."""
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors) and library() is not None


def masked_down(
    x2: torch.Tensor, a: torch.Tensor, seed: int, drop16: int, rescale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, bits)``: ``z = rescale * (x2 * m) @ a.T`` for a 2-D float32 ``x2`` and
    ``m = keep_mask(x2.shape, seed, drop16)``, and ``m`` packed for ``masked_down_backward``
    (``bits``: int32, one row of ``ceil(d / 32)`` words per row of ``x2``, bit ``i % 32`` of word
    ``i // 32`` = ``m[t, i]``; ``unpack_bits`` reverses it). 1 bit per element kept until backward
    instead of the hash recomputed there."""
    x2, a = x2.contiguous(), a.contiguous()
    z = torch.empty(x2.shape[0], a.shape[0], dtype=x2.dtype)
    bits = torch.empty(x2.shape[0], (x2.shape[1] + 31) // 32, dtype=torch.int32)
    rc = library().masked_down(x2.data_ptr(), a.data_ptr(), z.data_ptr(), bits.data_ptr(), x2.shape[0], x2.shape[1],
                               a.shape[0], rescale, *_keys(seed), drop16)
    if rc != 0:
        raise MemoryError("masked_down: could not allocate a row buffer")
    return z, bits


def unpack_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    """``masked_down``'s packed mask as a uint8 ``(rows, d)`` keep mask."""
    shifts = torch.arange(32, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1  # (rows, words, 32)
    return unpacked.reshape(bits.shape[0], -1)[:, :d].to(torch.uint8)


def masked_down_backward(
    x2: torch.Tensor, a: torch.Tensor, gz: torch.Tensor, grad_x: torch.Tensor, bits: torch.Tensor
) -> torch.Tensor:
    """``grad_A = gz.T @ (x2 * m)``; writes ``(gz @ a) * m`` into ``grad_x`` (contiguous, overwritten:
    add the frozen layer's share after, with a beta = 1 GEMM); ``m`` from ``bits`` (``masked_down``'s)."""
    x2, a, gz, bits = x2.contiguous(), a.contiguous(), gz.contiguous(), bits.contiguous()
    if not grad_x.is_contiguous():
        raise ValueError("grad_x must be contiguous")
    grad_a = torch.empty_like(a)
    rc = library().masked_down_backward(
        x2.data_ptr(), a.data_ptr(), gz.data_ptr(), grad_x.data_ptr(), grad_a.data_ptr(), bits.data_ptr(),
        x2.shape[0], x2.shape[1], a.shape[0],
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("masked_down_backward: could not allocate a row buffer")
    return grad_a


def up_backward(
    g2: torch.Tensor, b: torch.Tensor, z: torch.Tensor, scale_gz: float, scale_gb: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(scale_gz * g2 @ b, scale_gb * g2.T @ z)`` in one pass over ``g2`` (the up-projection's
    backward), or None where the kernel does not apply (r != 8, no AVX-512): use BLAS then."""
    if b.shape[1] != library().up_rank:
        return None
    g2, z = g2.contiguous(), z.contiguous()
    bt = b.mT.contiguous()
    gz = torch.empty(g2.shape[0], b.shape[1], dtype=g2.dtype)
    grad_bt = torch.empty_like(bt)
    rc = library().up_backward(g2.data_ptr(), bt.data_ptr(), z.data_ptr(), gz.data_ptr(), grad_bt.data_ptr(),
                               g2.shape[0], g2.shape[1], b.shape[1], scale_gz, scale_gb)
    return None if rc != 0 else (gz, grad_bt.mT.contiguous())
