"""The method registry: docs/adding_a_method.md's worked example, run as written."""

from __future__ import annotations

import pytest
import yaml

from mtlora import methods
from mtlora.config import load_config
from mtlora.errors import UserError
from mtlora.objectives import supervised_lm_loss


def make_l2_objective(config, *, num_tasks=None, reduce_fn=None):
    def objective(model, batch):
        loss, logs = supervised_lm_loss(model, batch)
        l2 = sum((p ** 2).sum() for n, p in model.named_parameters() if "lora_B" in n)
        return loss + 1e-3 * l2, {**logs, "l2": l2.detach()}
    return objective


def test_a_new_method_is_one_registry_entry(monkeypatch, tmp_path, tiny_model_dir, task_files):
    from mtlora.train import train

    monkeypatch.setitem(methods._REGISTRY, "lora_l2", methods.Method(
        "lora_l2", adapter_type="lora", objective="test_methods:make_l2_objective",
        help="LoRA + an L2 pull of B towards zero"))
    cfg = tmp_path / "l2.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir), "method": "lora_l2", "tasks": [str(t) for t in task_files],
        "output_dir": str(tmp_path / "out"), "adapter": {"r": 2, "target_modules": ["q_proj"]},
        "data": {"max_length": 48, "max_eval_per_task": 2}, "train": {"batch_size": 4, "max_steps": 2},
    }))
    summary = train(load_config(cfg), progress=False)
    assert all("l2" in h for h in summary["history"]) and summary["method"] == "lora_l2"
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_unknown_methods_and_foreign_sections_are_refused():
    with pytest.raises(UserError, match="unknown method 'nope'"):
        load_config(None, ["method=nope"])
    assert set(methods.method_names()) >= {"lora", "hydralora", "rlora", "mlora", "align_lora", "meta_lora"}
    assert methods.get_method("meta_lora").section == "meta" and methods.get_method("align_lora").section == "align"
