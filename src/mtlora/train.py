"""The training loop, readable top to bottom.

    prepare_run(config)           model + adapters, train/eval examples, collator, sampler
    train(config, resume=...)     for each optimiser step:
                                      grad_accum micro-batches -> objective -> backward
                                      clip -> AdamW step -> cosine schedule -> log / eval / checkpoint

Data parallelism (``accelerate launch --num_processes N``, or ``mtlora train --num-processes N``;
``mtlora.distributed`` explains the loss weighting): ``train.batch_size`` is the micro-batch *per
process*, so the global batch is ``batch_size * N`` and every rank takes a contiguous slice of it;
the loss and the final adapter equal those of one process with ``batch_size * N`` (to rounding).
Rank 0 alone writes the output folder, checkpoints, logs and progress; every rank loads a checkpoint
on resume (each restores its own RNG state).

Checkpoints (``<output_dir>/checkpoint/``) hold the adapter (PEFT layout) and ``trainer_state.pt``:
optimiser, scheduler, every RNG, the sampler's position and the log history, written atomically
(temporary folder + rename). ``resume=True`` restores all of it, so on CPU an interrupted run
reaches the same final adapter, bit for bit, as an uninterrupted one. A non-finite loss stops the
run before the optimiser step, keeping the last good checkpoint.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlora.adapters import (
    count_parameters,
    inject_adapters,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from mtlora.adapters.io import atomic_write_dir, load_adapter_weights, read_adapter_config
from mtlora.config import RunConfig, save_config
from mtlora.data.collate import TaskCollator
from mtlora.data.example import Example
from mtlora.data.samplers import MultiTaskBatchSampler, make_batch_sampler
from mtlora.data.tasks import load_tasks
from mtlora.distributed import Dist, seed_rank
from mtlora.distributed import setup as setup_distributed
from mtlora.errors import UserError
from mtlora.models import load_model, resolve_device
from mtlora.objectives import supervised_lm_loss

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"

Objective = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, Any]]]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything a training run needs, built once from the config."""

    config: RunConfig
    model: nn.Module
    tokenizer: Any
    task_names: list[str]
    train_examples: list[Example]
    eval_examples: list[Example]
    collator: TaskCollator
    world_size: int = 1
    rank: int = 0

    def sampler(self) -> MultiTaskBatchSampler:
        data, train = self.config.data, self.config.train
        return make_batch_sampler(
            data.sampler,
            [ex.task for ex in self.train_examples],
            batch_size=train.batch_size * self.world_size,
            seed=train.seed,
            tasks_per_batch=data.tasks_per_batch,
            num_replicas=self.world_size,
            rank=self.rank,
        )


@dataclass
class TrainState:
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def retain_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS (Linux only).

    Why: a training step frees and re-allocates the same activation-sized buffers every step. With
    glibc's defaults, buffers of a few MB sometimes come from fresh ``mmap``/``sbrk`` pages, and every
    first touch of a 4 KB page is a page fault: measured on the 2-core VM, 4-38 thousand faults
    per SmolLM2 LoRA step (~7-10 us each, ~2-4 % of the step; the frozen base alone had none) and
    0-5 after this call (``docs/performance.md``). The settings: no ``mmap`` below 32 MB (glibc's
    maximum), no trimming of the heap top below 1 GB, and 256 MB of slack per heap growth. The
    process then holds on to its peak working set, as a caching allocator (jemalloc, PyTorch's
    CUDA allocator) would. Returns whether the settings took effect (False off glibc).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # <malloc.h>
    return all(
        mallopt(option, value) == 1
        for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 256 << 20))
    )


def prepare_run(config: RunConfig, world_size: int = 1, rank: int = 0) -> Run:
    """Load data first (cheap, catches user errors early), then the model, then inject adapters."""
    if config.train.retain_freed_memory:
        retain_freed_memory()
    train_examples = load_tasks(config.tasks, "train", config.data.max_train_per_task)
    eval_examples = load_tasks(config.tasks, "eval", config.data.max_eval_per_task)
    if not train_examples:
        raise UserError("tasks", "no training examples (check the task names and caps)")
    task_names = sorted({ex.task for ex in train_examples} | {ex.task for ex in eval_examples})
    # several processes: load on the CPU, Accelerate places each rank's replica on its own device
    model, tokenizer = load_model(config.model, device="cpu" if world_size > 1 else config.device,
                                  precision=config.precision)
    seed_everything(config.train.seed)  # adapter init depends on the seed only
    inject_adapters(model, config.adapter_config())
    collator = TaskCollator(tokenizer, task_names, config.data.max_length)
    if world_size > 1:
        seed_rank(config.train.seed, rank)  # same init everywhere, a dropout stream per rank
    return Run(config, model, tokenizer, task_names, train_examples, eval_examples, collator, world_size, rank)


