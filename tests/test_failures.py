"""Every failure a user can cause: one line and exit 2 (or 130/143 when interrupted), nothing lost,
no run that did the wrong thing exits 0. One table per shape; each row is a case found by trying."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli, write_jsonl

from mtlora import config as config_module
from mtlora.config import METHODS, load_config
from mtlora.errors import UserError
from mtlora.rundir import CHECKPOINT_DIR, MARKER_FILE, STATE_FILE


def _one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    assert code == exit_code, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _rows(n: int = 24) -> list[dict]:
    return [{"prompt": f"Review {i}: the cat {'loves' if i % 2 else 'hates'} the mat. Positive or negative?",
             "answer": "positive" if i % 2 else "negative", "choices": ["negative", "positive"]} for i in range(n)]


def _run_config(tmp_path: Path, model_dir: Path, out: Path, **sections) -> Path:
    task = write_jsonl(tmp_path / "reviews.jsonl", _rows())
    cfg = {
        "model": str(model_dir), "tasks": [str(task)], "output_dir": str(out),
        "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
        "data": {"max_length": 48, "max_eval_per_task": 4},
        "train": {"batch_size": 4, "max_steps": 3, "save_every": 1, "lr": 1e-3},
    }
    if sections.get("method") == "meta_lora":
        cfg["train"] = {}
    if sections.get("method") == "align_lora":  # the alignment term needs two tasks in a batch
        qa = [{"prompt": f"Question: what is {i} + 1? Answer:", "answer": str(i + 1),
               "choices": [str(i + 1), str(i + 2)]} for i in range(24)]
        cfg["tasks"].append(str(write_jsonl(tmp_path / "qa.jsonl", qa)))
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- --overwrite deletes only ours
def test_overwrite_refuses_a_folder_with_foreign_files_and_keeps_them(monkeypatch, capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = _run_config(tmp_path, tiny_model_dir, out)
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--no-progress")[0] == 0
    assert (out / MARKER_FILE).is_file()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "--overwrite", "--no-progress")
    _one_line_error(code, err, "notes.txt", "did not write")
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()
    (out / "notes.txt").unlink()
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--overwrite", "--no-progress")[0] == 0


def test_overwrite_never_touches_a_folder_that_is_not_a_run(monkeypatch, capsys, tmp_path, tiny_model_dir):
    """`mtlora train my.yaml output_dir=. --overwrite` in a folder with the user's config and data."""
    work = tmp_path / "project"
    work.mkdir()
    cfg = _run_config(work, tiny_model_dir, work / "unused")
    before = sorted(p.name for p in work.iterdir())
    monkeypatch.chdir(work)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "output_dir=.", "--overwrite", "--no-progress")
    _one_line_error(code, err, "current directory")
    sub = work / "data"
    sub.mkdir()
    (sub / "keep.jsonl").write_text("{}\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), f"output_dir={sub}", "--overwrite", "--no-progress")
    _one_line_error(code, err, "only a run folder")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), f"output_dir={work.parent}", "--overwrite")
    _one_line_error(code, err, "current directory")
    assert sorted(p.name for p in work.iterdir()) == sorted([*before, "data"])
    assert (sub / "keep.jsonl").read_text() == "{}\n"


