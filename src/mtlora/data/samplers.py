"""Multi-task batch samplers: deterministic per (seed, epoch), resumable, shardable across ranks.

All samplers see only the task name of each example (``tasks[i]`` for example ``i``; a list of
Examples is accepted too) and yield lists of example indices, so they plug into
``DataLoader(examples, batch_sampler=sampler, collate_fn=TaskCollator(...))``.

Common behaviour:

- The *global* batches of an epoch are a pure function of ``(seed, epoch)`` (``random.Random``
  seeded with a string, independent of ``PYTHONHASHSEED``), never of the number of ranks.
- ``num_replicas``/``rank`` shard every global batch into contiguous slices: rank ``r`` gets rows
  ``[r*B/R, (r+1)*B/R)``, so concatenating the ranks' batches in rank order gives exactly the
  single-process batch (a 2-process run and a 1-process run see the same data).
- Iterating to the end of an epoch advances to the next epoch; ``set_epoch(e)`` jumps to epoch
  ``e`` (a no-op when already there, so resuming keeps its position). ``state_dict()`` records the
  epoch and the batches already yielded; a sampler given that state continues at exactly the next
  batch. With DataLoader workers the sampler runs ahead of training (prefetch): pass the number of
  batches the trainer really consumed, ``state_dict(batches_done=n)``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from typing import Any, Literal

SamplerKind = Literal["proportional", "uniform", "temperature", "task_balanced"]


class MultiTaskBatchSampler:
    """Base class: epoch bookkeeping, resume state, rank sharding. Subclasses build ``global_batches``."""

    kind = "base"

    def __init__(
        self,
        tasks: Sequence[str],
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not tasks:
            raise ValueError("cannot sample batches from zero examples")
        if num_replicas < 1 or not (0 <= rank < num_replicas):
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")
        if batch_size % num_replicas:
            raise ValueError(
                f"global batch_size {batch_size} must be divisible by num_replicas {num_replicas} "
                "(every rank takes an equal contiguous slice)"
            )
        # accept task names or the Examples themselves
        self.tasks = [t if isinstance(t, str) else t.task for t in tasks]
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_replicas = num_replicas
        self.rank = rank
        self.task_names = sorted(set(self.tasks))
        self.by_task: dict[str, list[int]] = {t: [] for t in self.task_names}
        for i, t in enumerate(self.tasks):
            self.by_task[t].append(i)
        self.epoch = 0
        self._yielded = 0

    # -- to implement -------------------------------------------------------------------------
    def global_batches(self, epoch: int) -> list[list[int]]:
        """All global batches of ``epoch`` (full size ``batch_size`` unless the last with drop_last=False)."""
        raise NotImplementedError

    # -- shared machinery ---------------------------------------------------------------------
    def _rng(self, epoch: int) -> random.Random:
        return random.Random(f"mtlora:{self.kind}:{self.seed}:{epoch}")

    def _n_batches(self) -> int:
        n = len(self.tasks)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return self._n_batches()

    def shard(self, batch: list[int]) -> list[int]:
        """This rank's contiguous slice of a global batch (a short last batch is wrapped to fit)."""
        if self.num_replicas == 1:
            return batch
        if len(batch) % self.num_replicas:  # only a short last batch with drop_last=False
            need = -len(batch) % self.num_replicas
            batch = batch + (batch * need)[:need]
        per = len(batch) // self.num_replicas
        return batch[self.rank * per:(self.rank + 1) * per]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch = epoch
            self._yielded = 0

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        while self._yielded < len(batches):
            batch = batches[self._yielded]
            self._yielded += 1
            yield self.shard(batch)
        self.epoch += 1
        self._yielded = 0

    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": len(self.tasks),
            "epoch": self.epoch,
            "batches_yielded": self._yielded if batches_done is None else batches_done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("kind", "seed", "batch_size", "num_examples"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"sampler state has {key}={state.get(key)!r} but this sampler has {mine!r}")
        self.epoch = int(state["epoch"])
        self._yielded = int(state["batches_yielded"])


class ProportionalBatchSampler(MultiTaskBatchSampler):
    """All examples shuffled together: each task appears in proportion to its size (temperature 1)."""

    kind = "proportional"

    def global_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(len(self.tasks)))
        self._rng(epoch).shuffle(order)
        n = self._n_batches()
        return [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n)]


