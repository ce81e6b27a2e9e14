"""Progress of long work, one library (rich) for training and evaluation.

On a terminal a run shows a live bar; anywhere else (nohup, CI, ``| tee``) it prints one plain line
per ``log_every`` steps: step, loss, lr, tokens/s, ETA. A training run also appends the same records
to ``OUTPUT/metrics.jsonl`` (one JSON object per line), whatever the terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def on_terminal() -> bool:
    return sys.stdout.isatty()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class _Bar:
    def __init__(self, progress: Progress | None, task_id: Any):
        self._progress, self._task = progress, task_id

    def update(self, advance: int = 1, **fields: float) -> None:
        if self._progress is None:
            return
        text = "  ".join(f"{k} {v:.4f}" for k, v in fields.items())
        self._progress.update(self._task, advance=advance, info=text)


@contextmanager
def bar(total: int, enabled: bool = True, initial: int = 0, description: str = "", transient: bool = False
        ) -> Iterator[_Bar]:
    """A rich bar over ``total`` items (shown on a terminal only) that can show the latest values."""
    if not enabled or not on_terminal():
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
    with Progress(*columns, transient=transient) as progress:
        task_id = progress.add_task(description, total=total, completed=initial, info="")
        yield _Bar(progress, task_id)


class StepLog:
    """Per-step records of a training run: bar or log lines, and ``metrics.jsonl``."""

    def __init__(self, total: int, initial: int, every: int, *, show_bar: bool, show_lines: bool,
                 metrics_path: Path | None, description: str = "train"):
        self.total, self.every = total, every
        self.metrics_path = metrics_path
        self.description = description
        self.lines = show_lines and not on_terminal()
        self._first_step, self._start = initial, time.perf_counter()
        self._tokens, self._seconds = 0.0, 0.0
        self._bar_cm = bar(total, enabled=show_bar, initial=initial, description=description)
        self._bar = self._bar_cm.__enter__()

    def close(self) -> None:
        self._bar_cm.__exit__(None, None, None)

    def step(self, step: int, logs: dict[str, float]) -> None:
        self._tokens += logs.get("tokens", 0.0)
        self._seconds += logs.get("step_seconds", 0.0)
        self._bar.update(loss=logs["loss"])
        if step % self.every and step != self.total:
            return
        rate = self._tokens / self._seconds if self._seconds else 0.0
        done = step - self._first_step
        eta = (time.perf_counter() - self._start) / done * (self.total - step) if done else 0.0
        record = {"step": step, **{k: v for k, v in logs.items() if k != "step"},
                  "tokens_per_second": rate, "eta_seconds": eta}
        self._tokens = self._seconds = 0.0
        if self.lines:
            print(f"{self.description} step {step}/{self.total}  loss {logs['loss']:.4f}  lr {logs.get('lr', 0):.2e}  "
                  f"tok/s {rate:.0f}  eta {_duration(eta)}", flush=True)
        self.append(record)

    def append(self, record: dict[str, Any]) -> None:
        if self.metrics_path is None:
            return
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume: drop the records past the checkpoint (a killed run logged them, then lost them)."""
    if not path.is_file():
        return
    from mtlora.fileio import atomic_write_text

    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by the kill
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
