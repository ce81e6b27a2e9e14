"""The unit of multi-task data.

Every example names its task explicitly; the collator maps task names to integer task ids that
travel with the batch (never inferred from row order).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Example:
    """One supervised example.

    ``prompt`` and ``answer`` are joined by ``target_delimiter`` (lm-evaluation-harness convention:
    the delimiter belongs to the continuation, and ``acc_norm`` divides by the length of the
    choice *without* it). For multiple-choice tasks ``choices`` holds every option and ``gold`` the
    index of ``answer`` in it; open-answer tasks have ``choices=None`` and ``gold=None``.
    """

    task: str
    prompt: str
    answer: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    target_delimiter: str = " "
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.choices is not None:
            if self.gold is None or not (0 <= self.gold < len(self.choices)):
                raise ValueError(f"gold index {self.gold} out of range for {len(self.choices)} choices")
            if self.choices[self.gold] != self.answer:
                raise ValueError("answer must equal choices[gold]")

    @property
    def is_multiple_choice(self) -> bool:
        return self.choices is not None


def summarize(examples: Iterable[Example]) -> dict[str, Any]:
    """Counts for a list of examples: total, per task (first-seen order), multiple-choice vs open."""
    examples = list(examples)
    per_task = Counter(ex.task for ex in examples)
    n_mc = sum(ex.is_multiple_choice for ex in examples)
    return {
        "n": len(examples),
        "tasks": dict(per_task),
        "multiple_choice": n_mc,
        "open": len(examples) - n_mc,
    }
