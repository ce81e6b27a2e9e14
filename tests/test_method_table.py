"""Every method x the invariants it must keep (the shape of PEFT's ``PeftCommonTester``): a method
joins every row by being in the registry. Tiny random Llama, two user tasks, CPU.

Invariants: zero initial update; save/load round trip; merge/unmerge where exact (and a one-line
refusal where not); stock PEFT loads the adapter where the format allows; a few steps lower the
loss; the same seed gives the same adapter; an interrupted run resumes to the same adapter, bit
for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mtlora.adapters import inject_adapters, load_adapter, merge_adapters, save_adapter, unmerge_adapters
from mtlora.config import METHODS, load_config
from mtlora.errors import UserError
from mtlora.testing import tiny_model

MERGEABLE = {"lora", "mlora", "align_lora", "meta_lora"}  # the router of HydraLoRA / R-LoRA is input-dependent
PEFT_FORMAT = {"lora", "align_lora", "meta_lora"}


def _config(tmp_path: Path, method: str, model_dir: Path, tasks, out: str, **train):
    cfg = {
        "model": str(model_dir), "method": method, "tasks": [str(t) for t in tasks],
        "output_dir": str(tmp_path / out),
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "up_proj"],
                    **({"num_heads": 3} if method in ("hydralora", "rlora", "mlora") else {})},
        "data": {"max_length": 48, "max_eval_per_task": 0},
    }
    if method == "meta_lora":
        cfg["meta"] = {"k": 10, "support_size": 2, "query_size": 2, "tasks_per_iter": 2, "iterations": 6,
                       "inner_lr": 0.1, "outer_lr": 1e-2}
        cfg["train"] = {"save_every": 3, "seed": 1, **train}
    else:
        cfg["train"] = {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "save_every": 3, "seed": 1, **train}
        if method == "align_lora":
            cfg["data"] |= {"sampler": "task_balanced", "tasks_per_batch": 2}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _batch(tok):
    return tok(["Question: what is 3 + 1? Answer: 4", "the cat sat on the mat"], return_tensors="pt", padding=True)


def _randomise(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("method", METHODS)
def test_zero_initial_update(method, tmp_path, tiny_model_dir, task_files):
    config = _config(tmp_path, method, tiny_model_dir, task_files, "z")
    model, tok = tiny_model("llama")
    batch = _batch(tok)
    with torch.no_grad():
        before = model(**batch).logits
        torch.manual_seed(0)
        inject_adapters(model, config.adapter_config())
        model.eval()
        after = model(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_merge_and_peft(method, tmp_path, tiny_model_dir, task_files):
    config = _config(tmp_path, method, tiny_model_dir, task_files, "s")
    model, tok = tiny_model("llama")
    inject_adapters(model, config.adapter_config())
    _randomise(model)
    model.eval()
    batch = _batch(tok)
    with torch.no_grad():
        expected = model(**batch).logits
    save_adapter(model, tmp_path / "a")
    fresh, _ = tiny_model("llama")
    load_adapter(fresh, tmp_path / "a")
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, expected)
        if method in MERGEABLE:
            merge_adapters(fresh)
            torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
            unmerge_adapters(fresh)
            torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        else:
            with pytest.raises(UserError, match="cannot merge"):
                merge_adapters(fresh)
    if method in PEFT_FORMAT:
        peft = pytest.importorskip("peft")
        theirs = peft.PeftModel.from_pretrained(tiny_model("llama")[0], str(tmp_path / "a")).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def _adapter(summary) -> dict[str, torch.Tensor]:
    return load_file(Path(summary["adapter"]) / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_is_seeded_and_resumes_bit_for_bit(method, tmp_path, tiny_model_dir, task_files,
                                                                     monkeypatch):
    import mtlora.train
    from mtlora.train import train

    first = train(_config(tmp_path, method, tiny_model_dir, task_files, "a"), progress=False)
    losses = [h["loss"] for h in first["history"]]
    assert min(losses[-2:]) < losses[0], f"{method}: loss did not fall: {losses}"
    again = train(_config(tmp_path, method, tiny_model_dir, task_files, "b"), progress=False)
    a, b = _adapter(first), _adapter(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, different adapter"

    original = mtlora.train.save_checkpoint

    def save_then_crash(run, optimizer, scheduler, sampler, state, out, dist=None):
        original(run, optimizer, scheduler, sampler, state, out, dist)
        if state.step == 3:
            raise KeyboardInterrupt

    config = _config(tmp_path, method, tiny_model_dir, task_files, "c")
    monkeypatch.setattr(mtlora.train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(config, progress=False)
    monkeypatch.setattr(mtlora.train, "save_checkpoint", original)
    resumed = train(config, resume=True, progress=False)
    c = _adapter(resumed)
    assert all(torch.equal(a[k], c[k]) for k in a), f"{method}: the resumed run ended elsewhere"