def test_demo_overwrite_also_refuses_foreign_folders(monkeypatch, capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("x")
    code, _, err = run_cli(monkeypatch, capsys, "demo", "--output-dir", str(out), "--no-progress")
    _one_line_error(code, err, "only a run folder")
    assert (out / "thesis.tex").read_text() == "x"


# --------------------------------------------------------------------------- every numeric key's range
BAD_VALUES = {
    "data.max_length": [0, -3], "data.max_train_per_task": [0], "data.train_k_shot": [0], "data.max_eval_per_task": [-1],
    "data.tasks_per_batch": [0],
    "train.batch_size": [0], "train.grad_accum": [0], "train.lr": [0, -1e-3, math.nan], "train.weight_decay": [-0.1],
    "train.warmup_ratio": [-0.1, 1.0], "train.epochs": [0, -1], "train.max_steps": [0], "train.max_grad_norm": [-1, 0],
    "train.seed": [-1], "train.log_every": [0], "train.eval_every": [-1], "train.save_every": [0],
    "eval.batch_size": [0], "eval.max_new_tokens": [0],
    "align.lambda": [-0.2], "align.eps": [0], "align.mmd_tokens_per_task": [1],
    "meta.k": [0], "meta.support_fraction": [0, 1], "meta.support_size": [0], "meta.query_size": [0],
    "meta.tasks_per_iter": [0], "meta.inner_steps": [0], "meta.inner_lr": [0], "meta.outer_lr": [-1],
    "meta.iterations": [0], "meta.pool_seed": [-1],
}
_CONTEXT = {"data.tasks_per_batch": ["data.sampler=task_balanced"], "align": ["method=align_lora", "align.loss=mmd"],
            "meta": ["method=meta_lora"]}


def _numeric_keys() -> list[str]:
    keys = []
    for section in ("data", "train", "eval", "align", "meta"):
        cls = typing.get_type_hints(config_module.RunConfig)[section]
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if hint in (int, float) or (typing.get_origin(hint) in (typing.Union, __import__("types").UnionType)
                                        and {int, float} & set(typing.get_args(hint))):
                keys.append(f"{section}.{'lambda' if f.name == 'lam' else f.name}")
    return keys


def test_every_numeric_key_has_a_range_check():
    assert sorted(_numeric_keys()) == sorted(BAD_VALUES), "a numeric config key without a row in BAD_VALUES"


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in BAD_VALUES.items() for v in vs])
def test_out_of_range_value_is_a_user_error_naming_the_key(key, value):
    context = _CONTEXT.get(key, _CONTEXT.get(key.split(".")[0], []))
    with pytest.raises(UserError) as info:
        load_config(None, [*context, f"{key}={value}"])
    assert key in info.value.format() and "<command line>" in info.value.format()


def test_max_grad_norm_null_disables_clipping_and_negative_is_refused():
    assert load_config(None, ["train.max_grad_norm=null"]).train.max_grad_norm is None
    with pytest.raises(UserError, match="max_grad_norm"):
        load_config(None, ["train.max_grad_norm=-1"])


# --------------------------------------------------------------------------- keys that do not act
@pytest.mark.parametrize(("method", "override", "needle"), [
    ("meta_lora", "train.lr=0.5", "meta.outer_lr"),
    ("meta_lora", "train.max_steps=7", "meta.iterations"),
    ("meta_lora", "train.batch_size=4", "meta.support_size"),
    ("meta_lora", "data.sampler=uniform", "meta.tasks_per_iter"),
    ("lora", "align.lambda=0.5", "method=align_lora"),
    ("rlora", "meta.k=10", "method=meta_lora"),
    ("align_lora", "align.mmd_bandwidths=[1.0]", "align.loss=mmd"),
    ("lora", "data.tasks_per_batch=2", "task_balanced"),
])
def test_a_key_the_method_does_not_read_is_refused(method, override, needle):
    with pytest.raises(UserError) as info:
        load_config(None, [f"method={method}", override])
    assert needle in info.value.format()


