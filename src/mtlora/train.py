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
on resume (each restores its own RNG state). Under FSDP a checkpoint keeps every rank's optimiser
shard, so it resumes under FSDP with the same processes and sharding only (checked, one-line error).

Checkpoints (``<output_dir>/checkpoint/``) hold the adapter (PEFT layout) and ``trainer_state.pt``:
optimiser, scheduler, every RNG, the sampler's position and the log history, written atomically
(temporary folder + rename). ``resume=True`` restores all of it, so on CPU an interrupted run
reaches the same final adapter, bit for bit, as an uninterrupted one. A non-finite loss stops the
run before the optimiser step, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlora import rundir
from mtlora.adapters import (
    count_parameters,
    inject_adapters,
    load_adapter,
    save_adapter,
    trainable_parameters,
)
from mtlora.adapters.io import load_adapter_weights, read_adapter_config
from mtlora.config import RunConfig, save_config
from mtlora.data.collate import TaskCollator
from mtlora.data.example import Example
from mtlora.data.samplers import MultiTaskBatchSampler, make_batch_sampler
from mtlora.data.tasks import kshot_sample, load_tasks
from mtlora.distributed import Dist, seed_rank
from mtlora.distributed import setup as setup_distributed
from mtlora.errors import UserError
from mtlora.fileio import atomic_write_dir, atomic_write_json
from mtlora.interrupts import Interrupted, graceful_stop
from mtlora.methods import LM_OBJECTIVE, get_method
from mtlora.models import load_model, portable_name, resolve_device
from mtlora.objectives import supervised_lm_loss
from mtlora.progress import StepLog, truncate_metrics

CHECKPOINT_DIR, ADAPTER_DIR, STATE_FILE = rundir.CHECKPOINT_DIR, rundir.ADAPTER_DIR, rundir.STATE_FILE

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


def training_examples(config: RunConfig) -> list[Example]:
    """The run's training set: the tasks' train splits, capped, and (``data.train_k_shot``) k per task."""
    examples = load_tasks(config.tasks, "train", config.data.max_train_per_task)
    if config.data.train_k_shot is not None:
        examples = kshot_sample(examples, config.data.train_k_shot, config.train.seed)
    return examples


def run_adapter_config(config: RunConfig, num_tasks: int):
    """The run's adapter config; a task router learns one row per task of the run."""
    adapter = config.adapter_config()
    if getattr(adapter, "router", None) in ("task", "task+token") and adapter.num_tasks is None:
        adapter = dataclasses.replace(adapter, num_tasks=num_tasks)
    return adapter


def prepare_run(config: RunConfig, world_size: int = 1, rank: int = 0) -> Run:
    """Load data first (cheap, catches user errors early), then the model, then inject adapters."""
    if config.train.retain_freed_memory:
        retain_freed_memory()
    train_examples = training_examples(config)
    eval_examples = load_tasks(config.tasks, "eval", config.data.max_eval_per_task)
    if not train_examples:
        raise UserError("tasks", "no training examples (check the task names and caps)")
    task_names = sorted({ex.task for ex in train_examples} | {ex.task for ex in eval_examples})
    if config.data.max_eval_per_task != 0:
        unevaluated = sorted({ex.task for ex in train_examples} - {ex.task for ex in eval_examples})
        if unevaluated and rank == 0:
            print(f"warning: no held-out eval rows for task(s) {', '.join(unevaluated)} (too few distinct "
                  "examples for the hash split); give a {name, train, eval} pair to evaluate them", file=sys.stderr)
    # several processes: load on the CPU, Accelerate places each rank's replica on its own device
    model, tokenizer = load_model(config.model, device="cpu" if world_size > 1 else config.device,
                                  precision=config.precision)
    seed_everything(config.train.seed)  # adapter init depends on the seed only
    inject_adapters(model, run_adapter_config(config, len(task_names)))
    collator = TaskCollator(tokenizer, task_names, config.data.max_length)
    if world_size > 1:
        seed_rank(config.train.seed, rank)  # same init everywhere, a dropout stream per rank
    return Run(config, model, tokenizer, task_names, train_examples, eval_examples, collator, world_size, rank)


