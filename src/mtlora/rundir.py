"""The output folder of a run: its layout, and what ``--overwrite`` and ``--resume`` may do to it.

A run folder holds only what the tool writes (``RUN_ENTRIES``) and carries a marker,
``mtlora_run.json``. ``--overwrite`` replaces a folder only when it is ours: it has the marker (or
the ``config.yaml`` + ``checkpoint/`` layout of runs that predate it) and nothing else. Then it
deletes those entries one by one, never the folder itself, and never the current directory or an
ancestor of it. Anything else is refused with one line naming the foreign entry.

Nothing is written until the run is validated (config, data, model, checkpoint): ``check`` only
reads, ``claim`` creates the folder (a new empty one is removed again by ``release`` if the start
fails) and ``start`` clears the old entries and writes the marker and ``config.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from mtlora.errors import UserError
from mtlora.fileio import atomic_write_json, clean_stale_temps, probe_writable, temp_name_prefix

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "config.yaml"
MARKER_FILE = "mtlora_run.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"

RUN_ENTRIES = (
    MARKER_FILE, CONFIG_FILE, CHECKPOINT_DIR, ADAPTER_DIR, RESULTS_FILE, METRICS_FILE,
    "align_history.png", "demo_results.json", "accuracy.png",
)


def _temp_of_ours(name: str) -> bool:
    return name.startswith(".") and any(
        name.startswith(f".{entry}.tmp") or name.startswith(f".{entry}.old") for entry in RUN_ENTRIES
    )


def foreign_entries(path: Path) -> list[str]:
    return sorted(e.name for e in path.iterdir() if e.name not in RUN_ENTRIES and not _temp_of_ours(e.name))


def is_ours(path: Path) -> bool:
    legacy = (path / CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()
    return (path / MARKER_FILE).is_file() or legacy


@dataclass
class Plan:
    """What the start of a run will do to its folder: ``fresh``, ``overwrite`` or ``resume``."""

    path: Path
    action: str
    created: bool = False


def check(path: str | Path, *, resume: bool, overwrite: bool) -> Plan:
    """Decide what to do with the output folder, reading only; a conflict is a ``UserError``."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(path, f"output folder cannot be created: {parent} is a file")
    if resume:
        if not (path / CHECKPOINT_DIR / STATE_FILE).is_file():
            hint = " (the run stopped before its first checkpoint; start it again with --overwrite)" \
                if path.is_dir() and is_ours(path) else ""
            raise UserError(path, f"nothing to resume: no {CHECKPOINT_DIR}/{STATE_FILE} in this output folder{hint}")
        return Plan(path, "resume")
    if not path.exists() or not any(_visible(path)):
        return Plan(path, "fresh")
    if not overwrite:
        raise UserError(path, "output folder exists and is not empty; pass --overwrite or --resume")
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise UserError(path, "refusing to overwrite the current directory or a folder above it; "
                              "choose an output_dir of its own")
    if not is_ours(path):
        raise UserError(path, f"--overwrite replaces only a run folder of this tool (one holding {MARKER_FILE}); "
                              "this one is not: choose another output_dir")
    foreign = foreign_entries(path)
    if foreign:
        raise UserError(path, f"--overwrite refused: the folder holds {foreign[0]!r}, which this tool did not "
                              f"write ({len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}); move it "
                              "away or choose another output_dir")
    return Plan(path, "overwrite")


def _visible(path: Path):
    """Entries that count as content (a killed write's temporaries of ours do not)."""
    return (e for e in path.iterdir() if not _temp_of_ours(e.name))


def claim(plan: Plan) -> Plan:
    """Create the folder (proves it is writable, before the model loads) and drop stale temporaries."""
    try:
        plan.created = not plan.path.exists()
        probe_writable(plan.path, prefix=temp_name_prefix(plan.path / MARKER_FILE))  # a name of ours
    except OSError as exc:
        raise UserError(plan.path, f"output folder is not writable ({exc.strerror or exc})") from None
    clean_stale_temps(plan.path, list(RUN_ENTRIES))
    if (plan.path / CHECKPOINT_DIR).is_dir():
        clean_stale_temps(plan.path / CHECKPOINT_DIR, [ADAPTER_DIR, STATE_FILE])
    return plan


def release(plan: Plan) -> None:
    """Undo ``claim`` after a failed start: remove the folder only if it created it and it is empty."""
    if plan.created:
        try:
            plan.path.rmdir()
        except OSError:
            pass


def start(plan: Plan, write_config) -> None:
    """The run really starts: clear our old entries (overwrite), write the marker and ``config.yaml``."""
    if plan.action == "overwrite":
        for name in RUN_ENTRIES:
            entry = plan.path / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
    write_config(plan.path / CONFIG_FILE)
    atomic_write_json(plan.path / MARKER_FILE, {
        "written_by": "mtlora",
        "command": " ".join(["mtlora", *sys.argv[1:]]) if Path(sys.argv[0]).name == "mtlora" else None,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "pid": os.getpid(),
    })
