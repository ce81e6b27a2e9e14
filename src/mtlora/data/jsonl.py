"""User task files: JSONL, one example a line (DESIGN.md section 9).

Each non-blank line is a JSON object with

- ``prompt`` (non-empty string), ``answer`` (non-empty string);
- optional ``choices``: a list of at least two distinct strings that holds ``answer`` (makes the
  example multiple-choice; ``gold`` is the index of ``answer``);
- optional ``task``: a non-empty string, default: the file's stem (so ``sentiment.jsonl`` is task
  ``sentiment``); one file may hold several tasks;
- optional ``target_delimiter``: string joining prompt and answer (default ``" "``);
- optional ``meta``: an object kept on the example untouched (e.g. ``{"answers": [...]}`` holding
  every accepted answer for exact match).

Any mistake raises :class:`UserError` naming the file, the 1-based line and the field, so the CLI
prints ``error: data.jsonl:12: choices: expected ...``. Train and eval run the same validation.

A user file is used whole for whichever split it is passed to (see ``load_tasks``): users who bring
their own data usually bring their own train/eval files.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mtlora.data.example import Example
from mtlora.errors import UserError

REQUIRED_KEYS = ("prompt", "answer")
OPTIONAL_KEYS = ("choices", "task", "target_delimiter", "meta")
ALLOWED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


def _parse_line(obj: Any, path: Path, line: int, default_task: str) -> Example:
    def fail(message: str) -> UserError:
        return UserError(path, message, line=line)

    if not isinstance(obj, dict):
        raise fail(f"expected a JSON object with keys {list(REQUIRED_KEYS)}, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(ALLOWED_KEYS))
    if unknown:
        raise fail(f"{unknown[0]}: unknown key; allowed keys are {', '.join(ALLOWED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in obj:
            raise fail(f"{key}: missing; expected a non-empty string")
        if not isinstance(obj[key], str) or not obj[key]:
            raise fail(f"{key}: expected a non-empty string, got {_show(obj[key])}")
    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task.strip():
        raise fail(f"task: expected a non-empty string, got {_show(task)}")
    delim = obj.get("target_delimiter", " ")
    if not isinstance(delim, str):
        raise fail(f"target_delimiter: expected a string, got {_show(delim)}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise fail(f"meta: expected a JSON object, got {_show(meta)}")
    choices = obj.get("choices")
    gold = None
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise fail(f"choices: expected a list of at least 2 non-empty strings, got {_show(choices)}")
        if len(set(choices)) != len(choices):
            raise fail("choices: expected distinct strings (a repeated choice makes the gold ambiguous)")
        if obj["answer"] not in choices:
            raise fail(f"answer: expected one of choices {choices}, got {obj['answer']!r}")
        gold = choices.index(obj["answer"])
        choices = tuple(choices)
    return Example(
        task=task, prompt=obj["prompt"], answer=obj["answer"], choices=choices, gold=gold,
        target_delimiter=delim, meta=dict(meta),
    )


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_task_file(path: str | Path) -> list[Example]:
    """All examples of a user JSONL file, in file order; raises :class:`UserError` on the first mistake."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "task file not found; expected a .jsonl file or a built-in task name")
    examples: list[Example] = []
    with path.open(encoding="utf-8-sig") as f:  # tolerate a BOM from Windows editors
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=line_no) from None
            examples.append(_parse_line(obj, path, line_no, default_task=path.stem))
    if not examples:
        raise UserError(path, "expected at least one example (one JSON object per line); the file is empty")
    return examples


def check_task_file(path: str | Path) -> dict[str, Any]:
    """Validate a file without loading a model (``mtlora data check``) and summarise it.

    Returns ``{"path", "n", "tasks": {task: n}, "multiple_choice": n, "open": n}``.
    """
    from mtlora.data.tasks import summarize

    return {"path": str(path), **summarize(read_task_file(path))}


def write_task_file(path: str | Path, examples: Iterable[Example]) -> Path:
    """Write examples in the user-file format (e.g. to carry built-in tasks to a machine without them).

    ``read_task_file(write_task_file(p, exs)) == exs`` (meta must be JSON-serialisable).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            obj: dict[str, Any] = {"task": ex.task, "prompt": ex.prompt, "answer": ex.answer}
            if ex.choices is not None:
                obj["choices"] = list(ex.choices)
            if ex.target_delimiter != " ":
                obj["target_delimiter"] = ex.target_delimiter
            if ex.meta:
                obj["meta"] = ex.meta
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path
