"""Training throughput of 2 data-parallel processes vs 1 process on the same global batch.

    python benchmarks/ddp_scaling.py            # SmolLM2-135M, LoRA r=8, global batch 8 x <= 64 tokens
    python benchmarks/ddp_scaling.py --quick    # tiny random model: checks the plumbing in ~1-2 min

Both variants are the real command line: ``mtlora train CONFIG`` (1 process, ``train.batch_size`` 8)
and ``mtlora train CONFIG --num-processes 2`` (accelerate launch, gloo on CPU, ``train.batch_size``
4 per process), so both see the same global batches. Every process runs one thread
(``OMP_NUM_THREADS=1``; ``--threads`` changes it): a process stands for one device, the CPU
analogue of one GPU per process, and the ratio measures what a second device buys after DDP's
gradient all-reduce and the token-count all-reduce. (Giving the single process both cores instead
measures OpenMP threading against DDP; on this shared, oversubscribed 2-core machine 2-thread
matmuls stalled for tens of seconds per step waiting for both threads to be scheduled.)

Each launch trains ``warm-up + timed`` optimiser steps; the trainer records every step's wall time
(``step_seconds`` in results.json) and the first ``--warmup`` steps are dropped. The variants are
launched interleaved (1, 2, 1, 2, ...; ``--rounds`` pairs) and the median step time of each over
all its timed steps gives its throughput in examples/s and supervised+prompt tokens/s.
Ends with ``RESULT {"two_over_one": throughput(2 processes) / throughput(1 process)}``.
With a free core per process the ratio approaches 2 minus the communication cost; on this machine's 2
cores, shared with other jobs (load average printed with the table), expect well below that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def write_tasks(folder: Path, n: int = 64) -> list[Path]:
    """Two synthetic multiple-choice tasks (fixed prompts, so every run sees the same tokens)."""
    words = ["bright", "dull", "warm", "cold", "quick", "slow", "happy", "sad"]
    rows_a = [
        {"prompt": f"Review {i}: the film was {words[i % 8]} and the {words[(i + 3) % 8]} cast played well. "
                   "Positive or negative?", "answer": "positive" if i % 2 else "negative",
         "choices": ["negative", "positive"]}
        for i in range(n)
    ]
    rows_b = [
        {"prompt": f"Question: what is {i} plus {i % 7}? Think of the {words[i % 8]} numbers. Answer:",
         "answer": str(i + i % 7), "choices": [str(i + i % 7), str(i + i % 7 + 1)]}
        for i in range(n)
    ]
    paths = []
    for name, rows in (("review", rows_a), ("sums", rows_b)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def write_config(folder: Path, name: str, model: str, tasks: list[Path], batch_size: int, steps: int,
                 max_length: int) -> Path:
    cfg = {
        "model": model,
        "method": "lora",
        "tasks": [str(t) for t in tasks],
        "output_dir": str(folder / name),
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"max_length": max_length, "max_eval_per_task": 0, "sampler": "proportional"},
        "train": {"batch_size": batch_size, "lr": 2e-4, "max_steps": steps, "save_every": 10_000, "seed": 0},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_variant(config: Path, processes: int, threads: int) -> tuple[list[float], float]:
    """Launch one training run; its per-step seconds and the launch's wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "mtlora.cli", "train", str(config), "--no-progress", "--overwrite"]
    if processes > 1:
        cmd += ["--num-processes", str(processes)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    results = yaml.safe_load(Path(yaml.safe_load(config.read_text())["output_dir"], "results.json").read_text())
    if results.get("world_size", 1) != processes:
        sys.exit(f"expected {processes} processes, the run reports world_size={results.get('world_size')}")
    return [row["step_seconds"] for row in results["history"]], wall


def mean_tokens(tasks: list[Path], model: str, max_length: int) -> float:
    """Mean tokens per training row (prompt + delimiter + answer, capped), for tokens/s."""
    from transformers.utils import logging as hf_logging

    from mtlora.config import load_config
    from mtlora.data.collate import TaskCollator
    from mtlora.data.tasks import load_tasks
    from mtlora.models import load_model

    hf_logging.disable_progress_bar()
    cfg = load_config(None, [f"model={model}"])
    _, tokenizer = load_model(cfg.model)
    examples = load_tasks([str(t) for t in tasks], "train", None)
    batch = TaskCollator(tokenizer, sorted({e.task for e in examples}), max_length)(examples)
    return float(batch["attention_mask"].sum()) / len(examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timed", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (1 process, 2 processes) pairs")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of every process")
    parser.add_argument("--quick", action="store_true", help="tiny random model instead of SmolLM2")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    steps = args.warmup + args.timed

    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.quick:
            from mtlora.testing import save_tiny_model

            model = str(save_tiny_model(folder / "tiny", "llama"))
        tasks = write_tasks(folder)
        configs = {
            n: write_config(folder, f"p{n}", model, tasks, args.global_batch // n, steps, args.max_length)
            for n in (1, 2)
        }
        times: dict[int, list[float]] = {1: [], 2: []}
        walls: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            for n in (1, 2):
                step_s, wall = run_variant(configs[n], n, args.threads)
                times[n] += step_s[args.warmup:]
                walls[n].append(wall)
                print(f"round {r + 1}, {n} process(es): median step {statistics.median(step_s[args.warmup:]):.3f} s"
                      f"  (launch wall {wall:.1f} s)", flush=True)
        tokens = mean_tokens(tasks, model, args.max_length)

    med = {n: statistics.median(t) for n, t in times.items()}
    ex_s = {n: args.global_batch / med[n] for n in med}
    ratio = ex_s[2] / ex_s[1]
    print()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"model {model}, LoRA r=8 all-linear, global batch {args.global_batch} rows x <= {args.max_length} "
          f"tokens (mean {tokens:.1f}), {args.threads} thread(s) per process, {cores} CPU cores "
          f"(load average {load}), "
          f"{args.timed} timed steps x {args.rounds} rounds each")
    print(f"{'variant':<34}{'median step s':>14}{'examples/s':>12}{'tokens/s':>11}")
    labels = {1: f"1 process  (batch {args.global_batch})",
              2: f"2 processes (batch {args.global_batch // 2} each, gloo)"}
    for n in (1, 2):
        print(f"{labels[n]:<34}{med[n]:>14.3f}{ex_s[n]:>12.2f}{ex_s[n] * tokens:>11.0f}")
    print(f"2-process / 1-process throughput: {ratio:.3f}")
    print("RESULT " + json.dumps({"two_over_one": round(ratio, 4)}))


if __name__ == "__main__":
    main()
