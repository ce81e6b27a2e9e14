"""Progress display (rich), quiet when disabled or when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Bar:
    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task = progress, task_id

    def update(self, advance: int = 1, **fields: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:.4f}" for k, v in fields.items())
        self._progress.update(self._task, advance=advance, info=text)


@contextmanager
def step_progress(total: int, enabled: bool = True, initial: int = 0, description: str = "train") -> Iterator[_Bar]:
    """A progress bar over ``total`` steps that also shows the latest logged values."""
    if not enabled:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task_id = progress.add_task(description, total=total, completed=initial, info="")
        yield _Bar(progress, task_id)
