"""The papers' analyses of a trained multi-head adapter: head similarity and per-task router weights.

- Head similarity (R-LoRA Fig. 1/5, HydraLoRA's head analysis): per adapted layer, the pairwise
  cosine similarity of the flattened heads ``B_i`` (d_out x r). Weights only: no model, no data.
  Note: R-LoRA's random heads start near-orthogonal (expected cosine 0) with ``zero_init: offset``
  (the default) and at an expected ``-1/(N-1)`` with ``zero_init: center`` (mean-centred);
  zero-initialised heads (HydraLoRA) start undefined (all zero, reported as 0).
- Router weights (HydraLoRA's "heads specialise per task"): the mean router probability of each
  head over the non-padding tokens of each task's examples, per layer. Needs the base model and a
  few examples per task. Analysis is not training, so the layers simply record their router output
  into ``router_probe`` lists during a no-grad forward pass.

Outputs (``analyze_adapter``): ``head_similarity.csv`` (layer, head_i, head_j, cosine),
``head_similarity.md`` (per-layer mean/max off-diagonal), ``head_similarity.png`` (heat map: layers x
head pairs, and the layer-averaged N x N matrix), and with task data ``router_weights.csv`` (task,
layer, head, weight), ``router_weights.png`` (tasks x heads, averaged over layers), plus
``summary.json``. Entry point without the CLI: ``python -m mtlora.analysis``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlora.adapters.multihead.layer import METHODS, MultiHeadLoraLinear
from mtlora.errors import UserError


def head_cosine(lora_b: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity of the flattened heads of one layer's ``(N, d_out, r)`` tensor (fp64)."""
    flat = lora_b.detach().double().flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return unit @ unit.T


def head_similarity(state: dict[str, torch.Tensor] | nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> (N, N) head cosine matrix, from a model or an adapter state dict."""
    if isinstance(state, nn.Module):
        return {
            name: head_cosine(m.lora_B)
            for name, m in state.named_modules()
            if isinstance(m, MultiHeadLoraLinear)
        }
    out = {}
    for key, tensor in state.items():
        if key.endswith(".lora_B") and tensor.ndim == 3:
            name = key.removesuffix(".lora_B").removeprefix("base_model.model.")
            out[name] = head_cosine(tensor)
    return out


@torch.no_grad()
def router_weights_by_task(
    model: nn.Module, tokenizer, examples: Sequence[Any], batch_size: int = 8, max_length: int = 256,
    task_ids: dict[str, int] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """task -> layer -> (N,) mean router probability over the non-padding tokens of that task.

    ``examples`` are ``mtlora.data.Example``-like objects (``task``, ``prompt``, ``answer``,
    ``target_delimiter``); each is run as prompt + delimiter + answer.
    """
    layers = {
        n: m for n, m in model.named_modules() if isinstance(m, MultiHeadLoraLinear) and m.router is not None
    }
    if not layers:
        raise UserError("adapter", "expected an adapter with a learned router (hydralora or rlora)")
    sums: dict[str, dict[str, torch.Tensor]] = {}
    counts: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            texts = [ex.prompt + getattr(ex, "target_delimiter", " ") + ex.answer for ex in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            for m in layers.values():
                m.router_probe = []
            from mtlora.adapters import forward_context

            dev = next(model.parameters()).device
            ids = None if task_ids is None else torch.tensor([task_ids[ex.task] for ex in chunk], device=dev)
            with torch.no_grad(), forward_context(task_ids=ids):  # a task+token router reads the ids
                model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
            mask = enc["attention_mask"].double()  # (B, L), on the CPU like the sums
            for row, ex in enumerate(chunk):
                counts[ex.task] = counts.get(ex.task, 0.0) + mask[row].sum().item()
                per_layer = sums.setdefault(ex.task, {})
                for name, m in layers.items():
                    probs = m.router_probe[0][row].double().cpu()  # (L, N)
                    s = (probs * mask[row, :, None]).sum(0)
                    per_layer[name] = per_layer.get(name, 0) + s
    finally:
        for m in layers.values():
            m.router_probe = None
        model.train(was_training)
    return {task: {n: s / counts[task] for n, s in per_layer.items()} for task, per_layer in sums.items()}


def _short(name: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``3.up_proj`` for plot labels."""
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[0]}.{parts[-1]}" if nums else name


