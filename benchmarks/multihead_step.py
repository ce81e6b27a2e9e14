"""Training-step cost of R-LoRA (batched heads) against plain LoRA and a per-head Python loop.

Variants, all on SmolLM2-135M (``mtlora.models.load_model()``), targets gate/up/down_proj, dropout
0.1, the same loss (mean next-token cross-entropy over all positions, labels = input ids), a full
step (forward + backward + AdamW over the adapter parameters):

    lora        plain LoRA, r = 8, alpha = 32
    rlora       R-LoRA, 5 heads of rank 4, alpha = 32 (library layer: all heads in one matmul)
    rlora_loop  the same R-LoRA written as a per-head Python loop (A x once, one dropout + one B
                matmul + one weighted add per head): the naive implementation

Timing: a warm-up step per variant, then rounds A B C / C B A / ... (interleaved in one process,
so load from other processes on shared cores hits every variant alike, and no variant always runs
first); the median of the timed steps is reported.

Peak memory (``peak_mb``): before the first timed step of each variant (after its warm-up:
weights paged in, AdamW state allocated), the process returns freed heap memory to the OS (glibc
``malloc_trim``) and resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``
<- 5); the figure is ``VmHWM - VmRSS_before`` in MiB: the peak extra resident memory of a training
step (activations kept for backward, gradients, temporaries, allocator overhead) over the resident
model and optimiser state. It is the CPU analogue of ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the step; CPU torch keeps no allocator statistics and tracemalloc does not
see torch's allocations. Linux + glibc only (otherwise null).

Usage: ``python benchmarks/multihead_step.py [--quick] [--steps N]``; last line ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import time

import torch
import torch.nn.functional as F

from mtlora.adapters import adapter_layers, inject_adapters, make_adapter_config, trainable_parameters
from mtlora.adapters.multihead import MultiHeadLoraLinear
from mtlora.models import load_model

TARGETS = ["gate_proj", "up_proj", "down_proj"]
VARIANTS = ("lora", "rlora", "rlora_loop")


class LoopRLoraLinear(MultiHeadLoraLinear):
    """Reference R-LoRA with a Python loop over heads (benchmark only; the library never loops)."""

    def adapter_delta(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        phi = self.lora_A(x)
        w = (self.router_weights(x) * self.scaling).to(phi.dtype)
        out = 0
        for i in range(self.num_heads):
            out = out + w[..., i : i + 1] * F.linear(self.lora_dropout(phi), self.lora_B[i])
        return out if base is None else base + out


def build(variant: str, model):
    if variant == "lora":
        cfg = make_adapter_config("lora", r=8, alpha=32, dropout=0.1, target_modules=TARGETS)
    else:
        cfg = make_adapter_config("rlora", r=4, num_heads=5, alpha=32, dropout=0.1, target_modules=TARGETS)
    inject_adapters(model, cfg)
    if variant == "rlora_loop":
        for _, layer in adapter_layers(model):
            layer.__class__ = LoopRLoraLinear
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    return torch.optim.AdamW(params, lr=2e-4), sum(p.numel() for p in params)


def step(model, opt, ids) -> tuple[float, float]:
    """One training step; returns (wall seconds, CPU seconds of this process, all threads)."""
    w0, c0 = time.perf_counter(), time.process_time()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured_step(model, opt, ids) -> tuple[tuple[float, float], float | None]:
    """A timed step that also reports its peak extra resident memory (MiB); see the module docstring.

    Freed heap memory is handed back to the OS and the high-water mark reset *before* the clock
    starts, so the timing is the same as ``step``'s.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except OSError:
        return step(model, opt, ids), None
    seconds = step(model, opt, ids)
    return seconds, round((_status_kb("VmHWM") - before) / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4 x 64, 5 timed steps")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 5, the minimum)"
    )
    ap.add_argument("--model", default="smollm2-135m", help="alias or local Hugging Face model folder")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument(
        "--timer",
        choices=("wall", "cpu"),
        default="wall",
        help="what the RESULT ratios use: wall-clock (default) or this process's CPU time, which is "
        "steadier when other jobs share the cores",
    )
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq = 4, 64
    steps = max(5, args.steps or 5)
    torch.manual_seed(0)
    models, opts, sizes = {}, {}, {}
    for v in VARIANTS:
        models[v], tok = load_model(args.model, device=args.device)
        opts[v], sizes[v] = build(v, models[v])
    ids = torch.randint(0, len(tok), (args.batch, args.seq), device=next(models["lora"].parameters()).device)
    print(
        f"SmolLM2-135M, batch {args.batch} x {args.seq}, targets {'/'.join(TARGETS)}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {steps} timed steps per variant"
    )
    for v in VARIANTS:  # warm-up: pages the weights in, allocates AdamW state
        step(models[v], opts[v], ids)
        print(f"  {v}: warm-up done", flush=True)
    peak: dict[str, float | None] = {}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(steps):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]  # A B C C B A ...: no fixed position
        for v in order:
            if i == 0:  # the first timed step of each variant also measures its peak memory
                gc.collect()
                seconds, peak[v] = measured_step(models[v], opts[v], ids)
            else:
                seconds = step(models[v], opts[v], ids)
            times[v].append(seconds[0])
            cpu[v].append(seconds[1])
        print(
            f"  round {i + 1}/{steps}: " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in VARIANTS), flush=True
        )
    wall_med = {v: statistics.median(t) for v, t in times.items()}
    cpu_med = {v: statistics.median(t) for v, t in cpu.items()}
    med = cpu_med if args.timer == "cpu" else wall_med
    print(
        f"\n{'variant':<12}{'trainable':>11}{'wall med s':>11}{'min':>8}{'max':>8}{'cpu med s':>10}{'peak MiB':>9}"
    )
    for v in VARIANTS:
        print(
            f"{v:<12}{sizes[v]:>11,}{wall_med[v]:>11.3f}{min(times[v]):>8.3f}{max(times[v]):>8.3f}"
            f"{cpu_med[v]:>10.3f}{peak[v]!s:>9}"
        )
    for name, m in (("wall", wall_med), ("cpu", cpu_med)):
        print(
            f"{name:>4}: rlora / lora = {m['rlora'] / m['lora']:.3f}, rlora / rlora_loop = {m['rlora'] / m['rlora_loop']:.3f}"
        )
    result = {
        "rlora_over_lora": round(med["rlora"] / med["lora"], 3),
        "batched_over_loop": round(med["rlora"] / med["rlora_loop"], 3),
        "peak_mb": peak,
    }
    print(
        f"\nratios from {args.timer} time: rlora / lora = {result['rlora_over_lora']} (target <= 1.10), "
        f"rlora / rlora_loop = {result['batched_over_loop']} (target <= 0.7)"
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