def build_objective(config: RunConfig, *, num_tasks: int | None = None, reduce_fn=None) -> Objective:
    """The loss of a method: LM loss on answer tokens, plus the method's own terms.

    ``num_tasks``/``reduce_fn`` are Align-LoRA's data-parallel hooks: a fixed task count (so every
    rank's statistics have one shape) and the all-reduce of its per-task statistics.
    """
    if config.method == "align_lora":
        from mtlora.objectives.align import AlignObjective

        return AlignObjective(config.align, num_tasks=num_tasks, reduce_fn=reduce_fn)
    if getattr(config.adapter_config(), "load_balance_coef", 0.0) > 0:
        return _with_router_balance(supervised_lm_loss)
    return supervised_lm_loss


def _with_router_balance(objective: Objective) -> Objective:
    """Add the multi-head router's load-balancing loss (off by default, as in both papers)."""
    from mtlora.adapters.multihead import router_aux_loss

    def balanced(model: nn.Module, batch: dict[str, torch.Tensor]):
        loss, logs = objective(model, batch)
        aux = router_aux_loss(model)
        if aux is None:
            return loss, logs
        return loss + aux, {**logs, "router_aux_loss": aux.detach()}

    return balanced


def total_steps(config: RunConfig, batches_per_epoch: int) -> int:
    if config.train.max_steps is not None:
        return config.train.max_steps
    steps = math.floor(config.train.epochs * batches_per_epoch / config.train.grad_accum)
    if steps < 1:
        raise UserError("train.epochs", "gives zero optimiser steps; raise epochs or set train.max_steps")
    return steps


def micro_batches(run: Run, sampler: MultiTaskBatchSampler) -> Iterator[dict[str, torch.Tensor]]:
    """An endless stream of collated micro-batches; the sampler remembers where it is."""
    while True:
        for indices in sampler:
            yield run.collator([run.train_examples[i] for i in indices])


