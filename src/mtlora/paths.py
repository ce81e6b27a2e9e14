"""Where the project keeps what it builds once per machine (converted base models, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MTLORA_CACHE``, default ``~/.cache/mtlora``."""
    return Path(os.environ.get("MTLORA_CACHE", Path.home() / ".cache" / "mtlora"))
