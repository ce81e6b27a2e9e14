"""FSDP (``configs/accelerate/fsdp.yaml``) on 2 CPU processes (gloo): equal to 1 process, resumable.

Accelerate builds FSDP only for GPU-like devices, so the trainer wraps torch's FSDP (v1) itself and
uses Accelerate for the process group (``mtlora.distributed``): these runs go through the same
``accelerate launch --config_file configs/accelerate/fsdp.yaml`` a GPU machine uses, with gloo.

As in tests/test_distributed.py, 2 processes with ``batch_size`` 2 are compared with 1 process with
4 (the same global batches), adapter dropout 0, with that file's tolerances. Observed when this file
was added: losses within 1e-7 and gradient norms within 1.4e-6 relative (Align-LoRA; 1.3e-7 for
the others), adapter weights within 6e-8, evaluations equal. The resume test kills a 2-process FSDP run once it has a checkpoint and
resumes it under FSDP: every rank reloads the whole adapter (sharded again by the wrapping) and its
own optimiser shard; the adapter then equals the uninterrupted run's (observed: bit for bit; with
the optimiser shards not reloaded it differed by 1.6e-2, so the test sees them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_distributed import _adapter, _env, _history, _kill_at_first_checkpoint, _two_tasks, _write_config

from mtlora.config import load_config
from mtlora.distributed import free_port
from mtlora.errors import UserError
from mtlora.train import CHECKPOINT_DIR, STATE_FILE, load_trained, train

ROOT = Path(__file__).resolve().parent.parent
FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"
WORKER = Path(__file__).with_name("ddp_worker.py")
RESUME_STEPS = 40
# test id -> (method, adapter options, train options, other config sections)
METHODS = {
    # with held-out rows and eval_every: rank 0 evaluates the model gathered from the shards
    "lora": ("lora", {}, {"eval_every": 2}, {"data": {"max_length": 48, "max_eval_per_task": 3,
                                                       "sampler": "task_balanced"}}),
    "rlora": ("rlora", {"num_heads": 3}, {"grad_accum": 2}, {}),  # accumulation: FSDP's no_sync
    "align_lora": ("align_lora", {}, {}, {}),  # statistics all-reduced inside the FSDP forward
}


def fsdp_launch() -> list[str]:
    """``accelerate launch`` with the FSDP config, 2 local processes (gloo on a CPU machine)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG),
            "--num_processes", "2", "--main_process_port", str(free_port())]


@pytest.fixture(scope="module")
def fsdp_setup(tmp_path_factory, tiny_model_dir):
    """Tasks with prompts of different lengths, configs, and one FSDP launch (tests/ddp_worker.py)
    for every compared method plus the uninterrupted reference of the resume test."""
    root = tmp_path_factory.mktemp("fsdp")
    tasks = _two_tasks(root)
    configs = {
        name: {n: _write_config(root, f"{name}_{n}proc", tiny_model_dir, tasks, method, 4 // n, adapter, sections,
                                **train_kw) for n in (1, 2)}
        for name, (method, adapter, train_kw, sections) in METHODS.items()
    }
    resume_cfg = {name: _write_config(root, name, tiny_model_dir, tasks, "lora", 2, max_steps=RESUME_STEPS,
                                      save_every=3) for name in ("whole", "killed")}
    runs = [str(configs[m][2]) for m in METHODS] + [str(resume_cfg["whole"])]
    proc = subprocess.run([*fsdp_launch(), str(WORKER), *runs], env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, configs, resume_cfg


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_fsdp_two_processes_equal_one_process(fsdp_setup, method):
    root, configs, _ = fsdp_setup
    train(load_config(configs[method][1]), progress=False)
    one, two = root / f"{method}_1proc", root / f"{method}_2proc"
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r2["world_size"] == 2
    saved = torch.load(two / CHECKPOINT_DIR / STATE_FILE, weights_only=False)
    assert len(saved["optimizer_per_rank"]) == 2, "the run was not sharded (FSDP)"
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 4
    for key in ("loss", "grad_norm", "lm_loss", "align_loss"):
        for a, b in zip(h1, h2, strict=True):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5, rel=1e-5), (key, a["step"])
    if method == "align_lora":
        assert all(h["align_loss"] > 0 for h in h2), "the alignment term must be active in the test"
    assert [e["step"] for e in r2["evals"]] == [e["step"] for e in r1["evals"]]
    assert [e["macro"] for e in r2["evals"]] == [e["macro"] for e in r1["evals"]]
    if method == "lora":
        assert [e["step"] for e in r2["evals"]] == [2, 4], "eval_every and the final evaluation ran"
    w1, w2 = _adapter(one), _adapter(two)
    assert w1.keys() == w2.keys()  # whole, and named as the unwrapped model's (no FSDP prefixes)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], atol=5e-5, rtol=1e-5)
    assert any(float(w.abs().max()) > 0 for k, w in w2.items() if "lora_B" in k), "the adapter never moved"
    model, _, extra = load_trained(two / "adapter")  # the saved folder loads as any other
    assert extra["method"] == METHODS[method][0]