def build_objective(config: RunConfig, *, num_tasks: int | None = None, reduce_fn=None) -> Objective:
    """The loss of a method: LM loss on answer tokens, plus the method's own terms.

    ``num_tasks``/``reduce_fn`` are Align-LoRA's data-parallel hooks: a fixed task count (so every
    rank's statistics have one shape) and the all-reduce of its per-task statistics.
    """
    method = get_method(config.method)
    if method.objective != LM_OBJECTIVE:  # a method's own objective: a factory of the run config
        return method.load("objective")(config, num_tasks=num_tasks, reduce_fn=reduce_fn)
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
) -> None:
    """Write the checkpoint atomically. Distributed: every rank must call it (their RNG states are
    gathered); rank 0 alone writes. Under DDP optimiser and adapter are replicas, so rank 0's are
    everyone's; under FSDP the adapter is gathered whole and every rank's optimiser shard is kept
    (``optimizer_per_rank``; ``optimizer`` then holds rank 0's shard)."""
    dist = dist or Dist()
    rng_per_rank = dist.gather_object(_rng_state())
    optimizer_state = dist.optimizer_state(optimizer)
    trainer_state = {
        "step": state.step,
        "optimizer": optimizer_state[0] if isinstance(optimizer_state, list) else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "sampler": sampler.state_dict(),
        "rng": rng_per_rank[0],
        "history": state.history,
        "evals": state.evals,
    }
    if dist.world_size > 1:
        trainer_state["rng_per_rank"] = rng_per_rank
    if isinstance(optimizer_state, list):
        trainer_state["optimizer_per_rank"] = optimizer_state
        trainer_state["fsdp_sharding"] = dist.fsdp["sharding_strategy"].name
    if dist.scaler is not None and dist.scaler.is_enabled():  # fp16: the loss scale resumes where it was
        trainer_state["scaler"] = dist.scaler.state_dict()
    if not dist.is_main and not dist.sharded:
        return

    def write(tmp: Path) -> None:
        save_adapter(run.model, tmp / ADAPTER_DIR, extra=adapter_extra(run), base_model_name=portable_name(run.config.model))
        torch.save(trainer_state, tmp / STATE_FILE)

    with dist.full_params(run.model):
        if dist.is_main:
            atomic_write_dir(out / CHECKPOINT_DIR, write)


def load_checkpoint(
    run: Run, optimizer, scheduler, sampler: MultiTaskBatchSampler, out: Path, dist: Dist | None = None
) -> TrainState:
    """Restore a checkpoint (every rank loads it). A rank restores its own RNG state when the world
    size is the one that saved it, else rank 0's (dropout masks then differ from the first run)."""
    dist = dist or Dist()
    ckpt = out / CHECKPOINT_DIR
    state_file = ckpt / STATE_FILE
    hint = "the checkpoint cannot be resumed; start the run again with --overwrite"
    try:
        saved = torch.load(state_file, weights_only=False, map_location="cpu")  # any device resumes it
    except Exception as exc:  # truncated, corrupt, or not a torch file: unpickling raises many types
        raise UserError(state_file, f"unreadable ({type(exc).__name__}: {str(exc)[:80]}); {hint}") from None
    needed = ("step", "optimizer", "scheduler", "sampler", "rng", "history", "evals")
    if not isinstance(saved, dict) or any(k not in saved for k in needed):
        raise UserError(state_file, f"not a trainer state of this tool (expected keys {list(needed)}); {hint}")
    if not (ckpt / ADAPTER_DIR).is_dir():
        raise UserError(ckpt / ADAPTER_DIR, f"missing; {hint}")
    load_adapter_weights(run.model, ckpt / ADAPTER_DIR)  # whole weights, before any FSDP wrapping shards them
    _check_optimizer_layout(saved, state_file, dist)
    try:
        if dist.fsdp is None:
            optimizer.load_state_dict(saved["optimizer"])  # moves the state onto the parameters' device
        else:  # this rank's shard fits only the sharded parameters: loaded after wrapping
            dist.pending_optimizer = saved["optimizer_per_rank"][dist.rank]
        scheduler.load_state_dict(saved["scheduler"])
        if dist.scaler is not None and "scaler" in saved:
            dist.scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError) as exc:
        raise UserError(state_file, f"optimiser state does not fit this run's adapter ({exc}); {hint}") from None
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


