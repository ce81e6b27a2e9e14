"""Multi-task data: examples with explicit task ids, task registry, collation, samplers."""

from mtlora.data.collate import IGNORE_INDEX, TaskCollator, encode_example, encode_pair
from mtlora.data.example import Example
from mtlora.data.jsonl import check_task_file, read_task_file, write_task_file
from mtlora.data.samplers import (
    MultiTaskBatchSampler,
    ProportionalBatchSampler,
    TaskBalancedBatchSampler,
    TemperatureBatchSampler,
    UniformBatchSampler,
    make_batch_sampler,
)
from mtlora.data.tasks import (
    BUILTIN_TASKS,
    COMMONSENSE_SUITE,
    EVAL_FRACTION,
    TaskSpec,
    is_eval_example,
    list_tasks,
    load_task,
    load_tasks,
    split_examples,
    summarize,
    task_size,
)

__all__ = [
    "BUILTIN_TASKS",
    "COMMONSENSE_SUITE",
    "EVAL_FRACTION",
    "IGNORE_INDEX",
    "Example",
    "MultiTaskBatchSampler",
    "ProportionalBatchSampler",
    "TaskBalancedBatchSampler",
    "TaskCollator",
    "TaskSpec",
    "TemperatureBatchSampler",
    "UniformBatchSampler",
    "check_task_file",
    "encode_example",
    "encode_pair",
    "is_eval_example",
    "list_tasks",
    "load_task",
    "load_tasks",
    "make_batch_sampler",
    "read_task_file",
    "split_examples",
    "summarize",
    "task_size",
    "write_task_file",
]
