"""Data parallelism on 2 CPU processes (gloo): equal to 1 process, and resumable after a kill.

The 2-process runs use ``train.batch_size`` 2 per process against a 1-process run with 4, so both
see the same global batches (the sampler slices each global batch by rank). Adapter dropout is 0:
ranks draw their own dropout masks (seeded per rank), which no 1-process run can reproduce.

Tolerances: losses and gradient norms agree to 1e-5 at every step (observed: <= 1e-6). The adapter
weights get 5e-5: the 2 ranks sum their gradients in another order than one process does (rounding,
~1e-7 relative), and AdamW divides every entry by its own RMS, so in entries whose gradient nearly
cancels (R-LoRA's heads) that rounding becomes a visible share of an lr-sized update (observed
1.8e-5 at lr 1e-3, 1e-4 at lr 1e-2; LoRA and Align-LoRA stay below 1e-6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtlora.config import load_config
from mtlora.distributed import launch_command
from mtlora.train import CHECKPOINT_DIR, STATE_FILE, train

WORKER = Path(__file__).with_name("ddp_worker.py")
# test id -> (method, adapter options, train options, other config sections)
METHODS = {
    "lora": ("lora", {}, {}, {}),
    "rlora": ("rlora", {"num_heads": 3}, {"grad_accum": 2}, {}),  # accumulation: no_sync on micro-batch 1
    "align_lora": ("align_lora", {}, {}, {}),
    # per-position statistics: ranks pad to their own longest row, so T differs before the all-reduce.
    # eps 0.01: with the default floor 1e-5 and 2 rows per task, most positions' Gaussians are
    # degenerate, the loss is ~1e4 with gradient norm ~2e4, and rounding alone moves it by 1e-4 relative.
    "align_lora_per_position": ("align_lora", {}, {}, {"align": {"statistics": "per_position", "eps": 0.01}}),
}
RESUME_STEPS = 40


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def _write_config(root: Path, name: str, model: Path, tasks: list[Path], method: str, batch_size: int,
                  adapter: dict | None = None, sections: dict | None = None, **train_kw) -> Path:
    cfg = {
        "model": str(model),
        "method": method,
        "tasks": [str(t) for t in tasks],
        "output_dir": str(root / name),
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear", **(adapter or {})},
        "data": {"max_length": 48, "max_eval_per_task": 0, "sampler": "task_balanced"},
        "train": {"batch_size": batch_size, "lr": 1e-3, "max_steps": 4, "save_every": 2, "seed": 3,
                  "warmup_ratio": 0.0, **train_kw},
        **(sections or {}),
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _two_tasks(root: Path) -> list[Path]:
    """Two task files whose prompts differ in length (ranks hold unequal token counts)."""
    words = ["loves", "hates", "really likes", "bites hard on"]
    sentiment = [{"prompt": f"Review: the cat {w} the mat. Positive or negative?", "answer": a,
                  "choices": ["negative", "positive"]}
                 for w, a in zip(words * 4, ["positive", "negative", "positive", "negative"] * 4, strict=True)]
    qa = [{"prompt": f"Question: what is {i} + 1? Answer:", "answer": str(i + 1) * (1 + i % 3),
           "choices": [str(i + 1) * (1 + i % 3), str(i + 2)]} for i in range(16)]
    tasks = [write_jsonl(root / "sentiment.jsonl", sentiment), write_jsonl(root / "qa.jsonl", qa)]
    return tasks


@pytest.fixture(scope="module")
def ddp_setup(tmp_path_factory, tiny_model_dir):
    """Tasks with prompts of different lengths (ranks hold unequal token counts), configs, one
    2-process launch for every method plus the uninterrupted reference of the resume test."""
    root = tmp_path_factory.mktemp("ddp")
    tasks = _two_tasks(root)
    configs = {}
    for name, (method, adapter, train_kw, sections) in METHODS.items():
        configs[name] = {
            n: _write_config(root, f"{name}_{n}proc", tiny_model_dir, tasks, method, 4 // n, adapter, sections,
                             **train_kw)
            for n in (1, 2)
        }
    resume_cfg = {
        name: _write_config(root, name, tiny_model_dir, tasks, "lora", 2, max_steps=RESUME_STEPS, save_every=3)
        for name in ("whole", "killed")
    }
    idle = _write_config(root, "idle", tiny_model_dir, tasks, "rlora", 2, {"num_heads": 3}, max_steps=3)
    two = [str(configs[m][2]) for m in METHODS] + [str(resume_cfg["whole"]), f"idle:{idle}"]
    proc = subprocess.run([*launch_command(2), str(WORKER), *two], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, configs, resume_cfg


def _history(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["history"]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_equal_one_process_with_the_same_global_batch(ddp_setup, method):
    root, configs, _ = ddp_setup
    train(load_config(configs[method][1]), progress=False)
    one, two = root / f"{method}_1proc", root / f"{method}_2proc"
    assert json.loads((two / "results.json").read_text())["world_size"] == 2
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 4
    for keys in ("loss", "grad_norm", "lm_loss", "align_loss", "inter_task_kl"):
        for a, b in zip(h1, h2, strict=True):
            if keys in a:
                assert b[keys] == pytest.approx(a[keys], abs=1e-5, rel=1e-5), (keys, a["step"])
    if method.startswith("align_lora"):
        assert all(h["align_loss"] > 0 for h in h2), "the alignment term must be active in the test"
    w1, w2 = _adapter(one), _adapter(two)
    assert w1.keys() == w2.keys()
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=5e-5, rtol=1e-5)
    assert any(float(w.abs().max()) > 0 for k, w in w2.items() if "lora_B" in k), "the adapter never moved"


@pytest.mark.slow
def test_a_parameter_without_gradient_does_not_break_ddp(ddp_setup):
    """R-LoRA plus a trainable parameter that no step reaches (tests/ddp_worker.py ``idle:``): DDP
    needs find_unused_parameters=True, or its second step fails waiting for that gradient."""
    root, _, _ = ddp_setup
    results = json.loads((root / "idle" / "results.json").read_text())
    assert results["world_size"] == 2
    assert [row["step"] for row in results["history"]] == [1, 2, 3]
    assert all(row["loss"] == row["loss"] for row in results["history"])  # finite, not NaN


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and every process it started (torchrun puts workers in their own sessions)."""
    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True) + [parent]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()


