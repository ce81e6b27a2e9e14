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

FSDP (``accelerate launch --config_file configs/accelerate/fsdp.yaml``). Accelerate only builds FSDP
for GPU-like devices (on a CPU its FSDP plugin raises "no available devices"), so the trainer wraps
the model itself with torch's ``FullyShardedDataParallel`` (v1) on every device and uses Accelerate
for the process group alone (:func:`fsdp_options` reads the launcher's ``FSDP_*`` variables). The
code that runs on GPUs is then the code the 2-process CPU (gloo) tests run. FSDP averages gradients
over ranks as DDP does, so the token-share weighting above carries over unchanged.
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
    fsdp: dict[str, Any] | None = None  # FullyShardedDataParallel's options when the launch asks for FSDP
    pending_optimizer: dict[str, Any] | None = None  # FSDP resume: this rank's optimiser shard, loaded in wrap()
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
        if self.fsdp is not None:
            return self._wrap_fsdp(model, objective), optimizer
        self.wrapped, optimizer = self.accelerator.prepare(ObjectiveModule(model, objective), optimizer)
        return self.wrapped, optimizer

    def _wrap_fsdp(self, model: nn.Module, objective: Callable):
        """FSDP (v1) with ``use_orig_params``: the optimiser, built before wrapping on the original
        parameters, keeps them (FSDP turns each into a view of this rank's shard, so the optimiser
        state is per shard). A resumed run loads its shard of the optimiser state here, once the
        parameters are the shards it was saved for."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        device = self.accelerator.device  # FSDP wants the bare "cpu" (Accelerate's CPU device compares unequal)
        self.wrapped = FullyShardedDataParallel(
            ObjectiveModule(model, objective), auto_wrap_policy=fsdp_wrap_policy(model),
            device_id=torch.device("cpu") if device.type == "cpu" else device, use_orig_params=True, sync_module_states=False, **self.fsdp,
        )  # fmt: skip
        return self.wrapped

    def load_optimizer_shard(self, optimizer) -> None:
        """FSDP resume: this rank's optimiser state (saved per rank), after :meth:`wrap`."""
        if self.pending_optimizer is None:
            return
        optimizer.load_state_dict(self.pending_optimizer)  # onto the shards' device
        self.pending_optimizer = None

    def optimizer_state(self, optimizer) -> dict[str, Any] | list[dict[str, Any]]:
        """What a checkpoint stores: the optimiser state; under FSDP every rank's shard (a list, gathered
        to every rank; the adapter's state is small). Every rank must call it."""
        if self.fsdp is None:
            return optimizer.state_dict()
        state = optimizer.state_dict()  # on the CPU before pickling: rank 0 would unpickle onto others' GPUs
        state["state"] = {i: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                          for i, s in state["state"].items()}
        return self.gather_object(state)

    @contextlib.contextmanager
    def no_sync(self, step_fn, sync: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation window."""
        if sync or self.world_size == 1:
            yield
            return
        if self.fsdp is not None:
            with self.wrapped.no_sync():
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
        if self.fsdp is not None:  # the norm over every rank's shard, not this rank's alone
            return float(self.wrapped.clip_grad_norm_(max_norm))
        norm = self.accelerator.clip_grad_norm_(params, max_norm)
        return None if norm is None else float(norm)

    @property
    def sharded(self) -> bool:
        """Whether parameters or optimiser state are split across ranks (FSDP, DeepSpeed)."""
        return self.fsdp is not None or "DEEPSPEED" in str(getattr(self.accelerator, "distributed_type", ""))

    @contextlib.contextmanager
    def full_params(self, model: nn.Module) -> Iterator[None]:
        """Every rank enters; inside, rank 0's ``model`` is whole (FSDP / ZeRO-3 shard it) and can be
        saved or evaluated by rank 0 alone, read-only.

        DDP and one process: nothing to do. FSDP (tested with 2 CPU processes): rank 0 gathers the whole
        model, the frozen base too (a base that fits no single device cannot be saved or evaluated so),
        and the FSDP wrappers of the decoder layers are lifted out of the module tree meanwhile, so the
        adapter's names are those of the unwrapped model (no ``_fsdp_wrapped_module.``) and a forward
        runs on the gathered weights without FSDP's collectives. DeepSpeed: UNTESTED.
        """
        kind = str(getattr(self.accelerator, "distributed_type", ""))
        if self.fsdp is not None and self.wrapped is not None:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(self.wrapped, writeback=False, rank0_only=True), \
                    _without_fsdp_wrappers(model, FullyShardedDataParallel):
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


@contextlib.contextmanager
def _without_fsdp_wrappers(model: nn.Module, fsdp_cls: type) -> Iterator[None]:
    """Replace every FSDP unit inside ``model`` by the module it wraps, and put the units back after."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        while found := [(parent, name, child) for parent in model.modules()
                        for name, child in parent._modules.items() if isinstance(child, fsdp_cls)]:
            for parent, name, child in found:
                parent._modules[name] = child.module
                swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def fsdp_wrap_policy(model: nn.Module):
    """FSDP (v1) auto-wrap policy: every decoder layer of the base (the model's ``_no_split_modules``)
    is a unit; embeddings, final norm and LM head stay in the root unit.

    The adapter weights share their decoder layer's unit with its frozen weights
    (``use_orig_params=True`` allows the mix). They must: FSDP gathers a unit's parameters in that
    unit's ``forward``, and the adapter layers read ``lora_A.weight``/``lora_B.weight`` (and
    R-LoRA's stacked heads) directly inside their fused kernel, never calling those modules; units
    of their own (PEFT's policy) leave them as flat shards there ("Bad in-place call: input tensor
    size [24, 64] and output tensor size [24, 32]" on the first forward, observed with 2 CPU ranks).
    """
    import functools

    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = {type(m) for m in model.modules() if type(m).__name__ in names}
    return functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)


