"""User-facing errors.

A ``UserError`` is a mistake the user can fix (bad file, bad config key, missing path). The CLI
prints it as one line, ``error: <file>[:<line>]: <what was expected>``, and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

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
