"""Step-time overhead of Align-LoRA over plain LoRA on SmolLM2-135M.

    python benchmarks/align_overhead.py            # ~3 min on 2 CPU cores
    python benchmarks/align_overhead.py --quick    # shorter sequences, fewer steps
    python benchmarks/align_overhead.py --mmd      # also time A-LoRA-M

One full training step = zero_grad, objective (forward + loss), backward, AdamW step. LoRA r=8 on
gate/up/down_proj (the Align-LoRA paper's targets), a fixed batch of 8 rows x 128 tokens from 4
tasks (task ids 0..3, two rows each, interleaved; the last 16 tokens of rows 1 and 5 are padding;
answer-only labels on the last 8 real tokens). Variants run interleaved in one process after a
warm-up (A B A B ...), and the median of each variant's timed steps is compared. Ends with one
line ``RESULT {"align_over_lora": x}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mtlora.adapters import inject_adapters, make_adapter_config, trainable_parameters
from mtlora.config import AlignConfig
from mtlora.models import load_model
from mtlora.objectives import supervised_lm_loss
from mtlora.objectives.align import AlignObjective
from mtlora.objectives.lm import IGNORE_INDEX


def make_batch(vocab: int, rows: int, length: int, tasks: int, answer: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, vocab, (rows, length), generator=g)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    pad = 16 if length >= 64 else 4
    for r in (1, 5):
        if r < rows:
            attention_mask[r, -pad:] = 0
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for r in range(rows):
        end = int(attention_mask[r].sum())
        labels[r, end - answer : end] = input_ids[r, end - answer : end]
    input_ids[attention_mask == 0] = 0
    task_ids = torch.arange(rows) % tasks
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 tokens, 5 timed steps per variant")
    parser.add_argument("--mmd", action="store_true", help="also time the MMD variant (A-LoRA-M)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per variant (default 7, quick 5)"
    )
    args = parser.parse_args()
    length = 64 if args.quick else 128
    timed = args.steps or (5 if args.quick else 7)
    warmup = 1 if args.quick else 2

    model, _ = load_model()
    torch.manual_seed(0)
    inject_adapters(
        model,
        make_adapter_config(
            "lora", r=8, alpha=32, dropout=0.1, target_modules=["gate_proj", "up_proj", "down_proj"]
        ),
    )
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    batch = make_batch(model.config.vocab_size, 8, length, 4)

    variants = {"lora": supervised_lm_loss, "align_kl": AlignObjective(AlignConfig(loss="kl", lam=0.2))}
    if args.mmd:
        variants["align_mmd"] = AlignObjective(AlignConfig(loss="mmd", lam=0.2))

    def step(objective) -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(model, batch)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for objective in variants.values():
            step(objective)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(timed):
        for name, objective in variants.items():
            times[name].append(step(objective))

    n_layers = sum(1 for p in params) // 2
    print(
        f"SmolLM2-135M, LoRA r=8 on gate/up/down_proj ({n_layers} layers), batch 8 x {length} tokens, 4 tasks, "
        f"{torch.get_num_threads()} threads; {warmup} warm-up + {timed} timed steps per variant, interleaved"
    )
    print(f"{'variant':<10} {'median s':>9} {'min s':>8} {'max s':>8} {'/ lora':>7}")
    base = statistics.median(times["lora"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<10} {med:9.3f} {min(ts):8.3f} {max(ts):8.3f} {med / base:7.3f}")
    result = {"align_over_lora": round(statistics.median(times["align_kl"]) / base, 4)}
    if args.mmd:
        result["align_mmd_over_lora"] = round(statistics.median(times["align_mmd"]) / base, 4)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