@pytest.mark.slow
def test_fsdp_run_killed_midway_resumes_to_the_same_adapter(fsdp_setup):
    root, _, cfg = fsdp_setup
    killed = root / "killed"
    cmd = [*fsdp_launch(), "-m", "mtlora.cli", "train", str(cfg["killed"]), "--no-progress"]
    state = killed / CHECKPOINT_DIR / STATE_FILE
    _kill_at_first_checkpoint(cmd, state)
    saved = torch.load(state, weights_only=False)
    assert saved["step"] < RESUME_STEPS, "the run finished before it could be killed: the test proves nothing"
    assert len(saved["optimizer_per_rank"]) == 2 and saved["fsdp_sharding"] == "FULL_SHARD"
    resumed = subprocess.run([*fsdp_launch(), *cmd[len(fsdp_launch()):], "--resume"], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole, after = _adapter(root / "whole"), _adapter(killed)
    assert whole.keys() == after.keys()
    for key in whole:
        torch.testing.assert_close(after[key], whole[key], atol=1e-6, rtol=1e-6)
    assert [row["step"] for row in _history(killed)] == list(range(1, RESUME_STEPS + 1))
    # a sharded optimiser state does not fit one process: refused in one line, nothing trained
    with pytest.raises(UserError, match="written by an FSDP run of 2 processes"):
        train(load_config(cfg["killed"]), resume=True, progress=False)


def _fake_dist(world_size: int, sharding: str | None):
    from torch.distributed.fsdp import ShardingStrategy

    fsdp = None if sharding is None else {"sharding_strategy": ShardingStrategy[sharding]}
    return SimpleNamespace(world_size=world_size, rank=0, fsdp=fsdp)


@pytest.mark.parametrize(
    ("saved", "dist", "message"),
    [
        ({}, _fake_dist(2, "FULL_SHARD"), "written by a one-process or DDP run"),
        ({"optimizer_per_rank": [{}] * 2, "fsdp_sharding": "FULL_SHARD"}, _fake_dist(4, "FULL_SHARD"),
         "written by FSDP with 2 processes"),
        ({"optimizer_per_rank": [{}] * 2, "fsdp_sharding": "FULL_SHARD"}, _fake_dist(2, "SHARD_GRAD_OP"),
         "written by FSDP with 2 processes"),
        ({"optimizer_per_rank": [{}] * 2, "fsdp_sharding": "FULL_SHARD"}, _fake_dist(2, None),
         "written by an FSDP run of 2 processes"),
    ],
)
def test_an_optimiser_state_resumes_only_under_its_own_layout(saved, dist, message):
    from mtlora.train import _check_optimizer_layout

    with pytest.raises(UserError, match=message):
        _check_optimizer_layout(saved, Path("run/checkpoint/trainer_state.pt"), dist)


def test_fsdp_options_come_from_the_launchers_variables(monkeypatch):
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    from mtlora.distributed import fsdp_options

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_options() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "2")  # older configs: 1-based numbers
    monkeypatch.setenv("FSDP_BACKWARD_PREFETCH", "BACKWARD_POST")
    opts = fsdp_options()
    assert opts["sharding_strategy"] is ShardingStrategy.SHARD_GRAD_OP
    assert opts["backward_prefetch"] is BackwardPrefetch.BACKWARD_POST
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "EVERYTHING")
    with pytest.raises(UserError, match="fsdp_sharding_strategy is 'EVERYTHING'"):
        fsdp_options()
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(UserError, match="fsdp_version 2 is not supported"):
        fsdp_options()
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("FSDP_USE_ORIG_PARAMS", "false")
    with pytest.raises(UserError, match="fsdp_use_orig_params must be true"):
        fsdp_options()


def test_fsdp_refuses_half_precision(monkeypatch, tmp_path, tiny_model_dir, task_files):
    """bf16/fp16 bases: FSDP (v1) would fail deep inside its flattening (frozen bf16 and fp32 adapter
    weights share a unit); the trainer says so in one line before anything is written."""
    from torch.distributed.fsdp import ShardingStrategy

    from mtlora.distributed import Dist

    monkeypatch.setattr("mtlora.train.setup_distributed",
                        lambda: Dist(fsdp={"sharding_strategy": ShardingStrategy.FULL_SHARD}))
    cfg = _write_config(tmp_path, "bf16", tiny_model_dir, task_files, "lora", 2, sections={"precision": "bf16"})
    with pytest.raises(UserError, match="bf16 is not supported under FSDP"):
        train(load_config(cfg), progress=False)
    assert not (tmp_path / "bf16").exists()
