"""Device and precision: bf16 (and fp16) training for every method, fp32 master adapters, resume,
bf16 vs fp32 agreement, devices a machine lacks, and CPU-only kernels that stay on the CPU.

``MTLORA_TEST_DEVICE`` (default cpu) is the device these tests train on: the device check runs
them with ``MTLORA_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mtlora.train as train_mod
from mtlora.adapters import inject_adapters, make_adapter_config
from mtlora.config import load_config
from mtlora.models import apply_precision, base_dtype, resolve_device
from mtlora.testing import tiny_model
from mtlora.train import load_trained, prepare_run, train

DEVICE = os.environ.get("MTLORA_TEST_DEVICE", "cpu")
METHODS = ("lora", "hydralora", "rlora", "mlora", "align_lora", "meta_lora")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: toy models want one thread


def _cfg(model_dir: Path, tasks: list[Path], out: Path, method: str = "lora", precision: str = "bf16", **extra):
    adapter = {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": "all-linear"}
    if method in ("hydralora", "rlora", "mlora"):
        adapter["num_heads"] = 2
    overrides = [
        f"model={model_dir}", f"method={method}", f"tasks=[{tasks[0]},{tasks[1]}]", f"output_dir={out}",
        f"adapter={adapter}", f"precision={precision}", f"device={DEVICE}",
        "data.max_length=48", "data.max_eval_per_task=2", "data.max_train_per_task=8",
        "train.save_every=3", "train.warmup_ratio=0", "eval.batch_size=4",
    ]
    if method == "meta_lora":  # the keys MeTA-LoRA reads instead of train.{batch_size, max_steps, lr}
        overrides += ["meta.k=8", "meta.support_size=2", "meta.query_size=2", "meta.tasks_per_iter=2",
                      "meta.iterations=6", "meta.outer_lr=3e-2"]
    else:
        overrides += ["train.batch_size=4", "train.max_steps=6", "train.lr=3e-2"]
    return load_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def _train(cfg, **kw):
    if cfg.method == "meta_lora":
        from mtlora.meta import train_meta

        return train_meta(cfg, progress=False, **kw)
    return train(cfg, progress=False, **kw)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_trains_saves_loads_and_resumes_every_method(method, tiny_model_dir, task_files, tmp_path, monkeypatch):
    whole = _cfg(tiny_model_dir, task_files, tmp_path / "whole", method)
    run = prepare_run(whole)
    assert base_dtype(run.model) == torch.bfloat16
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    frozen = [p for p in run.model.parameters() if not p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}  # fp32 master weights
    assert {p.dtype for p in frozen if p.is_floating_point()} == {torch.bfloat16}
    summary = _train(whole, run=run)
    losses = [h["loss"] for h in summary["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), losses  # the loss falls
    saved = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # saved adapters stay fp32
    state = torch.load(tmp_path / "whole" / "checkpoint" / "trainer_state.pt", weights_only=False)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim() > 0]
    assert moments and {t.dtype for t in moments} == {torch.float32}  # optimiser state fp32

    ids = torch.tensor([[3, 8, 1, 9, 4]], device=resolve_device(DEVICE))
    reloaded, _, _ = load_trained(tmp_path / "whole" / "adapter", device=DEVICE, precision="bf16")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, run.model.eval()(input_ids=ids).logits)

    # interrupted after the step-3 checkpoint, then resumed: the same final adapter as the whole run
    cut = _cfg(tiny_model_dir, task_files, tmp_path / "cut", method)
    real_save = train_mod.save_checkpoint

    def save_then_stop(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        _train(cut)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    _train(cut, resume=True)
    resumed = load_file(str(tmp_path / "cut" / "adapter" / "adapter_model.safetensors"))
    for key, tensor in saved.items():
        torch.testing.assert_close(resumed[key], tensor, atol=0, rtol=0)


def _lora_step(precision: str, task_files) -> tuple[float, torch.Tensor]:
    """Loss and adapter gradients of one LoRA step: same init (B non-zero), same batch, no dropout."""
    from mtlora.data.collate import TaskCollator
    from mtlora.data.jsonl import read_task_file
    from mtlora.objectives import supervised_lm_loss

    device = resolve_device(DEVICE)
    model, tok = tiny_model("llama")
    model.to(device, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    apply_precision(model)
    torch.manual_seed(0)
    inject_adapters(model, make_adapter_config("lora", r=4, dropout=0.0, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    examples = read_task_file(task_files[0])[:4] + read_task_file(task_files[1])[:4]
    batch = TaskCollator(tok, ["qa", "sentiment"], max_length=48)(examples)
    model.train()
    loss, _ = supervised_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
    assert loss.dtype == torch.float32
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).cpu()


def test_a_bf16_lora_step_matches_fp32(task_files):
    l32, g32 = _lora_step("fp32", task_files)
    l16, g16 = _lora_step("bf16", task_files)
    # stated tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 0.4 % per op)
    assert abs(l16 - l32) <= 1e-2 * abs(l32), (l16, l32)
    assert (g16 - g32).norm() <= 5e-2 * g32.norm(), float((g16 - g32).norm() / g32.norm())
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.998


def test_fp16_trains_with_a_loss_scaler(tiny_model_dir, task_files, tmp_path):
    cfg = _cfg(tiny_model_dir, task_files, tmp_path / "fp16", "lora", precision="fp16")
    summary = train(cfg, progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    state = torch.load(tmp_path / "fp16" / "checkpoint" / "trainer_state.pt", weights_only=False)
    assert state["scaler"]["scale"] > 0  # the scale is checkpointed with the optimiser


def test_meta_lora_refuses_fp16(tiny_model_dir, task_files, tmp_path):
    from mtlora.errors import UserError

    with pytest.raises(UserError, match="fp32 or bf16"):
        _train(_cfg(tiny_model_dir, task_files, tmp_path / "m", "meta_lora", precision="fp16"))


@pytest.mark.parametrize("method", [m for m in METHODS if m != "meta_lora"])  # MeTA-LoRA refuses checkpointing
def test_bf16_with_gradient_checkpointing(method, tiny_model_dir, task_files, tmp_path):
    cfg = _cfg(tiny_model_dir, task_files, tmp_path / "gc", method, **{"train.gradient_checkpointing": "true"})
    summary = train(cfg, progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert summary["steps"] == 6 and sum(losses[-2:]) < sum(losses[:2]), losses
    if method == "align_lora":  # the capture works under recomputation too
        assert "align_loss" in summary["history"][-1]


def test_router_softmax_stays_fp32_under_autocast():
    model, _ = tiny_model("llama")
    model.to(torch.bfloat16)
    inject_adapters(model, make_adapter_config("hydralora", r=4, num_heads=3, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = layer.router_weights(x)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.softmax(x.float() @ layer.router.weight.float().T, -1))


def test_missing_device_is_one_line_and_exit_2(tiny_model_dir, task_files, tmp_path, monkeypatch, capsys):
    import yaml
    from conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "tasks": [str(t) for t in task_files],
                                    "output_dir": str(tmp_path / "out")}))
    code, _, err = run_cli(monkeypatch, capsys, "train", str(path), "device=cuda")
    assert code == 2 and err.startswith("error: device: cuda requested but this machine has no CUDA")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    code, _, err = run_cli(monkeypatch, capsys, "train", str(path), "device=tpu")
    assert code == 2 and "expected auto, cpu, cuda, cuda:N or mps" in err
    code, _, err = run_cli(monkeypatch, capsys, "eval", str(task_files[0]), "--model", str(tiny_model_dir),
                           "--device", "cuda:1")
    assert code == 2 and "cuda:1 requested" in err


def test_device_auto_resolves_to_what_the_machine_has():
    got = resolve_device("auto")
    assert got.type == ("cuda" if torch.cuda.is_available() else got.type)
    assert resolve_device("cpu") == torch.device("cpu")


def test_cpu_kernels_never_run_on_another_dtype_or_device(monkeypatch):
    from mtlora.adapters import kernels

    calls = []
    real_fwd = kernels.lora_forward
    monkeypatch.setattr(kernels, "lora_forward", lambda *a, **k: calls.append("fwd") or real_fwd(*a, **k))

    def run(dtype, device):
        model, _ = tiny_model("llama")
        model.to(device=device, dtype=dtype)
        apply_precision(model)
        inject_adapters(model, make_adapter_config("lora", r=4, dropout=0.1, target_modules="all-linear"))
        model.train()
        ids = torch.tensor([[1, 2, 3, 4]], device=device)
        model(input_ids=ids).logits.float().sum().backward()

    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        run(dtype, "cpu")
    assert calls == []
    assert not kernels.usable(torch.empty(4, 4, device="meta"))  # another device: never (GPU: device check)
    if kernels.library() is not None:  # the probe sees the kernel where it belongs: fp32 on the CPU
        run(torch.float32, "cpu")
        assert calls


@pytest.mark.slow
def test_device_check_dry_run_exercises_every_step_on_the_cpu(tmp_path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    script = str(root / "benchmarks" / "device_check.py")
    proc = subprocess.run([sys.executable, script, "--dry-run", "--out", str(tmp_path)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    report = json.loads((tmp_path / "device_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["pytest_device", "train_step_bf16", "demo_train_bf16", "train_step_fp32",
                           "multihead_step", "meta_step", "eval_speed"]
    failed = {n: s.get("tail", s.get("reason"))[-800:] for n, s in steps.items() if s["rc"] != 0}
    assert proc.returncode == 0 and not failed, failed
    assert steps["train_step_bf16"]["result"]["precision"] == "bf16"
    assert steps["train_step_fp32"]["result"]["precision"] == "fp32"
    assert steps["pytest_device"]["env"] == {"MTLORA_TEST_DEVICE": "cpu"}
    assert (tmp_path / "demo_bf16" / "adapter" / "adapter_model.safetensors").is_file()
    assert report["dry_run"] is True and report["machine"]["torch"] == torch.__version__
    if not torch.cuda.is_available():  # the real check refuses a machine without a GPU, in one line
        proc = subprocess.run([sys.executable, script, "--out", str(tmp_path / "real")], cwd=root, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "no CUDA device" in proc.stderr
