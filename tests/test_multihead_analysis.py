"""Analyses of multi-head adapters: head cosine similarity (weights only) and per-task router weights."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from mtlora.adapters import adapter_layers, inject_adapters, make_adapter_config, save_adapter
from mtlora.analysis import analyze_adapter, head_cosine, head_similarity, main
from mtlora.data.example import Example
from mtlora.errors import UserError
from mtlora.testing import save_tiny_model, tiny_model

EXAMPLES = [
    Example(task="qa", prompt="Question: Which gas do plants absorb?", answer="carbon dioxide"),
    Example(task="qa", prompt="Question: Is the sky blue?", answer="yes"),
    Example(
        task="nli", prompt="Premise: The man turned on the faucet. Hypothesis: Water flowed.", answer="true"
    ),
]


def test_head_cosine_known_values():
    b = torch.zeros(3, 2, 2)
    b[0, 0, 0], b[1, 0, 0], b[2, 1, 1] = 1.0, -2.0, 5.0
    expected = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(head_cosine(b), expected)


@pytest.mark.parametrize("zero_init, expected", [("center", -1 / 3), ("offset", 0.0)])
def test_random_heads_start_similarity(zero_init, expected):
    """N mean-centred random heads have cosine -1/(N-1) in expectation, heads as drawn 0 (analysis.py)."""
    model, _ = tiny_model("llama")
    cfg = make_adapter_config("rlora", num_heads=4, target_modules="all-linear", r=8, zero_init=zero_init)
    inject_adapters(model, cfg)
    sims = torch.stack(list(head_similarity(model).values()))
    off = ~torch.eye(4, dtype=torch.bool)
    assert abs(sims[:, off].mean().item() - expected) < 0.05


@pytest.mark.parametrize("method, with_data", [("rlora", True), ("hydralora", True), ("mlora", False)])
def test_analyze_adapter_writes_tables_and_heatmaps(method, with_data, tmp_path):
    base = save_tiny_model(tmp_path / "base", "qwen2")
    model, _ = tiny_model("qwen2")
    model.config._name_or_path = str(base)
    inject_adapters(
        model, make_adapter_config(method, num_heads=3, r=4, target_modules=["up_proj", "v_proj"])
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            nn.init.normal_(layer.lora_B)
            if layer.router is not None:
                nn.init.normal_(layer.router.weight)
    save_adapter(model, tmp_path / "adapter")
    summary = analyze_adapter(
        tmp_path / "adapter", tmp_path / "out", examples=EXAMPLES if with_data else None
    )
    assert summary["layers"] == 2 * model.config.num_hidden_layers and summary["num_heads"] == 3
    rows = list(csv.DictReader(open(tmp_path / "out" / "head_similarity.csv")))
    assert len(rows) == summary["layers"] * 3  # 3 pairs per layer
    name = rows[0]["layer"]
    layer = dict(adapter_layers(model))[name]
    assert abs(float(rows[0]["cosine"]) - head_cosine(layer.lora_B)[0, 1].item()) < 1e-5
    assert (tmp_path / "out" / "head_similarity.png").stat().st_size > 1000
    if with_data:
        router = summary["router_weights"]
        assert set(router) == {"qa", "nli"}
        assert all(abs(sum(v) - 1) < 1e-3 for v in router.values())
        assert router["qa"] != router["nli"]
        assert (tmp_path / "out" / "router_weights.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["method"] == method


def test_analyze_errors_are_user_errors(tmp_path, capsys):
    model, _ = tiny_model("llama")
    inject_adapters(model, make_adapter_config("lora", target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "lora")
    with pytest.raises(UserError, match="expected a multi-head adapter"):
        analyze_adapter(tmp_path / "lora", tmp_path / "out")
    assert main([str(tmp_path / "lora")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    model, _ = tiny_model("llama")
    inject_adapters(model, make_adapter_config("mlora", target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "mlora")
    with pytest.raises(UserError, match="no learned router"):
        analyze_adapter(tmp_path / "mlora", tmp_path / "out", examples=EXAMPLES)


def test_analyze_takes_a_device_and_refuses_a_missing_one(tmp_path, monkeypatch, capsys):
    import torch
    from conftest import run_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown here")
    model, _ = tiny_model("llama")
    inject_adapters(model, make_adapter_config("rlora", r=2, num_heads=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "rlora")
    code, _, err = run_cli(monkeypatch, capsys, "analyze", str(tmp_path / "rlora"), "--device", "cuda")
    assert code == 2 and "no CUDA" in err and not (tmp_path / "rlora" / "analysis").exists()
    code, _, err = run_cli(monkeypatch, capsys, "analyze", str(tmp_path / "rlora"), "--device", "cpu")
    assert code == 0, err
