"""The main job: base vs fine-tuned accuracy of a LoRA trained on 4 built-in tasks.

Writes ``demo_results.json`` (base and fine-tuned metrics, config, timings), ``accuracy.png``
(per-task bars) and the adapter into the output folder. The base model is evaluated with the
freshly injected (still zero) adapter switched off, so only one model is ever loaded.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mtlora import rundir
from mtlora.adapters import set_adapters_enabled
from mtlora.config import load_config
from mtlora.fileio import atomic_write_json, atomic_write_with
from mtlora.train import ADAPTER_DIR, evaluate_run, prepare_run, train

DEMO_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def plot_accuracy(base: dict[str, Any], tuned: dict[str, Any], path: Path, title: str) -> None:
    """Grouped bars of acc per task (and the macro average), base vs fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(tuned["per_task"])
    labels = tasks + ["macro"]
    b = [base["per_task"][t]["acc"] for t in tasks] + [base["macro"]["primary"]]
    f = [tuned["per_task"][t]["acc"] for t in tasks] + [tuned["macro"]["primary"]]
    xs = range(len(labels))
    fig, ax = plt.subplots(figsize=(1.4 * len(labels) + 2, 3.6))
    ax.bar([x - 0.2 for x in xs], b, width=0.4, label="base (zero-shot)", color="#9aa5b1")
    ax.bar([x + 0.2 for x in xs], f, width=0.4, label="fine-tuned (LoRA)", color="#2f6fde")
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def run_demo(output_dir: Path, overrides: list[str], overwrite: bool = True, progress: bool = True) -> dict:
    config = load_config(DEMO_CONFIG, [f"output_dir={output_dir}", *overrides])
    out = Path(config.output_dir)
    rundir.check(out, resume=False, overwrite=overwrite)  # fail before the model loads; train() writes
    start = time.perf_counter()
    run = prepare_run(config)
    set_adapters_enabled(run.model, False)
    base = evaluate_run(run, step=0, progress=progress)
    set_adapters_enabled(run.model, True)
    summary = train(config, overwrite=overwrite, progress=progress, run=run)
    tuned = summary["evals"][-1]
    paths = {
        "results": str(out / "demo_results.json"),
        "chart": str(out / "accuracy.png"),
        "adapter": str(out / ADAPTER_DIR),
    }
    plot_accuracy(base, tuned, out / "accuracy.png", f"{config.model}: LoRA r={config.adapter_config().r}, "
                  f"{summary['steps']} steps")
    result = {
        "config": config.to_dict(),
        "base": base,
        "fine_tuned": tuned,
        "train_seconds": summary["train_seconds"],
        "total_seconds": time.perf_counter() - start,
        "trainable_parameters": summary["trainable_parameters"],
        "paths": paths,
    }
    atomic_write_json(out / "demo_results.json", result)
    return result
