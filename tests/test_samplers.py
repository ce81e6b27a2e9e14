"""Multi-task batch samplers: balance, determinism, resume, rank sharding."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from mtlora.data import (
    ProportionalBatchSampler,
    TaskBalancedBatchSampler,
    UniformBatchSampler,
    make_batch_sampler,
)

# deliberately unbalanced: 5 tasks, sizes 60, 30, 12, 5, 3
SIZES = {"arc": 60, "boolq": 30, "copa": 12, "piqa": 5, "rte": 3}
TASKS = [t for t, n in SIZES.items() for _ in range(n)]
KINDS = [
    ("proportional", {}),
    ("uniform", {}),
    ("temperature", {"temperature": 2.0}),
    ("task_balanced", {"tasks_per_batch": 2}),
    ("task_balanced", {"tasks_per_batch": 4}),
]


def make(kind, extra, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("seed", 3)
    return make_batch_sampler(kind, TASKS, **kw, **extra)


def epoch_batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize(("kind", "extra"), KINDS)
def test_deterministic_per_seed_and_epoch(kind, extra):
    a, b = make(kind, extra), make(kind, extra)
    e0 = epoch_batches(a, 0)
    assert e0 == epoch_batches(b, 0) and len(e0) == len(a) == len(TASKS) // 8
    assert all(len(batch) == 8 and all(0 <= i < len(TASKS) for i in batch) for batch in e0)
    assert epoch_batches(a, 1) != e0
    assert epoch_batches(make(kind, extra, seed=4), 0) != e0
    assert epoch_batches(a, 0) == e0  # going back to an epoch replays it


@pytest.mark.parametrize(("kind", "extra"), KINDS)
def test_resume_continues_at_the_same_batch(kind, extra):
    ref = make(kind, extra)
    expected = epoch_batches(ref, 0) + epoch_batches(ref, 1)

    run = make(kind, extra)
    run.set_epoch(0)
    it = iter(run)
    got = [next(it) for _ in range(3)]
    state = run.state_dict()
    assert state["epoch"] == 0 and state["batches_yielded"] == 3

    resumed = make(kind, extra)
    resumed.load_state_dict(state)
    for epoch in (0, 1):  # a trainer's epoch loop: set_epoch keeps the resumed position
        resumed.set_epoch(epoch)
        got += list(resumed)
    assert got == expected


def test_resume_with_explicit_consumed_count_and_mismatch():
    s = make("proportional", {})
    it = iter(s)
    [next(it) for _ in range(5)]  # e.g. a DataLoader prefetched 5, the trainer consumed 2
    state = s.state_dict(batches_done=2)
    resumed = make("proportional", {})
    resumed.load_state_dict(state)
    assert list(resumed) == epoch_batches(make("proportional", {}), 0)[2:]
    with pytest.raises(ValueError, match="seed"):
        make("proportional", {}, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="kind"):
        make("uniform", {}).load_state_dict(state)


def test_iterating_past_an_epoch_advances():
    s = make("proportional", {})
    first, second = list(s), list(s)
    assert s.epoch == 2 and first != second
    assert second == epoch_batches(make("proportional", {}), 1)


def test_proportional_covers_each_example_once_per_epoch():
    s = ProportionalBatchSampler(TASKS, batch_size=8, seed=0)
    flat = [i for b in s for i in b]
    assert len(flat) == len(set(flat)) == (len(TASKS) // 8) * 8
    keep_last = ProportionalBatchSampler(TASKS, batch_size=8, seed=0, drop_last=False)
    batches = list(keep_last)
    assert len(batches) == len(keep_last) == math.ceil(len(TASKS) / 8)
    assert sorted(i for b in batches for i in b) == list(range(len(TASKS)))


def test_uniform_visits_tasks_uniformly():
    s = UniformBatchSampler(TASKS, batch_size=10, seed=0)
    counts = Counter(TASKS[i] for e in range(40) for b in epoch_batches(s, e) for i in b)
    total = sum(counts.values())
    assert set(counts) == set(SIZES)
    for t in SIZES:
        assert abs(counts[t] / total - 1 / len(SIZES)) < 0.03, counts
    # examples of a small task are drawn without replacement until it runs out
    rte_rows = [i for b in epoch_batches(s, 0) for i in b if TASKS[i] == "rte"]
    for start in range(0, len(rte_rows) - 2, 3):
        window = rte_rows[start:start + 3]
        assert len(set(window)) == len(window)


@pytest.mark.parametrize(("k", "batch_size"), [(2, 8), (4, 8), (5, 10), (1, 4)])
def test_task_balanced_batches(k, batch_size):
    s = TaskBalancedBatchSampler(TASKS, batch_size=batch_size, tasks_per_batch=k, seed=1)
    seen: set[str] = set()
    for epoch in range(3):
        batches = epoch_batches(s, epoch)
        assert len(batches) == len(TASKS) // batch_size
        for n, batch in enumerate(batches):
            counts = Counter(TASKS[i] for i in batch)
            assert len(counts) == k and set(counts.values()) == {batch_size // k}
            seen |= set(counts)
            if n + 1 == math.ceil(len(SIZES) / k) and epoch == 0:
                assert seen == set(SIZES)  # every task visited within one round
        # large tasks: no example drawn twice within an epoch (without replacement)
        arc_rows = [i for b in batches for i in b if TASKS[i] == "arc"]
        assert len(arc_rows) == len(set(arc_rows))
    # rows are interleaved task by task: t1 t2 .. tk t1 t2 ..
    batch = epoch_batches(s, 0)[0]
    order = [TASKS[i] for i in batch]
    assert order == order[:k] * (batch_size // k)


def test_task_balanced_validation():
    with pytest.raises(ValueError, match="divisible by tasks_per_batch"):
        TaskBalancedBatchSampler(TASKS, batch_size=8, tasks_per_batch=3)
    with pytest.raises(ValueError, match="number of tasks"):
        TaskBalancedBatchSampler(TASKS, batch_size=12, tasks_per_batch=6)
    assert TaskBalancedBatchSampler(TASKS, batch_size=8).tasks_per_batch == 4  # largest divisor <= n_tasks
    with pytest.raises(ValueError, match="num_replicas"):
        make("proportional", {}, batch_size=6, num_replicas=4, rank=0)
    with pytest.raises(ValueError, match="task_balanced sampler only"):
        make_batch_sampler("uniform", TASKS, 8, tasks_per_batch=2)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_batch_sampler("round_robin", TASKS, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kind", "extra"), KINDS)
@pytest.mark.parametrize("replicas", [2, 4])
def test_rank_shards_union_is_the_single_process_batch(kind, extra, replicas):
    single = epoch_batches(make(kind, extra), 1)
    per_rank = [epoch_batches(make(kind, extra, num_replicas=replicas, rank=r), 1) for r in range(replicas)]
    assert all(len(b) == len(single) for b in per_rank)
    for n, batch in enumerate(single):
        shards = [per_rank[r][n] for r in range(replicas)]
        assert all(len(s) == 8 // replicas for s in shards)
        assert [i for s in shards for i in s] == batch


def test_task_balanced_shards_keep_every_task_per_rank():
    # 8 rows, 2 tasks, 2 ranks: each rank gets 2 rows of each task thanks to interleaving
    for r in range(2):
        s = TaskBalancedBatchSampler(TASKS, batch_size=8, tasks_per_batch=2, num_replicas=2, rank=r)
        for batch in s:
            assert sorted(Counter(TASKS[i] for i in batch).values()) == [2, 2]