def _track_reads(monkeypatch) -> set[str]:
    """Record every config field a run reads (not the reads of serialising or comparing configs)."""
    reads: set[str] = set()
    paused = [0]
    sections = {config_module.DataConfig: "data", config_module.TrainConfig: "train", config_module.EvalConfig: "eval",
                config_module.AlignConfig: "align", config_module.MetaConfig: "meta"}
    for cls, section in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self, name, _section=section, _names=names):
            if name in _names and not paused[0]:
                reads.add(f"{_section}.{'lambda' if name == 'lam' else name}")
            return object.__getattribute__(self, name)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)

    def pausing(fn):
        def wrapper(*args, **kwargs):
            paused[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                paused[0] -= 1
        return wrapper

    for name in ("to_dict", "check_keys_apply", "changed_keys", "config_differences", "save_config"):
        target = config_module.RunConfig if name == "to_dict" else config_module
        monkeypatch.setattr(target, name, pausing(getattr(target, name)))
    monkeypatch.setattr(dataclasses, "replace", pausing(dataclasses.replace))
    monkeypatch.setattr("mtlora.train.save_config", pausing(config_module.save_config))
    return reads


@pytest.mark.parametrize("method", METHODS)
def test_every_key_acts_or_is_refused_for_every_method(method, monkeypatch, tmp_path, tiny_model_dir):
    """Walk every key of every section: a key the run never reads must be one the config refuses."""
    from mtlora.train import train

    sections = {"train": {"eval_every": 2, "log_every": 1}}
    if method == "meta_lora":
        sections = {"train": {"eval_every": 2, "log_every": 1, "save_every": 1},
                    "meta": {"k": 12, "support_size": 2, "query_size": 2, "tasks_per_iter": 1, "iterations": 2}}
    if method == "align_lora":
        sections["data"] = {"sampler": "task_balanced", "tasks_per_batch": 2}
    sections["method"] = method
    cfg = load_config(_run_config(tmp_path, tiny_model_dir, tmp_path / "out", **sections))
    reads = _track_reads(monkeypatch)
    train(cfg, progress=False)
    not_read = set(BAD_VALUES) | {f"{s}.{f.name}" for s in ("data", "train", "eval", "align", "meta")
                                   for f in dataclasses.fields(getattr(cfg, s))}
    not_read = {"align.lambda" if k == "align.lam" else k for k in not_read} - reads
    refused = set(config_module.NOT_READ_BY_METHOD.get(method, {}))
    refused |= {k for k in not_read if k.split(".")[0] in config_module.SECTION_METHOD
                and config_module.SECTION_METHOD[k.split(".")[0]] != method}
    refused |= {f"{s}.{k}" for (s, k) in config_module.KEY_CONDITIONS}
    refused |= {"data.tasks_per_batch"} if method != "align_lora" else set()  # task_balanced only
    # read on a path this run does not take, with a test of its own elsewhere
    refused |= {"align.require_all_steps"}  # a batch with fewer than 2 tasks (tests/test_align.py)
    assert not_read <= refused, f"{method}: keys neither read nor refused: {sorted(not_read - refused)}"
    for key in sorted(not_read & refused - {f"{s}.{k}" for (s, k) in config_module.KEY_CONDITIONS}):
        if key in ("data.tasks_per_batch", "align.require_all_steps"):
            continue
        value = {"train.gradient_checkpointing": True, "data.sampler": "uniform"}.get(key, 3)
        with pytest.raises(UserError):
            load_config(_run_config(tmp_path, tiny_model_dir, tmp_path / "out2", **sections), [f"{key}={value}"])


# --------------------------------------------------------------------------- resume takes the saved config
def test_resume_refuses_a_changed_config_and_keeps_config_yaml(monkeypatch, capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = _run_config(tmp_path, tiny_model_dir, out, train={"max_steps": 2, "save_every": 1})
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--no-progress")[0] == 0
    saved = (out / "config.yaml").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "train.lr=0.5", "--resume", "--no-progress")
    _one_line_error(code, err, "train.lr: 0.001 -> 0.5")
    assert (out / "config.yaml").read_text() == saved
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "train.max_steps=1", "--resume", "--no-progress")
    _one_line_error(code, err, "train.max_steps")
    # more steps is allowed: the run continues from its checkpoint and config.yaml records the new total
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "train.max_steps=4", "--resume", "--no-progress")[0] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 4
    history = json.loads((out / "results.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]


# --------------------------------------------------------------------------- broken files: one line each
def _trained(tmp_path, tiny_model_dir, monkeypatch, capsys) -> tuple[Path, Path]:
    out = tmp_path / "ok"
    cfg = _run_config(tmp_path, tiny_model_dir, out, train={"max_steps": 2, "save_every": 1})
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--no-progress")[0] == 0
    return out, cfg


def _truncate(path: Path, n: int) -> None:
    path.write_bytes(path.read_bytes()[:n])


def _poison(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = {k: torch.full_like(v, float("nan")) for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _bad_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:16] = b"{not-js "
    path.write_bytes(bytes(data))


BROKEN_ADAPTERS = [
    ("truncated", lambda d: _truncate(d / "adapter_model.safetensors", 100), "unreadable safetensors"),
    ("corrupt header", lambda d: _bad_header(d / "adapter_model.safetensors"), "unreadable safetensors"),
    ("NaN weights", lambda d: _poison(d / "adapter_model.safetensors"), "non-finite"),
    ("no weights", lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    ("config not JSON", lambda d: (d / "adapter_config.json").write_text("{"), "invalid JSON"),
    ("config a list", lambda d: (d / "mtlora_config.json").write_text("[]"), "expected a JSON object"),
]


@pytest.mark.parametrize(("name", "damage", "needle"), BROKEN_ADAPTERS, ids=[c[0] for c in BROKEN_ADAPTERS])
def test_a_broken_adapter_is_one_line_naming_the_file(name, damage, needle, monkeypatch, capsys, tmp_path,
                                                       tiny_model_dir):
    out, _ = _trained(tmp_path, tiny_model_dir, monkeypatch, capsys)
    damage(out / "adapter")
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(tmp_path / "reviews.jsonl"), "--adapter",
                           str(out / "adapter"), "--model", str(tiny_model_dir), "--no-progress")
    _one_line_error(code, err, str(out / "adapter"), needle)


BROKEN_CHECKPOINTS = [
    ("truncated state", lambda c: _truncate(c / STATE_FILE, 200), "unreadable"),
    ("state not a dict", lambda c: torch.save([1, 2], c / STATE_FILE), "not a trainer state"),
    ("missing adapter", lambda c: __import__("shutil").rmtree(c / "adapter"), "missing"),
    ("truncated adapter", lambda c: _truncate(c / "adapter" / "adapter_model.safetensors", 50), "unreadable"),
]


@pytest.mark.parametrize(("name", "damage", "needle"), BROKEN_CHECKPOINTS, ids=[c[0] for c in BROKEN_CHECKPOINTS])
def test_a_broken_checkpoint_is_one_line_and_changes_nothing(name, damage, needle, monkeypatch, capsys, tmp_path,
                                                             tiny_model_dir):
    out, cfg = _trained(tmp_path, tiny_model_dir, monkeypatch, capsys)
    damage(out / CHECKPOINT_DIR)
    saved = (out / "config.yaml").read_text()
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "train.max_steps=4", "--resume", "--no-progress")
    _one_line_error(code, err, needle)
    assert (out / "config.yaml").read_text() == saved


def test_non_finite_scores_are_an_error_not_a_table(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from mtlora.evaluate import NonFiniteScoreError, evaluate
    from mtlora.testing import tiny_model

    model, tok = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    from mtlora.data.jsonl import read_task_file

    with pytest.raises(NonFiniteScoreError, match="non-finite"):
        evaluate(model, tok, read_task_file(write_jsonl(tmp_path / "t.jsonl", _rows(4))), progress=False)


# --------------------------------------------------------------------------- command-line inputs
def test_bad_eval_options_fail_before_any_work(monkeypatch, capsys, tmp_path, tiny_model_dir):
    task = str(write_jsonl(tmp_path / "t.jsonl", _rows()))
    (tmp_path / "a_file").write_text("")
    cases = [
        (["--batch-size", "0"], "--batch-size"),
        (["--max-per-task", "0"], "--max-per-task"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--output", str(tmp_path / "a_file" / "m.json")], "is a file"),
        (["--output", str(tmp_path)], "is a folder"),
    ]
    import mtlora.models

    def no_model(*a, **k):  # the checks must come before the model is loaded
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(mtlora.models, "load_model", no_model)
    for args, needle in cases:
        code, _, err = run_cli(monkeypatch, capsys, "eval", task, "--model", str(tiny_model_dir), *args)
        _one_line_error(code, err, needle)


@pytest.mark.parametrize(("override", "needle"), [
    ("output_dir={a_file}/sub", "is a file"),
    ("tasks=[no_such_task]", "no_such_task"),
    ("model={tmp}/not_a_model", "not_a_model"),
])
def test_a_failed_start_writes_nothing(override, needle, monkeypatch, capsys, tmp_path, tiny_model_dir):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "not_a_model").mkdir()
    out = tmp_path / "fresh"
    cfg = _run_config(tmp_path, tiny_model_dir, out)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg),
                           override.format(a_file=tmp_path / "a_file", tmp=tmp_path), "--no-progress")
    _one_line_error(code, err, needle)
    assert not out.exists(), "a failed start left an output folder behind"
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--no-progress")[0] == 0  # a plain rerun works


def test_errors_in_overrides_name_the_command_line_and_yaml_errors_say_why(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 1e-4\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg), "train.lr=abc")
    line = _one_line_error(code, err, "<command line>", "train.lr")
    assert str(cfg) not in line
    cfg.write_text("train:\n  lr: [1e-4\n")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(cfg))
    _one_line_error(code, err, f"{cfg}:3", "invalid YAML: expected", "column")


