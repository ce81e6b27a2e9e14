"""C kernels for a plain LoRA layer's adapter side on CPU, registered as torch custom ops
(``mtlora::lora_linear`` and its backward), so autograd, ``torch.compile`` and export see one op
with known output shapes (``register_fake``) instead of an opaque call.

Why: with dropout, every adapted layer multiplies a ``tokens x d_in`` Bernoulli mask into its
input in the forward and again in the backward (``A (x * m)`` and its gradients) and adds the
masked share ``(gz A) * m`` to the input gradient: four full-width passes and a mask held until
backward. ``lora_forward`` hashes the mask from ``(seed, element index)`` (``dropout.py``; nothing
without dropout), forms ``z = A (x * m)`` and writes ``bias + s z B.T`` two rows at a time while
they are in L1, and keeps the mask packed at 1 bit per element; ``lora_backward`` forms ``gz``,
``grad_B``, ``grad_A`` and the masked share of ``grad_x`` in one pass over ``g``, ``x`` and
``grad_x``. The frozen layer's GEMM (BLAS) then accumulates into the kernels' output (beta = 1).
What this buys on a training step is measured in docs/performance.md (``benchmarks/train_step.py``,
a row per backend); the op's autograd formula is in ``backends.py``.

``keep_mask`` (the C kernel or its numpy twin, bit-identical and tested to be) gives the mask the
C kernel applies, so every route, float64 gradchecks and machines without a C compiler all see the
same bits.

Built once, at first use, with the system C compiler (``cc -O3 -march=native -fopenmp``) into
``$MTLORA_CACHE/kernels/`` (atomic rename; keyed by source, flags and CPU), then loaded with
ctypes, which releases the GIL during the call. Its OpenMP regions bind to the ``libgomp.so.1``
torch has already loaded (same soname), so they use torch's threads and follow
``torch.set_num_threads``. Without a compiler (or where the build fails) one line on stderr says
so and the layers use the torch route; ``MTLORA_KERNELS=0`` turns the kernels off silently.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from mtlora.fileio import atomic_write_with

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


_failure: list[str] = []  # why the last build attempt gave no library (for error messages)


def build_failure() -> str | None:
    """Why ``library()`` is None, or None when it is not (or was not tried)."""
    return _failure[-1] if _failure else None


def _unavailable(reason: str) -> None:
    _failure[:] = [reason]
    print(f"mtlora: note: the C LoRA kernels are unavailable ({reason}); LoRA layers use the torch "
          "route (the same numbers, slower on a CPU)", file=sys.stderr)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None (MTLORA_KERNELS=0, no compiler, or the build failed: one line
    on stderr says which, once per process)."""
    _failure.clear()
    if os.environ.get("MTLORA_KERNELS", "1") == "0" or not _SOURCE.exists():
        _failure.append("MTLORA_KERNELS=0")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        _unavailable("no C compiler: cc, gcc or $CC")
        return None
    from mtlora.paths import cache_dir

    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS, _cpu_signature()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lora_kernels-{key}.so"
    if not target.exists():
        try:  # atomic: a concurrent or interrupted build never leaves half a file
            atomic_write_with(target, lambda tmp: subprocess.run(
                [compiler, *_FLAGS, str(_SOURCE), "-o", str(tmp)], check=True, capture_output=True, timeout=120))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", None) or b""
            first = detail.decode(errors="replace").strip().splitlines()[:1] if detail else []
            _unavailable(f"{Path(compiler).name} failed" + (f": {first[0][:120]}" if first else f": {exc}"))
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as exc:
        _unavailable(f"cannot load {target.name}: {exc}")
        return None
    lib.keep_mask.argtypes = [_PTR, _I64, _U32, _U32, _U32]
    lib.keep_bits_row.argtypes = [_PTR, _I64, ctypes.c_uint64, _U32, _U32, _U32]
    lib.lora_forward.argtypes = [_PTR] * 7 + [_I64] * 4 + [_F32, _F32, _U32, _U32, _U32]
    lib.lora_backward.argtypes = [_PTR] * 10 + [_I64] * 4 + [_F32] * 3
    lib.lora_forward.restype = lib.lora_backward.restype = ctypes.c_int
    return lib


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether :func:`library` loaded; a constant to ``torch.compile`` (it cannot trace the build)."""
    return library() is not None


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


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def lora_forward(
    x2: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None,
    seed: int, drop16: int, rescale: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The adapter's side of a LoRA layer's forward for a 2-D float32 ``x2`` (rows x d_in):
    ``(out, z, bits)`` with ``m = keep_mask(x2.shape, seed, drop16)`` (``drop16 = 0``: all kept),

    - ``z = rescale * (x2 * m) @ a.T`` (phi),
    - ``out = bias + scale * z @ b.T`` (the caller adds the frozen ``x2 @ W0.T`` into it, beta = 1),
    - ``bits``: ``m`` packed for ``lora_backward`` (int32, ``ceil(d_in / 32)`` words a row, bit
      ``i % 32`` of word ``i // 32`` is ``m[t, i]``; ``unpack_bits`` reverses it).
    """  # fmt: skip
    x2, a, b = x2.contiguous(), a.contiguous(), b.contiguous()
    bias = None if bias is None else bias.contiguous()  # kept referenced: its pointer goes to C
    rows, d_in, d_out, r = x2.shape[0], x2.shape[1], b.shape[0], a.shape[0]
    z = torch.empty(rows, r, dtype=x2.dtype)
    bits = torch.empty(rows, (d_in + 31) // 32, dtype=torch.int32)
    out = torch.empty(rows, d_out, dtype=x2.dtype)
    rc = library().lora_forward(
        x2.data_ptr(), a.data_ptr(), b.data_ptr(), _ptr(bias), z.data_ptr(),
        bits.data_ptr(), out.data_ptr(), rows, d_in, d_out, r, rescale, scale, *_keys(seed), drop16,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("lora_forward: could not allocate scratch memory")
    return out, z, bits


def unpack_bits(bits: torch.Tensor, d: int) -> torch.Tensor:
    """``lora_forward``'s packed mask as a uint8 ``(rows, d)`` keep mask."""
    shifts = torch.arange(32, dtype=torch.int32)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1  # (rows, words, 32)
    return unpacked.reshape(bits.shape[0], bits.shape[1] * 32)[:, :d].to(torch.uint8)


def lora_backward(
    g2: torch.Tensor, b: torch.Tensor, z: torch.Tensor, g_phi: torch.Tensor | None, x2: torch.Tensor,
    a: torch.Tensor, bits: torch.Tensor, grad_x: torch.Tensor, scale_gz: float, scale_gb: float, phi_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's side of the backward, one pass over the rows of ``g2``, ``x2`` and ``grad_x``:
    returns ``(grad_A, grad_B)`` and writes ``grad_x`` (contiguous, overwritten; add ``g2 @ W0`` into
    it after, with a beta = 1 GEMM)::

        gz     = scale_gz * g2 @ b + phi_scale * g_phi     (g_phi: phi's gradient, or None)
        grad_B = scale_gb * g2.T @ z
        grad_A = gz.T @ (x2 * m),   grad_x = (gz @ a) * m  (m from lora_forward's bits)
    """  # fmt: skip
    g2, b, z, x2, a, bits = (t.contiguous() for t in (g2, b, z, x2, a, bits))
    if not grad_x.is_contiguous():
        raise ValueError("grad_x must be contiguous")
    if g_phi is not None:
        g_phi = g_phi.reshape(z.shape).contiguous()
    grad_a, grad_b = torch.empty_like(a), torch.empty_like(b)
    rc = library().lora_backward(
        g2.data_ptr(), b.data_ptr(), z.data_ptr(), _ptr(g_phi), x2.data_ptr(), a.data_ptr(), bits.data_ptr(),
        grad_x.data_ptr(), grad_a.data_ptr(), grad_b.data_ptr(), x2.shape[0], x2.shape[1], b.shape[0], a.shape[0],
        scale_gz, scale_gb, phi_scale,
    )  # fmt: skip
    if rc != 0:
        raise MemoryError("lora_backward: could not allocate scratch memory")
    return grad_a, grad_b


# --- the custom ops: what autograd, torch.compile and export see ---------------------------------


def linear_forward(
    x2: torch.Tensor, w0: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
    scale: float, rescale: float, seed: int, drop16: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole plain LoRA layer on 2-D float32 CPU rows: ``(x2 W0.T + bias + scale z B.T, z, bits)``
    with ``z = rescale * (x2 * m) A.T`` and ``m`` hashed from ``seed`` (``lora_forward``)."""  # fmt: skip
    out, z, bits = lora_forward(x2, a, b, bias, seed, drop16, rescale, scale)
    out.addmm_(x2, w0.mT)  # the frozen GEMM accumulates into the adapter's share (beta = 1)
    return out, z, bits


def linear_backward(
    g2: torch.Tensor, g_phi: torch.Tensor | None, x2: torch.Tensor, w0: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, z: torch.Tensor, bits: torch.Tensor, scale: float, rescale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_A, grad_B)`` of ``linear_forward`` (first order; ``lora_backward`` + ``g2 W0``)."""  # fmt: skip
    grad_x = torch.empty_like(x2, memory_format=torch.contiguous_format)
    grad_a, grad_b = lora_backward(g2, b, z, g_phi, x2, a, bits, grad_x, scale * rescale, scale, rescale)
    grad_x.addmm_(g2, w0)
    return grad_x, grad_a, grad_b


# The same two functions as torch custom ops, for torch.compile and export (``backends.py`` calls
# the plain functions in eager mode: the ops' Python dispatch costs time on every call).
lora_linear = torch.library.custom_op("mtlora::lora_linear", linear_forward, mutates_args=())
lora_linear_backward = torch.library.custom_op("mtlora::lora_linear_backward", linear_backward, mutates_args=())


@lora_linear.register_fake
def _lora_linear_fake(x2, w0, bias, a, b, scale, rescale, seed, drop16):
    rows = x2.shape[0]
    return (x2.new_empty(rows, w0.shape[0]), x2.new_empty(rows, a.shape[0]),
            x2.new_empty(rows, (x2.shape[1] + 31) // 32, dtype=torch.int32))  # fmt: skip


@lora_linear_backward.register_fake
def _lora_linear_backward_fake(g2, g_phi, x2, w0, a, b, z, bits, scale, rescale):
    return torch.empty_like(x2), torch.empty_like(a), torch.empty_like(b)