def _check_optimizer_layout(saved: dict[str, Any], state_file: Path, dist: Dist) -> None:
    """A sharded (FSDP) optimiser state resumes only under FSDP with the same processes and sharding;
    a whole one (one process, DDP) only outside FSDP. ``load_state_dict`` checks no shapes, so a
    mismatch would otherwise fail steps later, or silently apply another parameter's moments."""
    shards = saved.get("optimizer_per_rank")
    if dist.fsdp is None and shards is not None:
        raise UserError(state_file, f"written by an FSDP run of {len(shards)} processes (its optimiser state is "
                                    f"sharded); resume it under FSDP with {len(shards)} processes")
    if dist.fsdp is not None:
        sharding = dist.fsdp["sharding_strategy"].name
        if shards is None:
            raise UserError(state_file, "written by a one-process or DDP run; an FSDP run resumes only FSDP "
                                        "checkpoints (resume this one without FSDP)")
        if len(shards) != dist.world_size or saved.get("fsdp_sharding") != sharding:
            raise UserError(state_file, f"written by FSDP with {len(shards)} processes ({saved.get('fsdp_sharding')}); "
                                        f"resume with the same (this launch: {dist.world_size}, {sharding})")


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
        protocol=run.config.eval.protocol,
    )
    return {"step": step, **report.to_dict()}


def make_optimizer(model: nn.Module, config: RunConfig, steps: int, lr: float | None = None):
    from transformers import get_cosine_schedule_with_warmup

    params = [p for _, p in trainable_parameters(model)]
    # the fused kernel: one pass per tensor instead of ~10 elementwise ops (8 ms vs 32 ms per
    # SmolLM2 LoRA step on one CPU thread; same update up to rounding, deterministic)
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.train.lr if lr is None else lr, weight_decay=config.train.weight_decay, fused=fused)
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
    with dist.full_params(model) if dist is not None else nullcontext():  # FSDP: gathered on rank 0
        if is_main:
            save_adapter(model, out / ADAPTER_DIR, extra=adapter_extra(run), base_model_name=portable_name(run.config.model))
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
        atomic_write_json(out / rundir.RESULTS_FILE, summary)
    return summary


class GradientSteps:
    """The plain procedure: ``grad_accum`` micro-batches -> objective -> backward, per optimiser step.

    A procedure gives the loop its sampler (checkpointed), its step count and learning rate, and
    ``gradients()``, which leaves the step's gradients on the trainable parameters and returns its logs.
    MeTA-LoRA's meta-iteration (``mtlora.meta.MetaSteps``) is the other procedure.
    """

    description = "train"

    def __init__(self, run: Run, dist: Dist):
        self.run, self.dist, config = run, dist, run.config
        self.sampler = run.sampler()
        self.total = total_steps(config, len(self.sampler))
        self.lr = config.train.lr
        if dist.world_size == 1:
            self.objective = build_objective(config)
        else:  # Align-LoRA: one statistics shape on every rank, all-reduced before its loss is formed
            self.objective = build_objective(config, num_tasks=len(run.task_names), reduce_fn=dist.reduce_task_stats)
        if config.train.gradient_checkpointing:
            run.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def bind(self, optimizer):
        self.step_fn, optimizer = self.dist.wrap(self.run.model, self.objective, optimizer)
        self.stream = micro_batches(self.run, self.sampler)
        return optimizer

    def gradients(self, step: int) -> dict[str, float]:
        dist, accum = self.dist, self.run.config.train.grad_accum
        logs: dict[str, float] = {}
        tokens = 0.0
        for micro in range(accum):
            batch = dist.to_device(next(self.stream))
            tokens += float(batch["attention_mask"].sum())
            weight = dist.token_weight(batch)  # 1.0 alone; this rank's token share under DDP
            with dist.no_sync(self.step_fn, sync=micro == accum - 1):
                loss, parts = self.step_fn(batch)
                if not dist.all_finite(loss):
                    raise TrainingDiverged(f"loss is {loss.item()} at step {step}")
                dist.backward(loss * weight / accum)
            for key, value in {"loss": loss.detach(), **parts}.items():
                logs[key] = logs.get(key, 0.0) + float(value) * weight / accum
        logs = dist.reduce_logs(logs)
        logs["tokens"] = float(dist.all_sum(torch.tensor([tokens]))[0])
        return logs

    def extra(self) -> dict[str, Any]:
        if hasattr(self.objective, "skipped"):  # Align-LoRA: batches with fewer than 2 tasks
            return {"align_skipped_batches": self.objective.skipped}
        return {}