# --------------------------------------------------------------------------- user task files: held out
def test_a_user_file_is_hash_split_and_no_eval_row_is_a_training_row(tmp_path):
    from mtlora.data.tasks import load_tasks

    path = write_jsonl(tmp_path / "mine.jsonl", _rows(60))
    train, evals = load_tasks([str(path)], "train"), load_tasks([str(path)], "eval")
    assert len(train) + len(evals) == 60 and 0 < len(evals) < 30
    assert not {(e.prompt, e.answer) for e in train} & {(e.prompt, e.answer) for e in evals}


def test_a_train_eval_pair_uses_each_file_for_its_split(tmp_path, tiny_model_dir):
    from mtlora.data.tasks import load_tasks
    from mtlora.train import prepare_run

    rows = _rows(30)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:20])
    b = write_jsonl(tmp_path / "b.jsonl", rows[20:])
    pair = {"name": "reviews", "train": str(a), "eval": str(b)}
    cfg = load_config(None, [f"model={tiny_model_dir}", f"tasks=[{json.dumps(pair)}]", "data.max_eval_per_task=null"])
    run = prepare_run(cfg)
    assert len(run.train_examples) == 20 and len(run.eval_examples) == 10
    assert {e.task for e in run.train_examples + run.eval_examples} == {"reviews"}
    assert not {e.prompt for e in run.train_examples} & {e.prompt for e in run.eval_examples}
    leaky = write_jsonl(tmp_path / "c.jsonl", rows[15:])
    with pytest.raises(UserError, match="also in the training file"):
        load_tasks([{"name": "reviews", "train": str(a), "eval": str(leaky)}], "eval")
    with pytest.raises(UserError, match="needs both files"):
        load_config(None, ["tasks=[{name: x, train: a.jsonl}]"])


