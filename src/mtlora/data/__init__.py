"""Multi-task data: examples with explicit task ids, task registry, collation, samplers."""

from mtlora.data.example import Example

__all__ = ["Example"]
