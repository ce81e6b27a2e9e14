"""User-facing errors for the ``cvlm`` CLI.

A ``UserError`` is a mistake the user can fix (missing file, unreadable image, bad edit text). The
CLI prints it as one line ``error: <file>[:<line>]: <what was expected>`` and exits with code 2,
without a traceback; anything else is a bug and keeps its traceback.

``mtlora.errors`` re-exports this ``UserError``: one class for both command lines, defined here
because ``cvlm`` imports nothing from ``mtlora`` (it is installed, tested and cited on its own).
The atomic writes below are ``cvlm``'s own for the same reason (``mtlora.fileio`` is mtlora's).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """An error caused by user input, reported as ``<where>[:<line>]: <message>``."""

    def __init__(self, where: str | Path | None, message: str, line: int | None = None):
        self.where = str(where) if where is not None else None
        self.line = line
        self.message = message
        super().__init__(self.format())

    def format(self) -> str:
        if self.where is None:
            return self.message
        loc = self.where if self.line is None else f"{self.where}:{self.line}"
        return f"{loc}: {self.message}"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace`` it.

    A run cut off mid-write then leaves the previous file intact instead of a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file (UTF-8)."""
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