# --------------------------------------------------------------------------- signals and exit codes
def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtlora.cli", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_checkpoints_names_the_resume_command_and_exits_128_plus_n(signum, code, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = _run_config(tmp_path, tiny_model_dir, out, train={"max_steps": 2000, "save_every": 1000, "log_every": 1})
    proc = _cli("train", str(cfg), "--no-progress")
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert "interrupted at step" in last and "--resume" in last and str(out / CHECKPOINT_DIR) in last
    step = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=False)["step"]
    assert 3 <= step < 2000, "the checkpoint is not the interrupted step's"
    assert f"step {step}/" in last
    assert "train step 1/2000" in stdout  # not a terminal: one plain line per log_every steps


def test_a_child_process_failure_is_the_exit_code(monkeypatch, capsys, tmp_path, tiny_model_dir):
    import mtlora.distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(mtlora.distributed, "relaunch_train", lambda n, args: 3)
    cfg = _run_config(tmp_path, tiny_model_dir, tmp_path / "o")
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "--num-processes", "2")[0] == 3


def test_ctrl_c_outside_training_exits_130(monkeypatch, capsys, tmp_path):
    import mtlora.data.jsonl

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(mtlora.data.jsonl, "check_task_file", interrupted)
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", str(write_jsonl(tmp_path / "t.jsonl", _rows(2))))
    assert code == 130 and "interrupted" in err