def prepare_output_dir(path: Path, resume: bool, overwrite: bool, *, create: bool = True) -> None:
    """Check the output folder (and, with ``create``, empty/create it: rank 0 only, the others check)."""
    if resume:
        if not (path / CHECKPOINT_DIR / STATE_FILE).is_file():
            raise UserError(path, "nothing to resume: no checkpoint in this output folder")
        return
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise UserError(path, "output folder exists and is not empty; pass --overwrite or --resume")
        if create:
            shutil.rmtree(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def save_checkpoint(
    run: Run,
    optimizer,
    scheduler,
    sampler: MultiTaskBatchSampler,
    state: TrainState,
    out: Path,
    dist: Dist | None = None,
    scaler=None,
) -> None:
    """Write the checkpoint atomically. Distributed: every rank must call it (their RNG states are
    gathered); rank 0 alone writes. Optimiser and adapter are replicas, so rank 0's are everyone's."""
    dist = dist or Dist()
    rng_per_rank = dist.gather_object(_rng_state())
    trainer_state = {
        "step": state.step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_per_rank[0],
        "history": state.history,
        "evals": state.evals,
    }
    if dist.world_size > 1:
        trainer_state["rng_per_rank"] = rng_per_rank
    if scaler is not None and scaler.is_enabled():  # fp16: the loss scale resumes where it was
        trainer_state["scaler"] = scaler.state_dict()
    if not dist.is_main and not dist.sharded:
        return

    def write(tmp: Path) -> None:
        save_adapter(run.model, tmp / ADAPTER_DIR, extra=adapter_extra(run))
        torch.save(trainer_state, tmp / STATE_FILE)

    with dist.full_params(run.model):
        if dist.is_main:
            atomic_write_dir(out / CHECKPOINT_DIR, write)


def load_checkpoint(
    run: Run, optimizer, scheduler, sampler: MultiTaskBatchSampler, out: Path, dist: Dist | None = None,
    scaler=None,
) -> TrainState:
    """Restore a checkpoint (every rank loads it). A rank restores its own RNG state when the world
    size is the one that saved it, else rank 0's (dropout masks then differ from the first run)."""
    dist = dist or Dist()
    ckpt = out / CHECKPOINT_DIR
    saved = torch.load(ckpt / STATE_FILE, weights_only=False, map_location="cpu")  # any device resumes it
    load_adapter_weights(run.model, ckpt / ADAPTER_DIR)
    optimizer.load_state_dict(saved["optimizer"])  # moves the state onto the parameters' device
    scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and "scaler" in saved:
        scaler.load_state_dict(saved["scaler"])
    try:
        sampler.load_state_dict(saved["sampler"])
    except ValueError as exc:
        raise UserError(
            out, f"cannot resume: {exc} (resume with the same global batch: train.batch_size x processes)"
        ) from None
    per_rank = saved.get("rng_per_rank")
    rng = per_rank[dist.rank] if per_rank and len(per_rank) == dist.world_size else saved["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return TrainState(step=saved["step"], history=saved["history"], evals=saved["evals"])


def adapter_extra(run: Run) -> dict[str, Any]:
    """What we save beside the adapter: how it was trained, and the task-id order it saw."""
    return {"base_model": run.config.model, "method": run.config.method, "task_names": run.task_names}


def evaluate_run(run: Run, step: int, progress: bool) -> dict[str, Any]:
    from mtlora.evaluate import evaluate

    report = evaluate(
        run.model,
        run.tokenizer,
        run.eval_examples,
        batch_size=run.config.eval.batch_size,
        max_new_tokens=run.config.eval.max_new_tokens,
        progress=progress,
        task_names=run.task_names,
    )
    return {"step": step, **report.to_dict()}


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)


def make_optimizer(model: nn.Module, config: RunConfig, steps: int):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for _, p in trainable_parameters(model)]
    # the fused kernel: one pass per tensor instead of ~10 elementwise ops (8 ms vs 32 ms per
    # SmolLM2 LoRA step on one CPU thread; same update up to rounding, deterministic)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.train.lr, weight_decay=config.train.weight_decay, fused=fused)
    warmup = math.ceil(config.train.warmup_ratio * steps)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    return optimizer, scheduler


