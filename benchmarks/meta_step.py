"""MeTA-LoRA meta-iteration time: batched (stacked adapters) vs the sequential deep-copy reference,
and vs a plain LoRA step over the same tokens.

    python benchmarks/meta_step.py            # SmolLM2-135M, n=4 tasks, r=8 all-linear, S=1
    python benchmarks/meta_step.py --quick    # 5 timed reps instead of 7
    python benchmarks/meta_step.py --device cuda   # on a lent GPU

Setup (the same for every variant): SmolLM2-135M-Instruct (``mtlora.models.load_model()``), LoRA r=8,
alpha=16, dropout 0.05 on every linear layer but the LM head; n = 4 built-in tasks (sst2, copa,
arc_easy, boolq), per task 2 support + 2 query training examples, every row padded/cut to exactly
64 tokens (answer-only loss); first order, S = 1 inner step, mean aggregation, AdamW outer step.

- batched:    ``meta_gradients``: stage 1 = ONE forward+backward over the 8 support rows with 4
              stacked adapters (row b uses task slot[b]); stage 2 = ONE forward+backward over the 8
              query rows at the adapted theta_i; clip; AdamW step on theta.
- sequential: ``reference_meta_gradients``: per task, deep-copy the model, 1 SGD step on its 2
              support rows, forward+backward on its 2 query rows; aggregate; clip; AdamW step.
- loop:       (for information) the batched code called once per task (n=1 each): per-task passes,
              no copies; separates the cost of copying from the gain of batching.
- lora:       a plain LoRA training step over the same tokens: one forward+backward over the union
              of all support and query rows of the iteration (16 rows x 64 tokens, the rows one
              meta-iteration sends through the model), clip, AdamW step.

Variants run interleaved (batched, sequential, loop, lora, batched, ...) after one warm-up each;
the median of each is reported. Ends with
``RESULT {"batched_over_sequential": ..., "meta_over_lora": ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TASKS = ("sst2", "copa", "arc_easy", "boolq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rows", type=int, default=2, help="support (and query) examples per task")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (a lent GPU)")
    args = parser.parse_args()
    reps = 5 if args.quick else args.reps
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    from mtlora.adapters import inject_adapters, make_adapter_config, trainable_parameters
    from mtlora.config import MetaConfig
    from mtlora.data.collate import TaskCollator
    from mtlora.data.tasks import load_task
    from mtlora.meta import collate_slots, meta_gradients, reference_meta_gradients
    from mtlora.models import load_model
    from mtlora.objectives import supervised_lm_loss

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    inject_adapters(model, make_adapter_config("lora", r=8, alpha=16, dropout=0.05, target_modules="all-linear"))
    device = torch.device(args.device)
    model.to(device).train()
    theta = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(theta, lr=1e-4)
    meta = MetaConfig(tasks_per_iter=len(TASKS), inner_steps=1, inner_lr=1e-2, aggregation="mean")

    collator = TaskCollator(tok, list(TASKS), max_length=args.seq, pad_to_multiple_of=args.seq)
    groups = []
    for task in TASKS:
        exs = load_task(task, "train", 2 * args.rows)
        groups.append((exs[: args.rows], exs[args.rows:]))

    def on(batch: dict) -> dict:
        return {k: v.to(device) for k, v in batch.items()}

    support = on(collate_slots(collator, [s for s, _ in groups]))
    query = on(collate_slots(collator, [q for _, q in groups]))
    episodes = [(on(collator(s)), on(collator(q))) for s, q in groups]
    loop_episodes = [(on(collate_slots(collator, [s])), on(collate_slots(collator, [q]))) for s, q in groups]
    union = on(collator([ex for s, q in groups for ex in (*s, *q)]))
    assert support["input_ids"].shape[1] == query["input_ids"].shape[1] == union["input_ids"].shape[1] == args.seq
    answer_tokens = int((union["labels"] != -100).sum())

    def finish() -> None:
        torch.nn.utils.clip_grad_norm_(theta, 1.0)
        optimizer.step()

    def batched() -> None:
        meta_gradients(model, support, query, meta)
        finish()

    def sequential() -> None:
        reference_meta_gradients(model, episodes, meta)
        finish()

    def loop() -> None:
        for s, q in loop_episodes:
            meta_gradients(model, s, q, meta)  # accumulates each task's query gradient into .grad
        for p in theta:
            p.grad /= len(loop_episodes)  # mean aggregation
        finish()

    def lora() -> None:
        supervised_lm_loss(model, union)[0].backward()
        finish()

    variants = {"batched": batched, "sequential": sequential, "loop": loop, "lora": lora}

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for name, fn in variants.items():  # warm-up
        print(f"warm-up {name}: {timed(fn):.2f}s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(reps):
        for name, fn in variants.items():
            times[name].append(timed(fn))
        print(f"rep {rep + 1}/{reps}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    n_train = sum(p.numel() for p in theta)
    print(f"MeTA-LoRA meta-iteration on {args.model}: n={len(TASKS)} tasks ({', '.join(TASKS)}), "
          f"{args.rows} support + {args.rows} query rows per task x {args.seq} tokens "
          f"({answer_tokens} answer tokens in all), S=1, first order, LoRA r=8 all-linear ({n_train:,} trainable), "
          f"{reps} interleaved reps, device {device}, {torch.get_num_threads()} threads")
    print(f"{'variant':<11} {'median s':>10} {'min s':>10} {'max s':>10}")
    for name in variants:
        print(f"{name:<11} {med[name]:>10.3f} {min(times[name]):>10.3f} {max(times[name]):>10.3f}")
    result = {
        "batched_over_sequential": round(med["batched"] / med["sequential"], 4),
        "meta_over_lora": round(med["batched"] / med["lora"], 4),
        "batched_over_loop": round(med["batched"] / med["loop"], 4),
        "median_s": {k: round(v, 4) for k, v in med.items()},
    }
    print(f"batched / sequential = {result['batched_over_sequential']:.3f}  (target <= 0.5)")
    print(f"batched / lora       = {result['meta_over_lora']:.3f}  (target <= 1.5)")
    print(f"batched / loop       = {result['batched_over_loop']:.3f}  (information: batching without copies)")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
