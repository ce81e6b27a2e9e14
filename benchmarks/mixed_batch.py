"""Mixed-task batches at inference: one batch holding 4 tasks vs the same rows as 4 single-task batches.

    python benchmarks/mixed_batch.py                 # SmolLM2-135M, task-routed R-LoRA, 4 tasks x 8 rows
    python benchmarks/mixed_batch.py --quick         # a tiny random Llama (plumbing only)
    python benchmarks/mixed_batch.py --threads 1 --device cuda

A task-routed R-LoRA (``adapter.router: task``, 5 heads, r=4, gate/up/down) with perturbed random
weights (a trained one routes the same way; the timing does not depend on the values) scores the
prompts of 4 built-in tasks. ``mixed``: one forward of all rows, each row with its own task id;
``single``: one forward per task. Timed interleaved (warm-up first), medians of ``--reps``. Then
``mtlora export --per-task`` writes one PEFT LoRA per task and stock PEFT runs the same mixed batch
through ``adapter_names=``: the largest absolute logit difference from our model.

Ends with one line: RESULT {"mixed_over_single_task_batches": <median ratio>,
"exported_max_abs_logit_diff": <float>}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

TASKS = ("arc_easy", "boolq", "piqa", "sst2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random model, 4 rows per task")
    parser.add_argument("--rows", type=int, default=8, help="rows per task")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from mtlora.adapters import forward_context, inject_adapters, make_adapter_config, save_adapter
    from mtlora.data.tasks import load_task

    if args.quick:
        from mtlora.testing import tiny_model

        model, tok = tiny_model("llama")
        rows = 4
        prompts = {t: [f"Question {i} about {t}: is it so? Answer:" for i in range(rows)] for t in TASKS}
    else:
        from mtlora.models import load_model

        model, tok = load_model()
        rows = args.rows
        prompts = {t: [ex.prompt[-400:] for ex in load_task(t, "eval", rows)] for t in TASKS}
    torch.manual_seed(0)
    inject_adapters(model, make_adapter_config("rlora", r=4, alpha=32, num_heads=5, router="task",
                                               num_tasks=len(TASKS), target_modules=["gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    model.to(args.device).eval()
    tok.padding_side = "left"
    texts = [p for t in TASKS for p in prompts[t]]
    ids = torch.tensor([i for i, t in enumerate(TASKS) for _ in prompts[t]], device=args.device)
    mixed_batch = tok(texts, return_tensors="pt", padding=True).to(args.device)
    singles = [(i, tok(prompts[t], return_tensors="pt", padding=True).to(args.device)) for i, t in enumerate(TASKS)]

    def run_mixed():
        with forward_context(task_ids=ids):
            return model(**mixed_batch).logits

    def run_single():
        out = []
        for i, batch in singles:
            with forward_context(task_ids=torch.full((batch["input_ids"].shape[0],), i, device=args.device)):
                out.append(model(**batch).logits)
        return out

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times = {"mixed": [], "single": []}
    with torch.inference_mode():
        run_mixed(), run_single()  # warm-up
        for _ in range(args.reps):
            times["mixed"].append(timed(run_mixed))
            times["single"].append(timed(run_single))
        ours = run_mixed().float().cpu()
    med = {k: statistics.median(v) for k, v in times.items()}

    import peft

    from mtlora.export import export_per_task

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a", extra={"task_names": list(TASKS), "method": "rlora"})
        export_per_task(Path(tmp) / "a", Path(tmp) / "out")
        from mtlora.adapters import unload

        base = unload(model, merge=False)
        theirs = peft.PeftModel.from_pretrained(base, str(Path(tmp) / "out" / TASKS[0]), adapter_name=TASKS[0])
        for t in TASKS[1:]:
            theirs.load_adapter(str(Path(tmp) / "out" / t), adapter_name=t)
        theirs.eval()
        with torch.inference_mode():
            served = theirs(**mixed_batch, adapter_names=[TASKS[i] for i in ids.tolist()]).logits.float().cpu()
    diff = float((served - ours).abs().max())

    print(f"{'variant':<10} {'median s':>10}   ({len(texts)} rows, {len(TASKS)} tasks, {args.reps} reps)")
    for k in ("mixed", "single"):
        print(f"{k:<10} {med[k]:>10.4f}")
    print(f"exported per-task adapters in stock PEFT, mixed batch via adapter_names: max |logit diff| {diff:.2e}")
    print("RESULT " + json.dumps({"mixed_over_single_task_batches": med["mixed"] / med["single"],
                                  "exported_max_abs_logit_diff": diff}))


if __name__ == "__main__":
    main()
