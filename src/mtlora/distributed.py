"""Data-parallel training with Hugging Face Accelerate, exact to the single-process run.

``mtlora train`` needs no changes to run under ``accelerate launch --num_processes N`` (or
``mtlora train --num-processes N``, which re-launches itself that way). :func:`setup` reads the
launcher's environment: with one process it returns a :class:`Dist` that does nothing (the trainer's
single-process path, bit for bit as before); with several it builds an ``Accelerator`` whose
DDP wrapper uses ``find_unused_parameters=True`` (multi-head adapters may leave a head or the
router without gradient on some step).

Why the loss is reweighted. The LM loss is a mean over the supervised tokens of a micro-batch. Under
DDP each rank would average its own tokens and DDP averages the gradients over ranks, which equals
the global token mean only when every rank holds the same number of answer tokens. So each rank's
loss is multiplied by its *token share* ``c_r = W * n_r / N`` (``n_r`` its supervised tokens, ``N``
their sum over the ``W`` ranks): DDP's average of ``c_r * mean_r`` is exactly ``sum / N``, the
single-process loss of the same global batch.

Terms formed from all-reduced statistics (Align-LoRA's per-task sums, squared sums and counts) have
the same value on every rank and must not be weighted by ``c_r``: :meth:`Dist.reduce_task_stats`
all-reduces them with the differentiable ``torch.distributed.nn.functional.all_reduce`` (whose
backward sums the ranks' gradients, i.e. multiplies by ``W``, which DDP's average divides out again)
and divides their gradient by ``c_r`` to cancel the weighting. Result: loss and gradient equal the
single-process ones over the same global batch (to float rounding; tested with 2 CPU processes).
The statistics travel on their own process group so they never interleave with DDP's buckets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtlora.data.collate import IGNORE_INDEX  # noqa: E402 (the labels' home)


def launched_world_size() -> int:
    """Number of processes the launcher (accelerate launch, torchrun) started; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class ObjectiveModule(nn.Module):
    """``forward(batch) = objective(model, batch)``: the unit DDP wraps.

    The objectives call ``model.get_decoder()`` and the LM head directly (answer-only logits), never
    ``model.forward``; DDP only synchronises gradients of a forward that goes through its own
    ``forward``, so the whole objective is what gets wrapped.
    """

    def __init__(self, model: nn.Module, objective: Callable):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.objective(self.model, batch)


