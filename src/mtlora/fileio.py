"""Atomic writes: the one place the project writes a file or folder a user may rely on.

Every writer goes through a temporary sibling (``.NAME.tmp*``), ``fsync`` and ``os.replace``, so an
interrupted write leaves either the old content or the new one, never half a file. Temporaries get
the permissions the user's umask gives any new file (``tempfile`` alone would make them 0600/0700,
unreadable to a colleague). ``clean_stale_temps`` removes the temporaries a killed process left;
it only ever matches names this module makes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_TAG = ".tmp"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fix_mode(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def temp_name_prefix(target: Path) -> str:
    return f".{target.name}{TMP_TAG}"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _fix_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=float) + "\n")


def atomic_write_with(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp_file)`` (e.g. a plotting library's ``savefig``), then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_name_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fix_mode(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_dir(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)``, then rename tmp_dir to ``target`` (replacing an older one)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_name_prefix(target), dir=target.parent))
    try:
        write(tmp)
        _fix_mode(tmp, directory=True)
        for entry in tmp.rglob("*"):  # some writers (safetensors) create files 0600
            if not entry.is_symlink():
                _fix_mode(entry, directory=entry.is_dir())
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}{TMP_TAG}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def probe_writable(folder: str | Path, prefix: str = f".probe{TMP_TAG}") -> None:
    """Create ``folder`` (and parents) and write + remove an empty probe file in it; raises ``OSError``.

    Run before long work so an unwritable output fails first, not after the work is done."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=prefix, dir=folder)
    os.close(fd)
    os.unlink(probe)


def clean_stale_temps(folder: str | Path, names: list[str]) -> list[Path]:
    """Remove temporaries of ``names`` (``.NAME.tmp*`` / ``.NAME.old<pid>.tmp``) left in ``folder``."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    patterns = [re.compile(rf"^\.{re.escape(name)}(\.tmp.*|\.old\d+(\.tmp)?)$") for name in names]
    for entry in folder.iterdir():
        for pattern in patterns:
            if pattern.match(entry.name):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
                break
    return removed