def finish_run(
    run: Run, state: TrainState, out: Path, elapsed: float, *, progress: bool, dist=None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save the final adapter, run the final evaluation, write ``results.json``: the end of every
    training procedure (the main loop here, MeTA-LoRA's meta loop). Only the main rank writes."""
    is_main = dist is None or dist.is_main
    model = run.model
    model.eval()
    with dist.full_params(model) if dist is not None else nullcontext():
        if is_main:
            save_adapter(model, out / ADAPTER_DIR, extra=adapter_extra(run))
    if is_main and run.eval_examples:
        state.evals.append(evaluate_run(run, state.step, progress=progress))
    trainable, total = count_parameters(model)
    summary = {
        "adapter": str(out / ADAPTER_DIR),
        "method": run.config.method,
        "steps": state.step,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "train_seconds": elapsed,
        **(extra or {}),
        "history": state.history,
        "evals": state.evals,
    }
    if is_main:
        _write_json(out / "results.json", summary)
    return summary


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    run: Run | None = None,
) -> dict[str, Any]:
    """Train the config's adapter; returns a summary (final adapter path, history, last eval).

    Under ``accelerate launch`` every process calls this; rank 0 writes, logs and evaluates.
    """
    device = resolve_device(config.device)  # a device this machine lacks: one line, before any output
    dist = setup_distributed()
    if dist.world_size == 1:
        dist.local_device = device
    out = Path(config.output_dir)
    prepare_output_dir(out, resume, overwrite, create=False)  # every rank checks, before any wait
    if dist.is_main:
        prepare_output_dir(out, resume, overwrite)
    dist.barrier()
    run = run or prepare_run(config, dist.world_size, dist.rank)
    model, tcfg = run.model, config.train
    if dist.is_main:
        save_config(config, out / "config.yaml")
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sampler = run.sampler()
    steps = total_steps(config, len(sampler))
    optimizer, scheduler = make_optimizer(model, config, steps)
    if dist.world_size == 1:
        objective = build_objective(config)
    else:  # Align-LoRA: one statistics shape on every rank, all-reduced before its loss is formed
        objective = build_objective(config, num_tasks=len(run.task_names), reduce_fn=dist.reduce_task_stats)
    if resume and dist.sharded:
        raise UserError("--resume", "resuming FSDP/DeepSpeed runs is not supported yet (their optimiser "
                        "state is sharded); resume under DDP or one process")
    # fp16 needs a loss scale (its range underflows small gradients); bf16 and fp32 do not
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    state = load_checkpoint(run, optimizer, scheduler, sampler, out, dist, scaler) if resume else TrainState()
    step_fn, optimizer = dist.wrap(model, objective, optimizer)
    stream = micro_batches(run, sampler)
    model.train()

    from mtlora.progress import step_progress

    start = time.perf_counter()
    with step_progress(steps, enabled=progress and dist.is_main, initial=state.step) as bar:
        while state.step < steps:
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logs: dict[str, float] = {}
            for micro in range(tcfg.grad_accum):
                batch = dist.to_device(next(stream))
                weight = dist.token_weight(batch)  # 1.0 alone; this rank's token share under DDP
                with dist.no_sync(step_fn, sync=micro == tcfg.grad_accum - 1):
                    loss, parts = step_fn(batch)
                    if not dist.all_finite(loss):
                        raise TrainingDiverged(
                            f"loss is {loss.item()} at step {state.step + 1}; stopped before the optimiser "
                            f"step. The last good checkpoint is in {out / CHECKPOINT_DIR}"
                        )
                    dist.backward(scaler.scale(loss * weight / tcfg.grad_accum))
                for key, value in {"loss": loss.detach(), **parts}.items():
                    logs[key] = logs.get(key, 0.0) + float(value) * weight / tcfg.grad_accum
            logs = dist.reduce_logs(logs)
            scaler.unscale_(optimizer)  # no-op but for fp16: clip and log the true gradient
            if tcfg.max_grad_norm:
                norm = dist.clip_grad_norm_([p for _, p in trainable_parameters(model)], tcfg.max_grad_norm)
                if norm is not None:
                    logs["grad_norm"] = norm
            logs["lr"] = scheduler.get_last_lr()[0]
            scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scale then shrinks)
            scaler.update()
            scheduler.step()
            state.step += 1
            logs["step_seconds"] = time.perf_counter() - step_start
            state.history.append({"step": state.step, **logs})
            bar.update(loss=logs["loss"])
            if tcfg.eval_every and state.step % tcfg.eval_every == 0 and state.step < steps:
                if dist.is_main:  # the other ranks wait at their next collective
                    state.evals.append(evaluate_run(run, state.step, progress=False))
                model.train()
            if state.step % tcfg.save_every == 0 or state.step == steps:
                save_checkpoint(run, optimizer, scheduler, sampler, state, out, dist, scaler)

    elapsed = time.perf_counter() - start
    extra = {"world_size": dist.world_size}
    if config.method == "align_lora":
        extra["align_skipped_batches"] = getattr(objective, "skipped", 0)
    summary = finish_run(run, state, out, elapsed, progress=progress, dist=dist, extra=extra)
    if dist.is_main and config.method == "align_lora":
        from mtlora.objectives.align import plot_align_history

        plot_align_history(state.history, out / "align_history.png")
    dist.barrier()  # every rank returns once the outputs exist
    return summary


def load_trained(adapter_dir: str | Path, base: str | None = None, *, device: str | None = None,
                 precision: str | None = None):
    """Base model + a saved adapter, ready for evaluation (the base is read from the adapter)."""
    _, extra = read_adapter_config(adapter_dir)  # validates before the model is loaded
    model, tokenizer = load_model(base or extra.get("base_model") or "smollm2-135m", device=device,
                                  precision=precision)
    _, extra = load_adapter(model, adapter_dir)
    model.eval()
    return model, tokenizer, extra