def procedure_for(config: RunConfig):
    return get_method(config.method).load("procedure")


# Keys that may change on --resume: they do not alter the training trajectory (max_steps and
# meta.iterations extend it; the cosine schedule is recomputed for the new total; a moved run
# folder resumes where it now is).
RESUME_MAY_CHANGE = ("output_dir", "train.max_steps", "meta.iterations", "train.log_every", "train.save_every",
                     "train.eval_every", "eval.batch_size")


def check_resume_config(out: Path, config: RunConfig) -> list[str]:
    """On resume the saved ``config.yaml`` is the truth: any other difference is a ``UserError``."""
    from mtlora.config import config_differences, load_config

    saved_path = out / rundir.CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(saved_path, "missing: cannot check that the resumed run has the config it started with")
    saved = load_config(saved_path)
    diffs = config_differences(saved, config)
    refused = [d for d in diffs if d[0] not in RESUME_MAY_CHANGE or (
        d[0] in ("train.max_steps", "meta.iterations") and (d[2] is None or (d[1] is not None and d[2] < d[1])))]
    if refused:
        listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused[:4])
        more = f" (+{len(refused) - 4} more)" if len(refused) > 4 else ""
        raise UserError(out, f"cannot resume with a changed config: {listed}{more}; resume takes the saved "
                             f"{rundir.CONFIG_FILE} and allows only {', '.join(RESUME_MAY_CHANGE)} to change "
                             "(steps upward only)")
    return [d[0] for d in diffs]


