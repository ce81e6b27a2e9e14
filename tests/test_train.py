"""Trainer: answer-only loss, resume after a real kill (bit-exact), NaN stop, checkpoints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtlora.config import load_config
from mtlora.data.collate import TaskCollator
from mtlora.data.jsonl import read_task_file
from mtlora.objectives import supervised_lm_loss
from mtlora.testing import TINY_ARCHS, tiny_model
from mtlora.train import CHECKPOINT_DIR, STATE_FILE, TrainingDiverged, train


def _config_file(tmp_path: Path, model_dir: Path, tasks: list[Path], out: Path, **train) -> Path:
    cfg = {
        "model": str(model_dir),
        "method": "lora",
        "tasks": [str(t) for t in tasks],
        "output_dir": str(out),
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"},
        "data": {"max_length": 48, "max_eval_per_task": 4},
        "train": {"batch_size": 4, "lr": 1e-2, "max_steps": 12, "save_every": 4, "seed": 3, **train},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answer_only_loss_equals_full_logits_loss(arch, task_files):
    model, tok = tiny_model(arch)
    examples = read_task_file(task_files[0])[:3] + read_task_file(task_files[1])[:3]
    batch = TaskCollator(tok, ["qa", "sentiment"], max_length=64)(examples)
    ours, _ = supervised_lm_loss(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtlora.cli", *args], env=env, **kw)


def _final_adapter_bytes(out: Path) -> bytes:
    return (out / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_resume_after_kill_reaches_the_same_adapter_bit_for_bit(tmp_path, tiny_model_dir, task_files):
    steps = 300
    whole = tmp_path / "whole"
    killed = tmp_path / "killed"
    cfg_whole = _config_file(tmp_path, tiny_model_dir, task_files, whole, max_steps=steps, save_every=7)
    cfg_killed = _config_file(tmp_path, tiny_model_dir, task_files, killed, max_steps=steps, save_every=7)
    assert _cli("train", str(cfg_whole), "--no-progress").wait(timeout=300) == 0

    proc = _cli("train", str(cfg_killed), "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / CHECKPOINT_DIR / STATE_FILE
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists(), "the run never wrote a checkpoint"
    saved_step = torch.load(state, weights_only=False)["step"]
    assert saved_step < steps, "the run finished before it could be killed: the test proves nothing"
    assert not (killed / "adapter").exists()

    assert _cli("train", str(cfg_killed), "--resume", "--no-progress").wait(timeout=300) == 0
    assert _final_adapter_bytes(killed) == _final_adapter_bytes(whole)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, task_files, monkeypatch):
    out = tmp_path / "nan"
    config = load_config(_config_file(tmp_path, tiny_model_dir, task_files, out, max_steps=10, save_every=2))
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, logs = supervised_lm_loss(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), logs

    monkeypatch.setattr("mtlora.train.build_objective", lambda config: poisoned)
    with pytest.raises(TrainingDiverged, match="step 5"):
        train(config, progress=False)
    state = torch.load(out / CHECKPOINT_DIR / STATE_FILE, weights_only=False)
    assert state["step"] == 4
    assert (out / CHECKPOINT_DIR / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter").exists()


def test_training_reduces_loss_and_writes_outputs(tmp_path, tiny_model_dir, task_files):
    out = tmp_path / "run"
    config = load_config(_config_file(tmp_path, tiny_model_dir, task_files, out, max_steps=30, save_every=10))
    summary = train(config, progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "results.json").is_file() and (out / "config.yaml").is_file()
    assert set(summary["evals"][-1]["per_task"]) == {"qa", "sentiment"}
    assert summary["trainable_parameters"] > 0


def test_existing_output_needs_overwrite_or_resume(tmp_path, tiny_model_dir, task_files):
    from mtlora.errors import UserError

    out = tmp_path / "exists"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    config = load_config(_config_file(tmp_path, tiny_model_dir, task_files, out))
    with pytest.raises(UserError, match="--overwrite"):
        train(config, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="nothing to resume"):
        train(config, resume=True, progress=False)


_FAULTS_SCRIPT = """
import resource, sys, torch
from mtlora.train import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def round_():
    ts = [torch.ones(5 << 20) for _ in range(4)]  # 4 x 20 MB, freed together
    del ts
round_(); round_()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_memory_stops_page_faults_on_reallocation():
    """Re-allocating freed activation-sized buffers touches no fresh pages once the process keeps
    its freed memory (at most two late heap growths of one 20 MB buffer, 5120 pages each: one was
    seen 1 time in 7, two once on 2026-12-02 in a full-suite run). The contrast runs with glibc's starting thresholds held fixed (128 KB: buffers come from
    fresh mmap pages and go back on free), where every round faults every page again (~20,000);
    glibc's dynamic thresholds land on either side of that from run to run, which is the problem."""
    faults = {}
    for mode in ("default", "retain"):
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env=env)
        faults[mode] = int(out.stdout.split()[-1])
    assert faults["retain"] <= 2 * 5120 + 200, faults
    assert faults["default"] > 10 * (5120 + 200), faults
