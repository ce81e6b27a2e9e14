"""Multi-task data: examples with explicit task ids, task registry, collation, samplers.

Names are imported lazily (PEP 562) so that ``mtlora tasks`` and ``mtlora data check`` do not pay
for importing torch, which only the collator needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mtlora.data.example import Example

_LAZY = {
    "collate": ("IGNORE_INDEX", "TaskCollator", "encode_example", "encode_pair"),
    "jsonl": ("check_task_file", "read_task_file", "write_task_file"),
    "samplers": (
        "MultiTaskBatchSampler",
        "ProportionalBatchSampler",
        "TaskBalancedBatchSampler",
        "TemperatureBatchSampler",
        "UniformBatchSampler",
        "make_batch_sampler",
    ),
    "tasks": (
        "BUILTIN_TASKS",
        "COMMONSENSE_SUITE",
        "EVAL_FRACTION",
        "TaskSpec",
        "is_eval_example",
        "list_tasks",
        "load_task",
        "load_tasks",
        "register_task",
        "split_examples",
        "summarize",
        "task_size",
        "task_table",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["Example", *sorted(_WHERE)]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(import_module(f"mtlora.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtlora.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs
    from mtlora.data.collate import IGNORE_INDEX, TaskCollator, encode_example, encode_pair  # noqa: F401
    from mtlora.data.jsonl import check_task_file, read_task_file, write_task_file  # noqa: F401
    from mtlora.data.samplers import (  # noqa: F401
        MultiTaskBatchSampler,
        ProportionalBatchSampler,
        TaskBalancedBatchSampler,
        TemperatureBatchSampler,
        UniformBatchSampler,
        make_batch_sampler,
    )
    from mtlora.data.tasks import (  # noqa: F401
        BUILTIN_TASKS,
        COMMONSENSE_SUITE,
        EVAL_FRACTION,
        TaskSpec,
        is_eval_example,
        list_tasks,
        load_task,
        load_tasks,
        register_task,
        split_examples,
        summarize,
        task_size,
        task_table,
    )