@dataclasses.dataclass
class Dist:
    """The process group as the trainer sees it; every method is a no-op for one process."""

    world_size: int = 1
    rank: int = 0
    accelerator: Any = None
    stats_group: Any = None
    wrapped: Any = None  # the DDP/FSDP/DeepSpeed-wrapped ObjectiveModule, once wrap() ran
    local_device: torch.device | None = None  # one process: the config's device (batches go there)
    scaler: Any = None  # the trainer's torch.amp.GradScaler (enabled for fp16 only)
    _weight: float = 1.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """Where batches go (None: leave them where the collator put them, on the CPU)."""
        if self.accelerator is not None:
            return self.accelerator.device
        return None if self.local_device is None or self.local_device.type == "cpu" else self.local_device

    # -- collectives -------------------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of a (non-differentiable) tensor over ranks."""
        if self.world_size == 1:
            return values
        out = values.detach().clone().to(self.device)
        torch.distributed.all_reduce(out)
        return out.cpu()

    def gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    # -- the loss ----------------------------------------------------------------------------
    def token_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """This rank's share ``c_r = W n_r / N`` of the micro-batch's supervised tokens (1 alone)."""
        if self.world_size == 1:
            self._weight = 1.0
            return 1.0
        local = (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float64)
        total = float(self.all_sum(local.view(1)))
        if float(local) == 0 or total == 0:
            raise ValueError("a rank's micro-batch has no supervised tokens (every label is -100)")
        self._weight = self.world_size * float(local) / total
        return self._weight

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether every rank's loss is finite (all ranks must agree to stop, or the others hang)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if self.world_size == 1:
            return finite
        return float(self.all_sum(torch.tensor([0.0 if finite else 1.0]))) == 0.0

    def reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Token-weighted mean of each logged value over ranks (values already carry ``c_r``)."""
        if self.world_size == 1:
            return logs
        keys = sorted(logs)
        summed = self.all_sum(torch.tensor([logs[k] for k in keys], dtype=torch.float64))
        return {k: float(v) / self.world_size for k, v in zip(keys, summed, strict=True)}

    def reduce_task_stats(self, stats):
        """Align-LoRA's ``reduce_fn``: all-reduce (sum, sumsq, count) so every rank forms the loss of
        the global batch; gradients flow back to each rank's own features (see the module doc)."""
        if self.world_size == 1:
            return stats
        from torch.distributed.nn.functional import all_reduce

        s, q, n = stats.sum, stats.sumsq, stats.count
        if n.dim() == 2:  # per position: ranks pad to their own longest row; pad to the global one
            t = int(self.all_max(torch.tensor([n.shape[1]], dtype=torch.float64)))
            s, q = (F.pad(x, (0, 0, 0, t - x.shape[1])) for x in (s, q))
            n = F.pad(n, (0, t - n.shape[1]))
        shapes = [s.shape, q.shape, n.shape]
        flat = torch.cat([s.reshape(-1), q.reshape(-1), n.reshape(-1).to(s.dtype)])
        flat = all_reduce(flat, group=self.stats_group)
        flat = _ScaleGrad.apply(flat, 1.0 / self._weight)
        s_g, q_g, n_g = torch.split(flat, [x.numel() for x in shapes])
        return dataclasses.replace(
            stats, sum=s_g.view(shapes[0]), sumsq=q_g.view(shapes[1]), count=n_g.detach().view(shapes[2])
        )

    def all_max(self, values: torch.Tensor) -> torch.Tensor:
        """Maximum over ranks, on the statistics group (it runs inside the DDP-wrapped forward)."""
        if self.world_size == 1:
            return values
        out = values.detach().clone().to(self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=self.stats_group)
        return out.cpu()

    # -- model and optimiser ------------------------------------------------------------------
    def wrap(self, model: nn.Module, objective: Callable, optimizer):
        """``(step_fn, optimizer)``: ``step_fn(batch) -> (loss, logs)`` runs through DDP when distributed.

        The scheduler is deliberately not prepared: Accelerate's scheduler wrapper steps once per
        process, and the trainer's schedule counts optimiser steps.
        """
        if self.world_size == 1:
            return (lambda batch: objective(model, batch)), optimizer
        if "FSDP" in str(self.accelerator.distributed_type):
            self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(model)
        self.wrapped, optimizer = self.accelerator.prepare(ObjectiveModule(model, objective), optimizer)
        return self.wrapped, optimizer

    @contextlib.contextmanager
    def no_sync(self, step_fn, sync: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
        if sync or self.world_size == 1:
            yield
            return
        with self.accelerator.no_sync(step_fn):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``; through Accelerate when distributed (DeepSpeed's engine needs that).
        With fp16, ``scaler`` (the trainer's ``GradScaler``) scales the loss first."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float | None:
        """The gradient norm before clipping; None where DeepSpeed clips inside its own step."""
        if self.accelerator is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)

    @property
    def sharded(self) -> bool:
        """Whether parameters or optimiser state are split across ranks (FSDP, DeepSpeed)."""
        kind = str(getattr(self.accelerator, "distributed_type", ""))
        return "FSDP" in kind or "DEEPSPEED" in kind

    @contextlib.contextmanager
    def full_params(self, model: nn.Module) -> Iterator[None]:
        """Every rank enters; inside, ``model``'s adapter weights are whole (FSDP / ZeRO-3 shard them).

        DDP and one process: nothing to do. UNTESTED on FSDP/DeepSpeed (no GPU when written).
        """
        kind = str(getattr(self.accelerator, "distributed_type", ""))
        if "FSDP" in kind and self.wrapped is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False):
                yield
        elif "DEEPSPEED" in kind:
            import deepspeed

            params = [p for p in model.parameters() if p.requires_grad]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device is None:
            return batch
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _trainable_leaf(module: nn.Module) -> bool:
    """A module without children whose own parameters all train: LoRA's ``lora_A``/``lora_B``, a router."""
    params = list(module.parameters(recurse=False))
    return not list(module.children()) and bool(params) and all(p.requires_grad for p in params)


def fsdp_wrap_policy(model: nn.Module):
    """FSDP (v1) auto-wrap policy: every decoder layer of the base (the model's ``_no_split_modules``)
    is a unit, and so is every trainable leaf module of the adapters, so the adapter weights form flat
    parameters apart from the frozen base weights (PEFT's policy, for our layers). R-LoRA/HydraLoRA's
    stacked ``lora_B`` is a bare parameter of the adapter layer and stays in its decoder layer's unit
    beside frozen weights, which ``fsdp_use_orig_params: true`` allows. Set by the trainer, whatever
    wrap policy the accelerate config names."""
    import functools

    from torch.distributed.fsdp.wrap import _or_policy, lambda_auto_wrap_policy, transformer_auto_wrap_policy

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    return functools.partial(
        _or_policy,
        policies=[
            functools.partial(lambda_auto_wrap_policy, lambda_fn=_trainable_leaf),
            functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers),
        ],
    )


def setup() -> Dist:
    """One process: a no-op :class:`Dist`. Under a launcher: an ``Accelerator`` (DDP, FSDP or DeepSpeed,
    as the accelerate config says) with unused-parameter detection on, and a group for statistics."""
    if launched_world_size() == 1:
        return Dist()
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    # Without a GPU, Accelerate only forms a process group when told to use the CPU (then: gloo).
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
            # rank 0 evaluates alone (eval_every, final eval) while the others wait at a collective
            InitProcessGroupKwargs(timeout=timedelta(hours=2)),
        ],
    )
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"launched {launched_world_size()} processes but Accelerate formed a group of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); check the accelerate config"
        )
    group = torch.distributed.new_group(
        backend="gloo" if accelerator.device.type == "cpu" else None, timeout=timedelta(hours=2)
    )
    return Dist(accelerator.num_processes, accelerator.process_index, accelerator, group)


def seed_rank(seed: int, rank: int) -> None:
    """Give each rank its own dropout stream (rank 0 keeps the run's seed), after identical init."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def free_port() -> int:
    """A TCP port nobody listens on now (several runs on one machine must not share 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(num_processes: int, port: int | None = None) -> list[str]:
    """``accelerate launch`` for ``num_processes`` local processes, CPU or GPU.

    ``--multi_gpu`` selects Accelerate's torchrun-based launcher; it is the one that starts several
    local processes on a CPU machine too (``--cpu`` would start a single process), and
    :func:`setup` then forms a gloo group.
    """
    import sys

    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(port or free_port()),
    ]  # fmt: skip


def relaunch_train(num_processes: int, train_args: list[str]) -> int:
    """``mtlora train --num-processes N ...``: run ``mtlora train ...`` under accelerate launch; its exit code."""
    import subprocess

    cmd = [*launch_command(num_processes), "-m", "mtlora.cli", "train", *train_args]
    return subprocess.call(cmd)