def _plot_similarity(sim: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sim)
    n = next(iter(sim.values())).shape[0]
    pairs = list(combinations(range(n), 2))
    grid = torch.tensor([[sim[name][i, j].item() for i, j in pairs] for name in names]) if pairs else None
    mean = torch.stack([sim[name] for name in names]).mean(0)
    fig, axes = plt.subplots(
        1, 2, figsize=(4 + 0.35 * max(len(pairs), 4), 2 + 0.18 * len(names)), squeeze=False
    )
    ax = axes[0, 0]
    if grid is not None:
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
        ax.set_xticks(range(len(pairs)), [f"{i}-{j}" for i, j in pairs], rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), [_short(x) for x in names], fontsize=6)
        ax.set_xlabel("head pair")
        ax.set_title("cosine(B_i, B_j) per layer", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    ax = axes[0, 1]
    im = ax.imshow(mean.numpy(), cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_title("mean over layers", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_router(router: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(router)
    mat = torch.stack([torch.stack(list(router[t].values())).mean(0) for t in tasks])  # (tasks, N)
    fig, ax = plt.subplots(figsize=(2.5 + 0.6 * mat.shape[1], 1.5 + 0.35 * len(tasks)))
    im = ax.imshow(mat.numpy(), aspect="auto", cmap="viridis")
    for i in range(mat.shape[0]):
        for j in range(mat.shape[1]):
            ax.text(j, i, f"{mat[i, j].item():.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(mat.shape[1]), [f"head {j}" for j in range(mat.shape[1])], fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title("mean router weight per task (avg over layers)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def analyze_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base_model: str | Path | None = None,
    tasks: Sequence[str | Path] | None = None,
    examples: Sequence[Any] | None = None,
    split: str = "eval",
    max_per_task: int = 32,
    batch_size: int = 8,
    device: str = "cpu",
) -> dict[str, Any]:
    """Write the head-similarity (always) and per-task router-weight (given data) analyses.

    ``tasks`` are built-in task names or JSONL files (read by ``mtlora.data.tasks.load_tasks``);
    ``examples`` may be given instead. The base model is ``base_model``, else the adapter's
    ``base_model_name_or_path``. Returns the summary that is also written to ``summary.json``.
    """
    from safetensors.torch import load_file

    from mtlora.adapters.io import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    config, extra = read_adapter_config(adapter_dir)
    if config.method not in METHODS:
        raise UserError(
            adapter_dir, f"expected a multi-head adapter ({', '.join(METHODS)}), got {config.method!r}"
        )
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise UserError(adapter_dir, f"adapter folder has no {WEIGHTS_NAME}")
    sim = head_similarity(load_file(str(weights)))
    out_dir.mkdir(parents=True, exist_ok=True)
    n = config.num_heads
    off = ~torch.eye(n, dtype=torch.bool)
    per_layer = {
        name: {"mean": m[off].mean().item() if n > 1 else 1.0, "max": m[off].max().item() if n > 1 else 1.0}
        for name, m in sim.items()
    }
    with open(out_dir / "head_similarity.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head_i", "head_j", "cosine"])
        for name, m in sim.items():
            for i, j in combinations(range(n), 2):
                w.writerow([name, i, j, f"{m[i, j].item():.6f}"])
    lines = ["| layer | mean cos (i != j) | max cos |", "|---|---:|---:|"]
    lines += [f"| {name} | {v['mean']:.3f} | {v['max']:.3f} |" for name, v in per_layer.items()]
    (out_dir / "head_similarity.md").write_text("\n".join(lines) + "\n")
    _plot_similarity(sim, out_dir / "head_similarity.png")
    summary: dict[str, Any] = {
        "method": config.method,
        "num_heads": n,
        "layers": len(sim),
        "mean_head_cosine": sum(v["mean"] for v in per_layer.values()) / max(len(per_layer), 1),
        "files": ["head_similarity.csv", "head_similarity.md", "head_similarity.png"],
    }
    if tasks and examples is None:
        from mtlora.data.tasks import load_tasks

        examples = load_tasks(list(tasks), split=split, max_per_task=max_per_task)
    if examples:
        if not config.has_router:
            raise UserError(
                adapter_dir, f"{config.method} has no learned router: no router weights to analyse"
            )
        from mtlora.adapters.io import load_adapter
        from mtlora.models import load_model

        if base_model is None:
            base_model = extra.get("base_model") or json.loads((adapter_dir / CONFIG_NAME).read_text()).get(
                "base_model_name_or_path")
            if not base_model:
                raise UserError(adapter_dir, "adapter names no base model; pass the base model explicitly")
        model, tokenizer = load_model(base_model, device=device)
        load_adapter(model, adapter_dir)
        router = router_weights_by_task(model, tokenizer, list(examples), batch_size=batch_size)
        with open(out_dir / "router_weights.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["task", "layer", "head", "weight"])
            for task, layers in router.items():
                for name, probs in layers.items():
                    for j, p in enumerate(probs.tolist()):
                        w.writerow([task, name, j, f"{p:.6f}"])
        _plot_router(router, out_dir / "router_weights.png")
        summary["router_weights"] = {
            task: [round(v, 4) for v in torch.stack(list(layers.values())).mean(0).tolist()]
            for task, layers in router.items()
        }
        summary["files"] += ["router_weights.csv", "router_weights.png"]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Typer-free entry: ``python -m mtlora.analysis ADAPTER [--out DIR] [--task T]``."""
    ap = argparse.ArgumentParser(
        description="head similarity and per-task router weights of a multi-head adapter"
    )
    ap.add_argument("adapter_dir")
    ap.add_argument("--out", default=None, help="output folder (default: ADAPTER/analysis)")
    ap.add_argument("--base-model", default=None)
    ap.add_argument("--task", action="append", default=None, help="built-in task name or JSONL file (repeat)")
    ap.add_argument("--split", default="eval")
    ap.add_argument("--max-per-task", type=int, default=32)
    args = ap.parse_args(argv)
    out = args.out or str(Path(args.adapter_dir) / "analysis")
    try:
        summary = analyze_adapter(
            args.adapter_dir,
            out,
            args.base_model,
            args.task,
            split=args.split,
            max_per_task=args.max_per_task,
        )
    except UserError as exc:
        print(f"error: {exc.format()}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
