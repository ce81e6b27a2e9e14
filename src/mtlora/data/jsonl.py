"""User task files: JSONL, one example a line.

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

Any malformed input (not UTF-8, a NUL byte, a JSON array instead of lines, wrong types, a line
nested too deep to parse) is a ``UserError``, never another exception; the test suite fuzzes that.

A user file is split into train/eval by the same stable hash as the built-in tasks, so a run never
evaluates on its training rows; an explicit pair of files is the other way (see ``load_tasks``).
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
    for key in ("prompt", "answer", "task", "target_delimiter"):
        if isinstance(obj.get(key), str) and not _is_text(obj[key]):
            raise fail(f"{key}: expected text without NUL characters or unpaired surrogates")
    task = obj.get("task", default_task)
    if not isinstance(task, str) or not task.strip():
        raise fail(f"task: expected a non-empty string, got {_show(task)}")
    delim = obj.get("target_delimiter", " ")
    if not isinstance(delim, str):
        raise fail(f"target_delimiter: expected a string, got {_show(delim)}")
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise fail(f"meta: expected a JSON object, got {_show(meta)}")
    try:
        json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise fail("meta: expected text without unpaired surrogates") from None
    choices = obj.get("choices")
    gold = None
    if choices is not None:
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise fail(f"choices: expected a list of at least 2 non-empty strings, got {_show(choices)}")
        if not all(_is_text(c) for c in choices):
            raise fail("choices: expected text without NUL characters or unpaired surrogates")
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


def _is_text(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def read_task_file(path: str | Path) -> list[Example]:
    """All examples of a user JSONL file, in file order; raises :class:`UserError` on the first mistake."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "task file not found; expected a .jsonl file or a built-in task name")
    examples: list[Example] = []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(path, f"cannot read ({exc.strerror or exc})") from None
    if data.startswith(b"\xef\xbb\xbf"):  # tolerate a BOM from Windows editors
        data = data[3:]
    for line_no, raw in enumerate(data.splitlines(), start=1):  # \n, \r\n and \r all end a line
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(path, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                  "expected UTF-8 text", line=line_no) from None
        if not line.strip():
            continue
        if "\x00" in line:
            raise UserError(path, f"NUL byte at column {line.index(chr(0)) + 1}; expected JSON text", line=line_no)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=line_no) from None
        except RecursionError:
            raise UserError(path, "invalid JSON (nested too deeply)", line=line_no) from None
        examples.append(_parse_line(obj, path, line_no, default_task=path.stem))
    if not examples:
        raise UserError(path, "expected at least one example (one JSON object per line); the file is empty")
    return examples


def check_task_file(path: str | Path) -> dict[str, Any]:
    """Validate a file without loading a model (``mtlora data check``) and summarise it.

    Returns ``{"path", "n", "tasks": {task: n}, "multiple_choice": n, "open": n}``.
    """
    from mtlora.data.example import summarize

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
