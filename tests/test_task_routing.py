"""Task-routed heads: the router modes' maths against a per-head loop, task ids that act, and the
errors when they are missing or out of range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtlora.adapters import forward_context, inject_adapters, make_adapter_config
from mtlora.adapters.multihead import MultiHeadLoraLinear
from mtlora.errors import UserError

MODES = ["token", "task", "task+token", "mean"]


def _layer(router: str, seed: int = 0) -> MultiHeadLoraLinear:
    torch.manual_seed(seed)
    cfg = make_adapter_config("rlora", r=3, alpha=6, dropout=0.0, num_heads=4, router=router, num_tasks=3,
                              target_modules=["x"])
    layer = MultiHeadLoraLinear(nn.Linear(10, 7), cfg, name="x")
    with torch.no_grad():  # move everything off its (uniform / offset-cancelling) start
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    return layer.eval()


def _reference(layer: MultiHeadLoraLinear, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """sum_i w_i B_i A x, one head at a time, the weights written out per mode."""
    out = layer.base_layer(x)
    logits = torch.zeros(*x.shape[:-1], layer.num_heads)
    if layer.router is not None:
        logits = logits + x @ layer.router.weight.T
    if layer.task_router is not None:
        logits = logits + layer.task_router[task_ids][:, None, :]
    w = torch.full_like(logits, 1 / layer.num_heads) if layer.router_mode == "mean" else torch.softmax(logits, -1)
    ax = x @ layer.lora_A.weight.T
    for i in range(layer.num_heads):
        out = out + layer.scaling * w[..., i:i + 1] * (ax @ layer.lora_B[i].T)
    if layer.offset_A is not None:
        out = out - layer.scaling * (x @ layer.offset_A.T) @ layer.offset_B.T
    return out


@pytest.mark.parametrize("router", MODES)
def test_each_router_mode_equals_the_per_head_loop(router):
    layer = _layer(router)
    x = torch.randn(3, 5, 10)
    ids = torch.tensor([2, 0, 1])
    with torch.no_grad(), forward_context(task_ids=ids):
        torch.testing.assert_close(layer(x), _reference(layer, x, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", MODES)
def test_the_task_id_changes_the_output_only_when_routing_by_task(router):
    layer = _layer(router)
    x = torch.randn(2, 4, 10)
    with torch.no_grad():
        with forward_context(task_ids=torch.tensor([0, 0])):
            a = layer(x)
        with forward_context(task_ids=torch.tensor([1, 0])):
            b = layer(x)
    assert torch.equal(a[1], b[1])  # row 1 kept its task
    assert (not torch.allclose(a[0], b[0])) == (router in ("task", "task+token"))


def test_missing_or_out_of_range_task_ids_are_one_line_errors():
    layer = _layer("task")
    x = torch.randn(2, 4, 10)
    with pytest.raises(UserError, match="needs the batch's task ids"):
        layer(x)
    with forward_context(task_ids=torch.tensor([0, 3])), pytest.raises(UserError, match="out of range"):
        layer(x)
    with pytest.raises(UserError, match="num_tasks"):
        MultiHeadLoraLinear(nn.Linear(10, 7), make_adapter_config("rlora", r=2, router="task",
                                                                   target_modules=["x"]), name="x")
    with pytest.raises(UserError, match="mlora has no router"):
        make_adapter_config("mlora", r=2, router="task")


def test_a_task_routed_rlora_trains_saves_and_reloads(tmp_path, tiny_model_dir, task_files):
    from mtlora.config import load_config
    from mtlora.train import load_trained, train

    cfg = load_config(None, [f"model={tiny_model_dir}", "method=rlora", f"tasks=[{task_files[0]},{task_files[1]}]",
                             f"output_dir={tmp_path / 'run'}", "adapter.r=2", "adapter.num_heads=3",
                             "adapter.router=task", "adapter.target_modules=[q_proj,v_proj]", "adapter.dropout=0.0",
                             "train.max_steps=8", "train.lr=0.05", "train.batch_size=4", "data.max_length=48",
                             "data.max_eval_per_task=2"])
    summary = train(cfg, progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    model, tok, extra = load_trained(summary["adapter"])
    assert extra["task_names"] == ["qa", "sentiment"] and model.mtlora_config.num_tasks == 2
    routers = [m.task_router for m in model.modules() if isinstance(m, MultiHeadLoraLinear)]
    assert routers and all(r.abs().sum() > 0 for r in routers)  # the per-task logits trained
    batch = tok(["Question: what is 3 + 1? Answer: 4"] * 2, return_tensors="pt")
    with torch.no_grad():
        with forward_context(task_ids=torch.tensor([0, 1])):
            out = model(**batch).logits
    assert not torch.allclose(out[0], out[1])  # same text, two tasks, two outputs


# --------------------------------------------------------------------------- per-task export, mixed batches
def _routed_model(router: str):
    from mtlora.testing import tiny_model

    model, tok = tiny_model("llama")
    torch.manual_seed(1)
    if router == "mlora":  # M-LoRA: fixed mean weights, no router
        cfg = make_adapter_config("mlora", r=2, alpha=4, num_heads=3, target_modules=["q_proj", "v_proj", "up_proj"])
    else:
        cfg = make_adapter_config("rlora", r=2, alpha=4, num_heads=3, router=router, num_tasks=2,
                                  target_modules=["q_proj", "v_proj", "up_proj"])
    inject_adapters(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval(), tok


@pytest.mark.parametrize("router", ["task", "mean", "mlora"])
def test_per_task_export_is_exact_in_stock_peft_and_serves_a_mixed_batch(router, tmp_path, monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    from conftest import run_cli

    from mtlora.adapters import save_adapter
    from mtlora.testing import tiny_model

    model, tok = _routed_model(router)
    save_adapter(model, tmp_path / "a", extra={"task_names": ["qa", "sentiment"], "method": "rlora"})
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "a"), str(tmp_path / "out"), "--per-task")
    assert code == 0, err
    batch = tok(["Question: what is 3 + 1? Answer: 4", "the cat sat on the mat"], return_tensors="pt", padding=True)
    ours = {}
    with torch.no_grad():
        for t, task in enumerate(["qa", "sentiment"]):
            with forward_context(task_ids=torch.full((2,), t)):
                ours[task] = model(**batch).logits
        with forward_context(task_ids=torch.tensor([0, 1])):  # a mixed batch: row 0 qa, row 1 sentiment
            mixed = model(**batch).logits
    torch.testing.assert_close(mixed[0], ours["qa"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], ours["sentiment"][1], atol=1e-5, rtol=1e-5)
    base, _ = tiny_model("llama")
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "out" / "qa"), adapter_name="qa")
    theirs.load_adapter(str(tmp_path / "out" / "sentiment"), adapter_name="sentiment")
    theirs.eval()
    with torch.no_grad():
        for task in ("qa", "sentiment"):
            theirs.set_adapter(task)
            torch.testing.assert_close(theirs(**batch).logits, ours[task], atol=1e-5, rtol=1e-5)
        served = theirs(**batch, adapter_names=["qa", "sentiment"]).logits
    torch.testing.assert_close(served, mixed, atol=1e-5, rtol=1e-5)


def test_per_task_export_refuses_a_token_router(tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    from mtlora.adapters import save_adapter

    model, _ = _routed_model("token")
    save_adapter(model, tmp_path / "a", extra={"task_names": ["qa", "sentiment"]})
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "a"), str(tmp_path / "out"), "--per-task")
    assert code == 2 and "approximation" in err and not (tmp_path / "out").exists()


def test_a_token_router_exports_an_approximation_and_measures_it(tmp_path, tiny_model_dir, task_files,
                                                                  monkeypatch, capsys):
    peft = pytest.importorskip("peft")
    import json

    from conftest import run_cli

    from mtlora.config import load_config
    from mtlora.testing import tiny_model
    from mtlora.train import train

    cfg = load_config(None, [f"model={tiny_model_dir}", "method=rlora", f"tasks=[{task_files[0]},{task_files[1]}]",
                             f"output_dir={tmp_path / 'run'}", "adapter.r=2", "adapter.num_heads=3",
                             "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=3", "train.batch_size=4",
                             "data.max_length=48", "data.max_eval_per_task=4"])
    summary = train(cfg, progress=False)
    out = tmp_path / "tasks"
    code, stdout, err = run_cli(monkeypatch, capsys, "export", summary["adapter"], str(out), "--per-task")
    assert code == 2 and "--approximate" in err
    code, stdout, err = run_cli(monkeypatch, capsys, "export", summary["adapter"], str(out), "--per-task",
                                "--approximate", "--max-per-task", "4")
    assert code == 0, err
    marker = json.loads((out / "mtlora_export.json").read_text())
    assert marker["exact"] is False and set(marker["measured"]) == {"qa", "sentiment"}
    for task, row in marker["measured"].items():
        assert f"{task}: acc original" in stdout and 0 <= row["exported"] <= 1 and row["n"] > 0
        assert "Approximation of a token router" in (out / task / "README.md").read_text()
        peft.PeftModel.from_pretrained(tiny_model("llama")[0], str(out / task))  # stock PEFT loads it


def test_eval_of_an_exported_task_adapter_equals_eval_of_the_original(tmp_path, tiny_model_dir, task_files,
                                                                       monkeypatch, capsys):
    import json

    from conftest import run_cli

    from mtlora.config import load_config
    from mtlora.train import train

    cfg = load_config(None, [f"model={tiny_model_dir}", "method=rlora", f"tasks=[{task_files[0]},{task_files[1]}]",
                             f"output_dir={tmp_path / 'run'}", "adapter.r=2", "adapter.num_heads=3",
                             "adapter.router=task", "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=4",
                             "train.lr=0.05", "train.batch_size=4", "data.max_length=48", "data.max_eval_per_task=4"])
    adapter = train(cfg, progress=False)["adapter"]
    assert run_cli(monkeypatch, capsys, "export", adapter, str(tmp_path / "tasks"), "--per-task")[0] == 0
    for task, path in (("qa", task_files[1]), ("sentiment", task_files[0])):
        results = []
        for which in (adapter, str(tmp_path / "tasks" / task)):
            out = tmp_path / f"{task}-{Path(which).name}.json"
            code, _, err = run_cli(monkeypatch, capsys, "eval", str(path), "--adapter", which, "--model",
                                   str(tiny_model_dir), "--no-progress", "--output", str(out))
            assert code == 0, err
            results.append([p["logliks"] for p in json.loads(out.read_text())["predictions"]])
        torch.testing.assert_close(torch.tensor(results[0]), torch.tensor(results[1]), atol=1e-5, rtol=1e-5)
