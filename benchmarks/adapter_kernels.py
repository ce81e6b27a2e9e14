"""The CPU kernels behind the LoRA step's speed, timed against what autograd / torch would do.

    python benchmarks/adapter_kernels.py          # 1024 tokens, r = 8, d_out 576 and 1536

- backward of the up-projection ``z @ B.T`` (z: tokens x r, B: d_out x r), both products:
  autograd's ``g @ B`` and ``g.T @ z`` vs ours ``(B.T @ g.T).T`` and ``(z.T @ g).T`` (``_LowRankUp``)
- forward of the down-projection ``x @ A.T`` vs ours ``(A @ x.T).T`` (``_FusedLoraLinear``)
- an AdamW step over SmolLM2's 420 LoRA tensors: torch's default vs ``fused=True`` (the trainer's)
- a dropout keep mask for a 1024 x 1536 input: ``torch.rand_like(x) >= p`` vs ``dropout_keep_mask``
  (the keyed-hash mask of ``kernels.py``), and applying it: ``x * keep`` with a bool vs a uint8 mask
- the adapter's side of a LoRA layer with dropout, forward + backward (``z = A (x * m)``,
  ``s z B.T``, ``gz``, ``grad_B``, ``grad_A``, the masked share of ``grad_x``; the frozen GEMMs
  excluded): torch ops over a drawn uint8 mask (the layer's path before the C kernels) vs
  ``kernels.lora_forward`` + ``kernels.lora_backward`` (mask hashed from its seed, packed for backward)

Median of 50 calls each, interleaved, under ``retain_freed_memory()`` as in the trainer (without it
fresh outputs page-fault and the torch-op variants, which allocate more, look slower than they are). Ends with ``RESULT {"up_backward_ours_over_autograd": {...},
"down_forward_ours_over_plain": {...}, "mask_ours_over_torch_rand": ..., "apply_uint8_over_bool": ...,
"adapter_side_kernel_over_torch": {...}, "adamw_fused_over_default": ...}`` (below 1 = ours faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtlora.adapters import kernels
from mtlora.adapters.lora import dropout_keep_mask
from mtlora.train import retain_freed_memory


def median_ms(fns: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    retain_freed_memory()
    torch.manual_seed(0)
    result: dict = {"up_backward_ours_over_autograd": {}}
    for d_out in (576, 1536):
        g, z, b = torch.randn(args.tokens, d_out), torch.randn(args.tokens, args.r), torch.randn(d_out, args.r)
        ms = median_ms({
            "autograd": lambda g=g, z=z, b=b: (g @ b, g.t() @ z),
            "ours": lambda g=g, z=z, b=b: ((b.t().contiguous() @ g.t()).t(), (z.t() @ g).t()),
        }, args.reps)
        print(f"up-projection backward, d_out {d_out}: autograd {ms['autograd']:.3f} ms, ours {ms['ours']:.3f} ms")
        result["up_backward_ours_over_autograd"][str(d_out)] = round(ms["ours"] / ms["autograd"], 3)
    result["down_forward_ours_over_plain"] = {}
    for d_in in (576, 1536):
        x, a = torch.randn(args.tokens, d_in), torch.randn(args.r, d_in)
        ms = median_ms({"plain": lambda x=x, a=a: x @ a.t(), "ours": lambda x=x, a=a: (a @ x.t()).t()}, args.reps)
        print(f"down-projection forward, d_in {d_in}: x @ A.T {ms['plain']:.3f} ms, (A @ x.T).T {ms['ours']:.3f} ms")
        result["down_forward_ours_over_plain"][str(d_in)] = round(ms["ours"] / ms["plain"], 3)
    x = torch.randn(args.tokens, 1536)
    ms = median_ms({"torch_rand": lambda: torch.rand_like(x) >= 0.05, "ours": lambda: dropout_keep_mask(x, 0.05)},
                   args.reps)
    print(f"keep mask {args.tokens} x 1536: torch.rand {ms['torch_rand']:.3f} ms, ours {ms['ours']:.3f} ms "
          f"({torch.get_num_threads()} threads)")
    result["mask_ours_over_torch_rand"] = round(ms["ours"] / ms["torch_rand"], 3)
    keep, _ = dropout_keep_mask(x, 0.05)
    ms = median_ms({"bool": lambda: x * keep, "uint8": lambda: x * keep.view(torch.uint8)}, args.reps)
    print(f"x * keep: bool {ms['bool']:.3f} ms, uint8 {ms['uint8']:.3f} ms")
    result["apply_uint8_over_bool"] = round(ms["uint8"] / ms["bool"], 3)
    if kernels.library() is not None:
        result["adapter_side_kernel_over_torch"] = {}
        for d_in, d_out in ((576, 576), (576, 1536), (1536, 576)):
            x, a, b = torch.randn(args.tokens, d_in), torch.randn(args.r, d_in), torch.randn(d_out, args.r)
            g = torch.randn(args.tokens, d_out)

            def torch_ops(x=x, a=a, b=b, g=g):
                keep = dropout_keep_mask(x, 0.05)[0].view(torch.uint8)  # drawn in forward, kept for backward
                z = (a @ (x * keep).t()).t()
                out = z @ (b * 2.0).t()
                gz = (b.t().contiguous() @ g.t()).t() * 2.0
                grad_b = (z.t() @ g).t() * 2.0
                grad_a = gz.t() @ (x * keep)
                grad_x = (gz @ a) * keep
                return out, grad_a, grad_b, grad_x

            def kernel(x=x, a=a, b=b, g=g):
                out, z, bits = kernels.lora_forward(x, a, b, None, 7, 3277, 1.0, 2.0)  # the mask packed for backward
                grad_x = torch.empty_like(x)
                return out, *kernels.lora_backward(g, b, z, None, x, a, bits, grad_x, 2.0, 2.0, 1.0), grad_x

            ms = median_ms({"torch": torch_ops, "kernel": kernel}, args.reps)
            print(f"LoRA adapter side fwd+bwd with dropout, {d_in} -> {d_out}: torch ops {ms['torch']:.3f} ms, "
                  f"C kernels {ms['kernel']:.3f} ms")
            result["adapter_side_kernel_over_torch"][f"{d_in}x{d_out}"] = round(ms["kernel"] / ms["torch"], 3)
    # AdamW over SmolLM2's r = 8 adapter tensors on every linear layer (420 tensors, 4.9M values)
    shapes = [s for d_in, d_out in [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536),
                                    (1536, 576)] * 30 for s in ((args.r, d_in), (d_out, args.r))]  # fmt: skip
    opts = {}
    for kind in ("default", "fused"):
        params = [torch.nn.Parameter(torch.randn(shape) * 0.01) for shape in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opts[kind] = torch.optim.AdamW(params, lr=1e-4, fused=kind == "fused")
    ms = median_ms({k: opt.step for k, opt in opts.items()}, max(5, args.reps // 5))
    print(f"AdamW step, {len(shapes)} adapter tensors: default {ms['default']:.1f} ms, fused {ms['fused']:.1f} ms")
    result["adamw_fused_over_default"] = round(ms["fused"] / ms["default"], 3)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