class TemperatureBatchSampler(MultiTaskBatchSampler):
    """Every row picks its task i.i.d. with ``p_t ∝ n_t ** (1 / temperature)``, then an example of it.

    ``temperature=inf`` is uniform over tasks. Within a task examples are drawn without replacement
    from a per-epoch shuffle, reshuffled when exhausted (small tasks repeat). An epoch has as many
    batches as the proportional sampler's, so epochs cost the same whichever sampler is used.
    """

    kind = "temperature"

    def __init__(self, tasks: Sequence[str], batch_size: int, seed: int = 0, temperature: float = 1.0,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(tasks, batch_size, seed, drop_last, num_replicas, rank)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        sizes = [len(self.by_task[t]) for t in self.task_names]
        weights = [1.0 if math.isinf(temperature) else s ** (1.0 / temperature) for s in sizes]
        total = sum(weights)
        self.probs = [w / total for w in weights]

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        pools = _TaskPools(self.by_task, rng)
        n = self._n_batches()
        sizes = [self.batch_size] * n
        if not self.drop_last and len(self.tasks) % self.batch_size:
            sizes[-1] = len(self.tasks) % self.batch_size
        batches = []
        for size in sizes:
            picked = rng.choices(self.task_names, weights=self.probs, k=size)
            batches.append([pools.draw(t) for t in picked])
        return batches


class UniformBatchSampler(TemperatureBatchSampler):
    """Temperature sampling with T = inf: each row's task is uniform over tasks, whatever their sizes."""

    kind = "uniform"

    def __init__(self, tasks: Sequence[str], batch_size: int, seed: int = 0, drop_last: bool = True,
                 num_replicas: int = 1, rank: int = 0):
        super().__init__(tasks, batch_size, seed, math.inf, drop_last, num_replicas, rank)


class TaskBalancedBatchSampler(MultiTaskBatchSampler):
    """Every batch holds exactly ``batch_size / k`` examples of each of ``k`` distinct tasks.

    Needed by Align-LoRA's alignment loss (at least two tasks per batch, equal shares). Tasks are
    visited in rounds: each round is a fresh shuffle of all tasks, consumed ``k`` at a time, so every
    task appears once per ``ceil(T / k)`` batches. Examples of a task are drawn without replacement
    from a per-epoch shuffle; a task that runs out is reshuffled and repeats (small tasks cycle,
    large tasks may not be exhausted within an epoch). An epoch has as many batches as the
    proportional sampler's. Rows are interleaved ``t1 t2 .. tk t1 t2 ..`` so that a contiguous
    per-rank slice of a multiple of ``k`` rows still holds every task equally.
    """

    kind = "task_balanced"

    def __init__(self, tasks: Sequence[str], batch_size: int, tasks_per_batch: int | None = None, seed: int = 0,
                 drop_last: bool = True, num_replicas: int = 1, rank: int = 0):
        super().__init__(tasks, batch_size, seed, drop_last, num_replicas, rank)
        n_tasks = len(self.task_names)
        if tasks_per_batch is None:
            tasks_per_batch = max(k for k in range(1, min(n_tasks, batch_size) + 1) if batch_size % k == 0)
        if not (1 <= tasks_per_batch <= n_tasks):
            raise ValueError(f"tasks_per_batch must be between 1 and the number of tasks ({n_tasks}), "
                             f"got {tasks_per_batch}")
        if batch_size % tasks_per_batch:
            raise ValueError(f"batch_size {batch_size} must be divisible by tasks_per_batch {tasks_per_batch}")
        self.tasks_per_batch = tasks_per_batch
        self.per_task = batch_size // tasks_per_batch

    def _n_batches(self) -> int:
        return max(1, len(self.tasks) // self.batch_size)  # always full, balanced batches

    def global_batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        pools = _TaskPools(self.by_task, rng)
        queue: list[str] = []
        batches = []
        for _ in range(self._n_batches()):
            chosen: list[str] = []
            while len(chosen) < self.tasks_per_batch:
                if not queue:
                    queue = rng.sample(self.task_names, len(self.task_names))
                # take the first task not already chosen (a new round may start with a chosen one)
                j = next((i for i, t in enumerate(queue) if t not in chosen), None)
                if j is None:
                    queue += rng.sample(self.task_names, len(self.task_names))
                    continue
                chosen.append(queue.pop(j))
            batches.append([pools.draw(t) for _ in range(self.per_task) for t in chosen])
        return batches


class _TaskPools:
    """Per-task draws without replacement from a shuffle, reshuffled when a task runs out."""

    def __init__(self, by_task: dict[str, list[int]], rng: random.Random):
        self.by_task = by_task
        self.rng = rng
        self.pools: dict[str, list[int]] = {}

    def draw(self, task: str) -> int:
        pool = self.pools.get(task)
        if not pool:
            pool = self.rng.sample(self.by_task[task], len(self.by_task[task]))
            pool.reverse()
            self.pools[task] = pool
        return pool.pop()


def make_batch_sampler(
    kind: SamplerKind,
    tasks: Sequence[str],
    batch_size: int,
    seed: int = 0,
    tasks_per_batch: int | None = None,
    drop_last: bool = True,
    num_replicas: int = 1,
    rank: int = 0,
    temperature: float | None = None,
) -> MultiTaskBatchSampler:
    """Build a sampler by name (the config's ``sampler:`` key). ``tasks[i]`` is example i's task."""
    common = dict(seed=seed, drop_last=drop_last, num_replicas=num_replicas, rank=rank)
    if tasks_per_batch is not None and kind != "task_balanced":
        raise ValueError(f"tasks_per_batch applies to the task_balanced sampler only, not {kind!r}")
    if temperature is not None and kind != "temperature":
        raise ValueError(f"temperature applies to the temperature sampler only, not {kind!r}")
    if kind == "proportional":
        return ProportionalBatchSampler(tasks, batch_size, **common)
    if kind == "uniform":
        return UniformBatchSampler(tasks, batch_size, **common)
    if kind == "temperature":
        return TemperatureBatchSampler(tasks, batch_size, temperature=temperature or 2.0, **common)
    if kind == "task_balanced":
        return TaskBalancedBatchSampler(tasks, batch_size, tasks_per_batch=tasks_per_batch, **common)
    raise ValueError(f"unknown sampler {kind!r}; expected proportional, uniform, temperature or task_balanced")