def train(
    config: RunConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    run: Run | None = None,
) -> dict[str, Any]:
    """Train the config's adapter; returns a summary (final adapter path, history, last eval).

    Nothing is written until the config, the data, the model and (on resume) the checkpoint have been
    checked. Under ``accelerate launch`` every process calls this; rank 0 writes, logs and evaluates.
    A SIGINT/SIGTERM ends the current step, writes a checkpoint and raises ``Interrupted``.
    """
    device = resolve_device(config.device)  # a device this machine lacks: one line, before any output
    dist = setup_distributed()
    if dist.world_size == 1:
        dist.local_device = device
    # fp16 needs a loss scale (its range underflows small gradients); bf16 and fp32 do not
    dist.scaler = scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    out = Path(config.output_dir)
    plan = rundir.check(out, resume=resume, overwrite=overwrite)  # every rank checks, before any wait
    if dist.fsdp is not None and config.precision != "fp32":
        raise UserError("precision", f"{config.precision} is not supported under FSDP: FSDP (v1) flattens a decoder "
                        "layer's frozen base weights and its fp32 adapter weights into one tensor, which must have one "
                        "dtype; use precision: fp32 under FSDP, or DDP")
    if resume:
        if dist.sharded and dist.fsdp is None:
            raise UserError("--resume", "resuming DeepSpeed runs is not supported (the engine shards the optimiser "
                            "state and checkpoints do not save it); resume under FSDP, DDP or one process")
        changed = check_resume_config(out, config)
    if dist.is_main:
        rundir.claim(plan)
    dist.barrier()
    started = False
    try:
        run = run or prepare_run(config, dist.world_size, dist.rank)
        procedure = procedure_for(config)(run, dist)
        optimizer, scheduler = make_optimizer(run.model, config, procedure.total, lr=procedure.lr)
        state = TrainState()
        if resume:
            state = load_checkpoint(run, optimizer, scheduler, procedure.sampler, out, dist)
            if state.step > procedure.total:
                raise UserError(out, f"the checkpoint is at step {state.step}, past the {procedure.total} steps "
                                     "this config asks for")
        optimizer = procedure.bind(optimizer)
        try:
            dist.load_optimizer_shard(optimizer)  # FSDP resume: the shard fits the wrapped parameters only
        except (ValueError, KeyError) as exc:
            raise UserError(out / CHECKPOINT_DIR / STATE_FILE, f"optimiser state does not fit this run's adapter "
                                                               f"({exc}); start the run again with --overwrite") from None
        if dist.is_main:
            if resume:
                if changed:
                    save_config(config, out / rundir.CONFIG_FILE)
                truncate_metrics(out / rundir.METRICS_FILE, state.step)
            else:
                rundir.start(plan, lambda path: save_config(config, path))
        started = True
    finally:
        if not started and dist.is_main:
            rundir.release(plan)
    model, tcfg, steps = run.model, config.train, procedure.total
    theta = [p for _, p in trainable_parameters(model)]
    log = StepLog(steps, state.step, tcfg.log_every, show_bar=progress and dist.is_main, show_lines=dist.is_main,
                  metrics_path=out / rundir.METRICS_FILE if dist.is_main else None,
                  description=procedure.description)
    model.train()
    start = time.perf_counter()
    try:
        with graceful_stop() as stop:
            while state.step < steps:
                step_start = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                try:
                    logs = procedure.gradients(state.step + 1)
                except TrainingDiverged as exc:
                    raise TrainingDiverged(f"{exc}; stopped before the optimiser step. The last good checkpoint "
                                           f"is in {out / rundir.CHECKPOINT_DIR}") from None
                scaler.unscale_(optimizer)  # no-op but for fp16: clip and log the true gradient
                if tcfg.max_grad_norm is not None:
                    norm = dist.clip_grad_norm_(theta, tcfg.max_grad_norm)
                    if norm is not None:
                        logs["grad_norm"] = norm
                logs["lr"] = scheduler.get_last_lr()[0]
                scaler.step(optimizer)  # on theta: the adapter (MeTA-LoRA: the shared LoRA, not the theta_i);
                scaler.update()  # fp16: a step whose gradients overflowed is skipped and the scale shrinks
                scheduler.step()
                state.step += 1
                logs["step_seconds"] = time.perf_counter() - step_start
                state.history.append({"step": state.step, **logs})
                log.step(state.step, logs)
                if tcfg.eval_every and state.step % tcfg.eval_every == 0 and state.step < steps:
                    with dist.full_params(model):  # FSDP: rank 0 evaluates the gathered model
                        if dist.is_main:  # the other ranks wait at their next collective
                            state.evals.append(evaluate_run(run, state.step, progress=False))
                            log.append({"step": state.step, "eval": state.evals[-1]["macro"]})
                    model.train()
                stopping = dist.world_size > 1 and float(dist.all_sum(torch.tensor([1.0 if stop else 0.0]))[0]) > 0
                stopping = stopping or (dist.world_size == 1 and bool(stop))
                if state.step % tcfg.save_every == 0 or state.step == steps or stopping:
                    save_checkpoint(run, optimizer, scheduler, procedure.sampler, state, out, dist)
                if stopping:  # also on the last step: the final evaluation is what resume then runs
                    raise Interrupted(stop.signum or 2, f"interrupted at step {state.step}/{steps}; checkpoint "
                                      f"(step {state.step}) in {out / rundir.CHECKPOINT_DIR}",
                                      checkpoint_step=state.step)
    finally:
        log.close()

    elapsed = time.perf_counter() - start
    extra = {"world_size": dist.world_size, **procedure.extra()}
    summary = finish_run(run, state, out, elapsed, progress=progress, dist=dist, extra=extra)
    if dist.is_main:
        for hook in get_method(config.method).hooks():  # e.g. Align-LoRA's loss plot
            hook(run, state, out)
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