@pytest.mark.slow
def _kill_at_first_checkpoint(cmd: list[str], state: Path) -> None:
    """Start a training command, SIGKILL it (and its workers) once its first checkpoint exists."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    _kill_tree(proc)
    assert state.exists(), "the run never wrote a checkpoint"


def test_two_process_run_killed_midway_resumes_to_the_same_adapter(ddp_setup):
    root, _, cfg = ddp_setup
    killed = root / "killed"
    cli = [sys.executable, "-m", "mtlora.cli", "train", str(cfg["killed"]), "--no-progress", "--num-processes", "2"]
    _kill_at_first_checkpoint(cli, killed / CHECKPOINT_DIR / STATE_FILE)
    saved_step = torch.load(killed / CHECKPOINT_DIR / STATE_FILE, weights_only=False)["step"]
    assert saved_step < RESUME_STEPS, "the run finished before it could be killed: the test proves nothing"
    assert not (killed / "adapter").exists()
    resumed = subprocess.run([*cli, "--resume"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _adapter(root / "whole")
    after = _adapter(killed)
    for key in whole:
        torch.testing.assert_close(after[key], whole[key], atol=1e-6, rtol=1e-6)
    h = _history(killed)
    assert [row["step"] for row in h] == list(range(1, RESUME_STEPS + 1))


def test_meta_lora_refuses_several_processes(tmp_path, tiny_model_dir):
    """MeTA-LoRA trains in one process: --num-processes must say so instead of racing two runs."""
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a", "answer": "b"}])
    cfg = _write_config(tmp_path, "meta", tiny_model_dir, [task], "meta_lora", 2)
    raw = yaml.safe_load(cfg.read_text())
    raw["train"] = {}  # meta_lora has its own keys (meta.*); the config rejects the train keys it ignores
    del raw["data"]["sampler"]
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "mtlora.cli", "train", str(cfg), "--num-processes", "2"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "meta_lora trains in one process" in proc.stderr
    assert not (tmp_path / "meta").exists()


def test_fsdp_wrap_policy_makes_decoder_layers_the_units():
    """The FSDP wrap policy: decoder layers, with their adapter weights inside (the fused adapter
    kernels read lora_A/lora_B without calling them, so those cannot be units; tests/test_fsdp.py runs it)."""
    from mtlora.adapters import inject_adapters, make_adapter_config
    from mtlora.distributed import fsdp_wrap_policy
    from mtlora.testing import tiny_model

    model, _ = tiny_model("llama")
    inject_adapters(model, make_adapter_config("rlora", r=4, num_heads=3, target_modules="all-linear"))
    policy = fsdp_wrap_policy(model)
    wrapped = {name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=1)}
    assert "model.layers.0" in wrapped and "model.layers.1" in wrapped
    assert "model.layers.0.self_attn.q_proj.lora_A" not in wrapped
    assert "model.layers.0.self_attn.q_proj.router" not in wrapped
    assert "model.layers.0.self_attn.q_proj.base_layer" not in wrapped
    assert not any(name.endswith("embed_tokens") for name in wrapped)