# --------------------------------------------------------------------------- logs and files others can use
def test_not_on_a_terminal_it_logs_lines_and_writes_metrics_jsonl(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    cfg = _run_config(tmp_path, tiny_model_dir, out, train={"max_steps": 4, "log_every": 2, "save_every": 2})
    proc = _cli("train", str(cfg))  # progress on, stdout a pipe
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("train step")]
    assert [line.split()[2] for line in lines] == ["2/4", "4/4"]
    assert all(k in lines[0] for k in ("loss", "lr", "tok/s", "eta"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4]
    assert records[0]["tokens_per_second"] > 0


def test_outputs_follow_the_umask_and_name_the_base_portably(monkeypatch, capsys, tmp_path, tiny_model_dir):
    from mtlora.adapters import inject_adapters, make_adapter_config, save_adapter
    from mtlora.testing import tiny_model

    old = os.umask(0o022)
    try:
        out, _ = _trained(tmp_path, tiny_model_dir, monkeypatch, capsys)
        model, _ = tiny_model("llama")
        inject_adapters(model, make_adapter_config("lora", r=2, target_modules=["q_proj"]))
        named = save_adapter(model, tmp_path / "named", base_model_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    finally:
        os.umask(old)
    for path in [out / "adapter", out / CHECKPOINT_DIR, *(out / "adapter").iterdir(), out / "results.json"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    cfg = json.loads((named / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_stock_peft_rejects_a_multi_head_adapter_with_a_sentence(tmp_path):
    peft = pytest.importorskip("peft")
    from mtlora.adapters import inject_adapters, make_adapter_config, save_adapter
    from mtlora.testing import tiny_model

    model, _ = tiny_model("llama")
    inject_adapters(model, make_adapter_config("hydralora", r=2, num_heads=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "hydra")
    with pytest.raises(Exception) as info:
        peft.PeftModel.from_pretrained(tiny_model("llama")[0], str(tmp_path / "hydra"))
    assert "multi-head adapter of mtlora" in str(info.value) and "stock PEFT cannot run it" in str(info.value)


def test_a_killed_writes_temporaries_are_cleaned_at_the_next_start(monkeypatch, capsys, tmp_path, tiny_model_dir):
    out, cfg = _trained(tmp_path, tiny_model_dir, monkeypatch, capsys)
    stale = [out / ".checkpoint.tmpab12", out / ".checkpoint.old4242", out / CHECKPOINT_DIR / ".trainer_state.pt.tmpx"]
    for path in stale:
        path.mkdir() if "state" not in path.name else path.write_bytes(b"half")
    (out / ".keepme").write_text("not ours")
    assert run_cli(monkeypatch, capsys, "train", str(cfg), "train.max_steps=3", "--resume", "--no-progress")[0] == 0
    assert not any(p.exists() for p in stale)
    assert (out / ".keepme").read_text() == "not ours"


# --------------------------------------------------------------------------- the JSONL reader, fuzzed
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
_field = st.sampled_from(["prompt", "answer", "choices", "task", "target_delimiter", "meta", "extra"])
_row = st.dictionaries(_field, _json | st.text(min_size=1, max_size=12) | st.lists(st.text(max_size=5), max_size=4),
                       max_size=6)
_line = st.one_of(
    _row.map(lambda r: json.dumps(r).encode()),
    _row.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    _json.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"\xef\xbb\xbf{}", b"\x00", b"[", b"[" * 5000, b'{"prompt": "a\x00", "answer": "b"}',
                     b'{"prompt": "\\ud800", "answer": "b"}', b"\xff\xfe{\x00}\x00"]),
)
_file = st.tuples(st.lists(_line, max_size=6), st.sampled_from([b"\n", b"\r\n", b"\r"]), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_file)
def test_the_reader_gives_a_task_list_or_a_user_error_never_another_exception(tmp_path, case):
    from mtlora.data.example import Example
    from mtlora.data.jsonl import read_task_file, write_task_file

    lines, newline, bom = case
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines))
    try:
        examples = read_task_file(path)
    except UserError as exc:
        assert exc.format().startswith(str(path)) and "\n" not in exc.format()
        return
    assert examples and all(isinstance(ex, Example) for ex in examples)
    assert read_task_file(write_task_file(tmp_path / "again.jsonl", examples)) == examples


def test_the_reader_on_the_shapes_users_send(tmp_path):
    from mtlora.data.jsonl import read_task_file

    ok = b'{"prompt": "p", "answer": "a"}'
    cases = {
        "crlf.jsonl": (ok + b"\r\n") * 2, "bom.jsonl": b"\xef\xbb\xbf" + ok + b"\n",
        "long.jsonl": json.dumps({"prompt": "x" * 5_000_000, "answer": "a"}).encode() + b"\n",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert read_task_file(tmp_path / name)[0].answer == "a"
    bad = {
        "latin1.jsonl": ("caf\xe9".encode("latin-1"), ":1: not valid UTF-8"),
        "array.jsonl": (b'[{"prompt": "p", "answer": "a"}]', ":1: expected a JSON object"),
        "nul.jsonl": (ok + b"\n\x00" + ok, ":2: NUL byte"),
        "deep.jsonl": (b"[" * 100_000, ":1: invalid JSON"),
        "types.jsonl": (b'{"prompt": "p", "answer": "a", "choices": ["a", 3]}', ":1: choices"),
    }
    for name, (data, needle) in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError) as info:
            read_task_file(tmp_path / name)
        assert needle in info.value.format(), info.value.format()


def test_the_portable_base_name_resolves_offline_to_the_embedded_alias(monkeypatch, tmp_path):
    import mtlora.models as models

    called = {}

    def fake_convert(package_file, target):  # no conversion in the test: record what would load
        called["target"] = target
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setenv("MTLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    monkeypatch.setattr(models, "_package_file", lambda package, filename: tmp_path / filename)
    assert models.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == models.resolve_model("smollm2-135m")
    with pytest.raises(UserError, match="no such model folder"):
        models.resolve_model("someone/else")


@pytest.mark.parametrize("section, cls", [("data", "DataConfig"), ("eval", "EvalConfig"), ("align", "AlignConfig"),
                                          ("meta", "MetaConfig"), ("", "RunConfig")])
def test_every_choice_field_refuses_a_value_outside_its_choices_when_built_in_python(section, cls):
    """YAML values are checked on loading; a section built in Python gets the same one-line error
    for every ``Literal`` field, not only for the fields someone remembered to check by hand."""
    klass = getattr(config_module, cls)
    literal = {name: typing.get_args(hint) for name, hint in typing.get_type_hints(klass).items()
               if typing.get_origin(hint) is typing.Literal}
    assert literal, f"{cls} has no choice field"
    for name, allowed in literal.items():
        key = f"{section}.{name}" if section else name
        with pytest.raises(UserError, match=rf"^{key}: expected one of \[") as info:
            klass(**{name: "not-a-choice"})
        assert repr(list(allowed)) in str(info.value)
        klass(**{name: allowed[-1]})  # every listed choice is accepted (where the section allows it alone)