_FSDP_CONFIG = "accelerate config (fsdp_config)"


def fsdp_options() -> dict[str, Any] | None:
    """``FullyShardedDataParallel`` keyword arguments from the launcher's ``FSDP_*`` variables (what
    ``fsdp_config`` in the accelerate config becomes); None when the launch is not FSDP.

    Honoured: sharding strategy, backward/forward prefetch, parameter offload. Not honoured, as the
    trainer decides them: the wrap policy (:func:`fsdp_wrap_policy`), ``use_orig_params`` (always on),
    ``sync_module_states`` and ``cpu_ram_efficient_loading`` (every rank loads the base and seeds the
    same adapter init), activation checkpointing (``train.gradient_checkpointing``) and the state dict
    type (checkpoints hold the whole adapter and each rank's optimiser shard).
    """
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, ShardingStrategy

    from mtlora.errors import UserError

    if env.get("FSDP_VERSION", "1") != "1":
        raise UserError(_FSDP_CONFIG, f"fsdp_version {env['FSDP_VERSION']} is not supported; use fsdp_version: 1")
    if env.get("FSDP_USE_ORIG_PARAMS", "true").lower() != "true":
        raise UserError(_FSDP_CONFIG, "fsdp_use_orig_params must be true (the optimiser is built on the adapter's "
                                      "own parameters before wrapping)")

    def enum(cls, key: str, default: str):
        value = env.get(key, default)
        names = [m.name for m in cls]
        if value.isdigit() and 1 <= int(value) <= len(names):  # older configs give 1-based numbers
            value = names[int(value) - 1]
        if value not in names:
            raise UserError(_FSDP_CONFIG, f"{key.lower()} is {value!r}; expected one of {', '.join(names)}")
        return cls[value]

    prefetch = env.get("FSDP_BACKWARD_PREFETCH", "BACKWARD_PRE")
    return {
        "sharding_strategy": enum(ShardingStrategy, "FSDP_SHARDING_STRATEGY", "FULL_SHARD"),
        "backward_prefetch": None if prefetch == "NO_PREFETCH" else enum(BackwardPrefetch, "FSDP_BACKWARD_PREFETCH",
                                                                         "BACKWARD_PRE"),
        "forward_prefetch": env.get("FSDP_FORWARD_PREFETCH", "false").lower() == "true",
        "cpu_offload": CPUOffload(offload_params=env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"),
    }


def setup() -> Dist:
    """One process: a no-op :class:`Dist`. Under a launcher: an ``Accelerator`` (DDP, FSDP or DeepSpeed,
    as the accelerate config says) with unused-parameter detection on, and a group for statistics."""
    if launched_world_size() == 1:
        return Dist()
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    fsdp = fsdp_options()
    if fsdp is not None:  # every rank loads the whole base (transformers would put ranks > 0 on "meta")
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    # the trainer wraps FSDP itself (module doc): Accelerate, told nothing of it, forms the process group
    hide_fsdp = {"ACCELERATE_USE_FSDP": os.environ.pop("ACCELERATE_USE_FSDP")} if fsdp is not None else {}
    try:
        # Without a GPU, Accelerate only forms a process group when told to use the CPU (then: gloo).
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False),
                # rank 0 evaluates alone (eval_every, final eval) while the others wait at a collective
                InitProcessGroupKwargs(timeout=timedelta(hours=2)),
            ],
        )
    finally:
        os.environ.update(hide_fsdp)  # read again by the next run of this process (tests run several)
    if accelerator.num_processes != launched_world_size():
        raise RuntimeError(
            f"launched {launched_world_size()} processes but Accelerate formed a group of "
            f"{accelerator.num_processes} ({accelerator.distributed_type}); check the accelerate config"
        )
    group = torch.distributed.new_group(
        backend="gloo" if accelerator.device.type == "cpu" else None, timeout=timedelta(hours=2)
    )
    return Dist(accelerator.num_processes, accelerator.process_index, accelerator, group, fsdp=fsdp)


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
