"""Shared fixtures: tiny model folders and small user task files, no downloads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from mtlora.testing import save_tiny_model


@pytest.fixture(scope="module")
def one_thread():
    """Toy models gain nothing from threads, and on a shared, busy CPU OpenMP spin-waits make them slow
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def task_files(tmp_path) -> list[Path]:
    """Two small multiple-choice tasks in the user JSONL format."""
    sentiment = [
        {"prompt": f"Review: the cat {w} the mat{'.' * (1 + i)} Positive or negative?", "answer": a,
         "choices": ["negative", "positive"]}
        for i in range(4)
        for w, a in [("loves", "positive"), ("hates", "negative"), ("likes", "positive"), ("bites", "negative")]
    ]
    qa = [
        {"prompt": f"Question: what is {i} + 1? Answer:", "answer": str(i + 1), "choices": [str(i + 1), str(i + 2)]}
        for i in range(16)
    ]
    return [write_jsonl(tmp_path / "sentiment.jsonl", sentiment), write_jsonl(tmp_path / "qa.jsonl", qa)]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run ``mtlora ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from mtlora.cli import main

    monkeypatch.setattr(sys, "argv", ["mtlora", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
