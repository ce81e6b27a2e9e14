"""Training-step time of our LoRA vs PEFT's, and vs the frozen base's forward+backward (the floor).

    python benchmarks/train_step.py            # SmolLM2-135M, r=8, all linear layers, 8 x 128 tokens
    python benchmarks/train_step.py --quick    # fewer repetitions
    python benchmarks/train_step.py --device cuda --precision bf16
    python benchmarks/train_step.py --no-compile   # without the torch.compile row (its compile takes minutes)

``--precision bf16|fp16`` loads every variant's frozen base in that dtype and runs its forward under
autocast (``mtlora.models.apply_precision``); the adapters stay fp32 master weights, in ours and in
PEFT's (its default ``autocast_adapter_dtype``), as a PEFT user's bf16 loop under autocast would.
In bf16 the one-node layer never applies (its fast path is fp32 only), so ``two_node`` equals ours.

Same configuration for all variants: LoRA r=8, alpha=16, dropout 0.05 on every linear layer but
the LM head; a batch of 8 rows x 128 tokens whose last ``--answer-tokens`` tokens of each row are
the supervised answer (labels -100 elsewhere), as in answer-only fine-tuning.

A row per route of our layer (``adapter.backend``, ``mtlora/adapters/backends.py``), all with our
answer-only loss (the LM head applied only at supervised positions):

- ours:      ``backend: auto``, the default (the C kernels for fp32 on a CPU where they build)
- torch:     ``backend: torch``, one fused autograd node per layer on torch ops
- two_node:  the torch route with each layer as two autograd nodes (frozen layer, then adapter):
             ``fused_over_two_node`` is what the fusion buys
- reference: ``backend: reference``, ``base(x) + s * B(A(drop(x)))`` in plain ops
- peft:      peft.get_peft_model + the stock HF forward with ``labels`` (logits at every position)
- peft_our_loss: PEFT's LoRA layers (the textbook ``base(x) + s * B(A(dropout(x)))``, eager) with
             our loss path: the layer alone, compared with ours
- peft_compiled: the same, its decoder under ``torch.compile`` (inductor): what compiling a
             textbook LoRA layer gives on this device
- reference_compiled: our ``backend: reference`` layers, the decoder under ``torch.compile``
             (inductor): whether compiling the readable route makes the C kernels unnecessary
- floor:     the frozen base, no adapter, forward + backward over the same tokens and the same loss
             positions (our loss path; gradients flow back to the input embeddings)

The process runs with ``retain_freed_memory()`` as our trainer does (glibc keeps freed memory, so
re-allocated activations do not page-fault); it is process-wide, so every variant runs under it.
``--no-retain`` measures glibc's defaults instead.

A step = zero_grad + forward + loss + backward (+ AdamW step for the adapters: the fused kernel for
ours, as our trainer uses; PEFT's with torch's default, as a PEFT user's loop would). Variants are timed
interleaved (ours, peft, floor, ours, ...) after a warm-up, and the median of each is reported.
Ends with ``RESULT {"lora_over_peft": ..., "lora_over_floor": ...}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--no-retain", action="store_true", help="glibc's default malloc settings")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    args = parser.parse_args()
    reps = 5 if args.quick else args.reps

    import peft
    from transformers.utils import logging as hf_logging

    from mtlora.adapters import (
        LoraLinear,
        forward_context,
        inject_adapters,
        kernels,
        make_adapter_config,
        trainable_parameters,
    )
    from mtlora.models import load_model, resolve_device
    from mtlora.objectives import supervised_lm_loss
    from mtlora.train import retain_freed_memory

    retained = False if args.no_retain else retain_freed_memory()

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    device = resolve_device(args.device)
    load = {"device": device, "precision": args.precision}

    def ours_with(backend: str, fused: bool = True):
        model, tok = load_model(args.model, **load)
        inject_adapters(model, make_adapter_config("lora", r=8, alpha=16, dropout=args.dropout,
                                                   target_modules="all-linear", backend=backend))
        if not fused:  # the same adapters without the one-node layer: what fusing it buys
            for module in model.modules():
                if isinstance(module, LoraLinear):
                    module.fused_route = False
        return model, tok

    ours, tok = ours_with("auto")
    base_for_peft, _ = load_model(args.model, **load)
    peft_model = peft.get_peft_model(
        base_for_peft, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules="all-linear")
    )
    floor, _ = load_model(args.model, **load)
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.enable_input_require_grads()  # backward runs through the whole frozen network

    vocab = ours.config.vocab_size
    input_ids = torch.randint(100, vocab, (args.batch, args.seq), device=device)
    labels = torch.full_like(input_ids, -100)
    labels[:, -args.answer_tokens:] = input_ids[:, -args.answer_tokens:]
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "task_ids": torch.zeros(args.batch, dtype=torch.long, device=device)}

    models = {"ours": ours, "torch": ours_with("torch")[0], "two_node": ours_with("torch", fused=False)[0],
              "reference": ours_with("reference")[0], "peft": peft_model}
    def peft_with_our_loss():
        base, _ = load_model(args.model, **load)
        return peft.get_peft_model(
            base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=args.dropout, target_modules="all-linear"))

    models["peft_our_loss"] = peft_with_our_loss()
    compiled_decoders = {}
    if not args.no_compile:
        models["peft_compiled"] = peft_with_our_loss()
        models["reference_compiled"] = ours_with("reference")[0]
        compiled_decoders = {name: torch.compile(models[name].get_decoder())
                             for name in ("peft_compiled", "reference_compiled")}
    models["floor"] = floor
    for m in models.values():
        m.to(device).train()
    optims = {name: torch.optim.AdamW([p for _, p in trainable_parameters(models[name])], lr=1e-4, fused=True)
              for name in ("ours", "torch", "two_node", "reference", "reference_compiled") if name in models}
    for name in ("peft", "peft_our_loss", "peft_compiled"):  # torch's default AdamW, as a PEFT user's loop would
        if name in models:
            optims[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-4)
    n_ours = sum(p.numel() for _, p in trainable_parameters(ours))
    n_peft = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert n_ours == n_peft, (n_ours, n_peft)

    def step(name: str) -> float:
        model = models[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        if name == "peft":
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        elif name in compiled_decoders:  # our loss path around the compiled decoder
            with forward_context(task_ids=batch["task_ids"]):
                hidden = compiled_decoders[name](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["labels"][:, 1:] != -100
            logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][keep]).float()
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"][:, 1:][keep])
        else:
            loss, _ = supervised_lm_loss(model, batch)
        loss.backward()
        if name in optims:
            optims[name].step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    compile_s: dict[str, float] = {}
    for name in models:  # warm-up (the compiled models compile here: timed apart)
        t0 = time.perf_counter()
        step(name)
        if name in compiled_decoders:
            compile_s[name] = round(time.perf_counter() - t0, 1)
        step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(reps):
        for name in models:
            times[name].append(step(name))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    print(f"SmolLM2 step: batch {args.batch} x {args.seq} tokens, {args.answer_tokens} answer tokens/row, "
          f"LoRA r=8 dropout {args.dropout} all-linear ({n_ours:,} trainable), {reps} interleaved reps, device {device}, "
          f"precision {args.precision}, "
          f"{torch.get_num_threads()} threads, freed memory retained: {retained}")
    print(f"{'variant':<18} {'median s':>9} {'min s':>9} {'max s':>9} {'/ peft':>8} {'/ floor':>8}")
    for name in models:
        print(f"{name:<18} {med[name]:>9.3f} {min(times[name]):>9.3f} {max(times[name]):>9.3f} "
              f"{med[name] / med['peft']:>8.3f} {med[name] / med['floor']:>8.3f}")
    for name, seconds in compile_s.items():
        print(f"({name}: first step, compiling, {seconds:.0f} s)")
    over = {name: {"over_peft": round(med[name] / med["peft"], 4), "over_floor": round(med[name] / med["floor"], 4)}
            for name in models if name != "floor"}
    result = {
        "lora_over_peft": round(med["ours"] / med["peft"], 4),
        "lora_over_floor": round(med["ours"] / med["floor"], 4),
        "fused_over_two_node": round(med["ours"] / med["two_node"], 4),
        "c_kernels_used": bool(kernels.library() is not None and args.precision == "fp32" and device.type == "cpu"),
        "ours_over_peft_our_loss": round(med["ours"] / med["peft_our_loss"], 4),
        "ours_over_peft_compiled": round(med["ours"] / med["peft_compiled"], 4) if "peft_compiled" in med else None,
        "ours_over_reference_compiled": (round(med["ours"] / med["reference_compiled"], 4)
                                         if "reference_compiled" in med else None),
        "variants": over,
        "compile_s": compile_s.get("peft_compiled"),
        "compile_s_by_variant": compile_s,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "dropout": args.dropout,
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "retain_freed_memory": retained,
    }
    print(f"ours / peft  = {result['lora_over_peft']:.3f}  (target <= 0.85)")
    print(f"ours / floor = {result['lora_over_floor']:.3f}  (target <= 1.10)")
    print(f"ours / ours without the one-node layer = {result['fused_over_two_node']:.3f}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
