"""User errors at the command line: one line ``error: <where>: <what>``, exit code 2, no traceback."""

from __future__ import annotations

import pytest
import yaml
from conftest import run_cli


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _config(tmp_path, **fields) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_unknown_config_key_names_file_and_line(monkeypatch, capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: smollm2-135m\ntrain:\n  lr: 1e-4\n  learning_rate: 3\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(path))
    _assert_one_line_error(code, err, f"{path}:4", "train.learning_rate")


def test_bad_override_value(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", _config(tmp_path), "train.batch_size=many")
    _assert_one_line_error(code, err, "train.batch_size", "integer")


def test_unknown_task(monkeypatch, capsys, tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, model=str(tiny_model_dir), tasks=["sst2", "no_such_task"], output_dir=str(tmp_path / "o"))
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg)
    _assert_one_line_error(code, err, "no_such_task")


def test_missing_config_file(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "missing.yaml"))
    _assert_one_line_error(code, err, "missing.yaml", "not found")


def test_model_path_that_is_not_a_model(monkeypatch, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "eval", "copa", "--model", str(tmp_path / "empty"), "--no-progress")
    _assert_one_line_error(code, err, "empty", "config.json")


def test_existing_output_without_overwrite(monkeypatch, capsys, tmp_path, tiny_model_dir, task_files):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    cfg = _config(tmp_path, model=str(tiny_model_dir), tasks=[str(t) for t in task_files], output_dir=str(out))
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg, "--no-progress")
    _assert_one_line_error(code, err, str(out), "--overwrite")
    assert (out / "keep.txt").exists()


def test_data_check_reports_bad_line_and_field(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2=", "answer": "4", "choices": ["3", "4"]}\n{"prompt": "x", "answer": 5}\n')
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", str(bad))
    _assert_one_line_error(code, err, f"{bad}:2", "answer")


def test_data_check_ok(monkeypatch, capsys, task_files):
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", str(task_files[0]))
    assert code == 0 and "sentiment" in out


@pytest.mark.parametrize("adapter_type", ["lora", "rlora"])
def test_train_then_eval_from_the_cli(monkeypatch, capsys, tmp_path, tiny_model_dir, task_files, adapter_type):
    out = tmp_path / "run"
    cfg = _config(
        tmp_path, model=str(tiny_model_dir), method=adapter_type, tasks=[str(t) for t in task_files],
        output_dir=str(out), train={"max_steps": 3, "batch_size": 4}, data={"max_length": 48},
    )
    code, _, err = run_cli(monkeypatch, capsys, "train", cfg, "--no-progress")
    assert code == 0, err
    metrics = tmp_path / "metrics.json"
    code, _, err = run_cli(
        monkeypatch, capsys, "eval", *map(str, task_files), "--model", str(tiny_model_dir),
        "--adapter", str(out / "adapter"), "--output", str(metrics), "--no-progress",
    )
    assert code == 0, err
    assert '"per_task"' in metrics.read_text()
    if adapter_type != "lora":
        code, _, err = run_cli(monkeypatch, capsys, "analyze", str(out / "adapter"), "--base-model",
                               str(tiny_model_dir), "--task", str(task_files[0]), "--max-per-task", "4")
        assert code == 0, err
        assert any((out / "adapter" / "analysis").glob("*.png"))
