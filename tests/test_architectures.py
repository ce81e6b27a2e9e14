"""Every method on every tested family: inject, train a step, save, reload, PEFT load, merge.

The models are tiny, randomly initialised stock transformers architectures built from configs
here (no downloads): Llama, Qwen2, Mistral, Gemma, Phi-3 (fused ``qkv_proj``/``gate_up_proj``),
GPT-2 (``Conv1D`` layers) and GPT-NeoX (fused ``query_key_value``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import mtlora.evaluate as ev
from mtlora.adapters import inject_adapters, make_adapter_config, merge_adapters, save_adapter, unload
from mtlora.adapters.inject import adapter_layers, find_target_modules
from mtlora.config import load_config
from mtlora.data.example import Example
from mtlora.models import MODULE_NAMES, TESTED_FAMILIES, map_target_modules
from mtlora.testing import tiny_tokenizer
from mtlora.train import load_trained, prepare_run, train

METHODS = ("lora", "hydralora", "rlora", "mlora", "align_lora", "meta_lora")
DEVICE = os.environ.get("MTLORA_TEST_DEVICE", "cpu")  # the training runs' device (the device check: cuda)
TOL = 1e-5 if DEVICE == "cpu" else 1e-3  # another device's kernels round differently from the CPU's
_IDS = dict(eos_token_id=0, pad_token_id=0, bos_token_id=0)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, **_IDS)


def family_config(family: str, vocab_size: int):
    """A toy-sized stock config of ``family`` (a ``model_type``)."""
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab_size, num_key_value_heads=2, **_DECODER)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=vocab_size, num_key_value_heads=2, **_DECODER)
    if family == "mistral":
        return transformers.MistralConfig(vocab_size=vocab_size, num_key_value_heads=2, **_DECODER)
    if family == "gemma":
        return transformers.GemmaConfig(vocab_size=vocab_size, num_key_value_heads=2, head_dim=8, **_DECODER)
    if family == "phi3":
        return transformers.Phi3Config(vocab_size=vocab_size, num_key_value_heads=2, **_DECODER)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, **_IDS)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab_size, **_DECODER)
    raise ValueError(family)


def family_model(family: str, seed: int = 0):
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, len(tok)))
    return model.eval(), tok


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in TESTED_FAMILIES:
        model, tok = family_model(family)
        model.save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: toy models want one thread


def test_every_tested_family_has_a_module_table_and_a_config():
    assert set(TESTED_FAMILIES) == {"llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox"}
    for family in TESTED_FAMILIES:
        model, _ = family_model(family)
        assert model.config.model_type == family
        names = {n for n, _ in model.named_modules()}
        for role, mapped in MODULE_NAMES[family].items():
            for name in mapped:  # every mapped name exists in the family's stock modules
                assert any(n.endswith("." + name) for n in names), (family, role, name)


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_role_names_and_all_linear_select_the_family_modules(family):
    model, _ = family_model(family)
    attn = find_target_modules(model, ["q_proj", "v_proj"])  # LoRA's choice (arXiv:2106.09685 section 7.1)
    everything = find_target_modules(model, "all-linear")
    roles = find_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert attn and set(attn) < set(everything)
    assert sorted(roles) == sorted(everything)  # the seven roles are every linear layer but the head
    assert not any(n.endswith("lm_head") for n in everything)
    fused = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi3": "qkv_proj"}.get(family)
    if fused:
        assert all(n.endswith(fused) for n in attn)
    else:
        assert {n.rsplit(".", 1)[-1] for n in attn} == {"q_proj", "v_proj"}


def test_unknown_family_keeps_names_and_gpt2_has_no_gate():
    assert map_target_modules("some_new_family", ["q_proj", "wq"]) == ["q_proj", "wq"]
    assert map_target_modules("gpt2", ["gate_proj"]) == []
    model, _ = family_model("gpt2")
    with pytest.raises(Exception, match="matches no nn.Linear"):
        find_target_modules(model, ["gate_proj"])


def test_a_module_type_lora_cannot_adapt_is_named():
    model, _ = family_model("llama")
    with pytest.raises(Exception, match="LlamaRMSNorm"):
        find_target_modules(model, ["input_layernorm"])


def _run_config(tmp_path: Path, model_dir: Path, tasks: list[Path], method: str):
    adapter = {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": "all-linear"}
    if method in ("hydralora", "rlora", "mlora"):
        adapter["num_heads"] = 2
    overrides = [
        f"model={model_dir}", f"method={method}", f"tasks=[{tasks[0]},{tasks[1]}]",
        f"output_dir={tmp_path / 'out'}", f"adapter={adapter}",
        f"device={DEVICE}", "data.max_length=48", "data.max_eval_per_task=3", "eval.batch_size=4",
    ]
    if method == "meta_lora":  # the keys MeTA-LoRA reads instead of train.{batch_size, max_steps, lr}
        overrides += ["meta.k=8", "meta.support_size=2", "meta.query_size=2", "meta.tasks_per_iter=2",
                      "meta.iterations=2", "meta.outer_lr=5e-2"]
    else:
        overrides += ["train.batch_size=4", "train.max_steps=2", "train.lr=5e-2"]
    return load_config(None, overrides)


def _logits(model, ids):
    """Logits on the CPU, from a model on any device."""
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_every_method_trains_saves_reloads_on_every_family(family, method, family_dirs, task_files, tmp_path):
    cfg = _run_config(tmp_path, family_dirs[family], task_files, method)
    run = prepare_run(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    if method == "meta_lora":
        from mtlora.meta import train_meta

        summary = train_meta(cfg, overwrite=True, progress=False, run=run)
    else:
        summary = train(cfg, overwrite=True, progress=False, run=run)
    assert summary["steps"] == 2 and summary["evals"], summary  # trained, then evaluated at the end
    moved = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no adapter parameter changed in training"

    adapter_dir = Path(summary["adapter"])
    trained = run.model.eval()
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    reloaded, _, extra = load_trained(adapter_dir, device=DEVICE)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trained, ids), atol=TOL, rtol=TOL)
    assert extra["method"] == method

    base, _ = family_model(family)
    base_logits = _logits(base, ids)
    if cfg.adapter_type == "lora":  # plain-LoRA format: stock PEFT runs it
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(family_model(family)[0], str(adapter_dir)).eval()
        torch.testing.assert_close(_logits(peft_model, ids), _logits(trained, ids), atol=TOL, rtol=TOL)
    mergeable = all(layer.can_merge() is None for _, layer in adapter_layers(reloaded))
    assert mergeable == (cfg.adapter_type in ("lora", "mlora"))
    if mergeable:
        merged = unload(reloaded, merge=True)
        assert not list(adapter_layers(merged))
        assert type(merged.get_submodule(_first_target(base))) is type(base.get_submodule(_first_target(base)))
        torch.testing.assert_close(_logits(merged, ids), _logits(trained, ids), atol=10 * TOL, rtol=10 * TOL)
    assert not torch.allclose(_logits(trained, ids), base_logits, atol=1e-6)  # the adapter did something


def _first_target(model) -> str:
    return find_target_modules(model, "all-linear")[0]


def test_gpt2_conv1d_adapter_is_peft_fan_in_fan_out(tmp_path):
    import json

    model, _ = family_model("gpt2")
    inject_adapters(model, make_adapter_config("lora", r=4, target_modules=["c_attn"]))
    layer = dict(adapter_layers(model))["transformer.h.0.attn.c_attn"]
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (96, 4)  # PEFT's shapes
    saved = save_adapter(model, tmp_path / "a")
    assert json.loads((saved / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_gpt2_merged_export_saves_conv1d_layout(tmp_path):
    model, _ = family_model("gpt2")
    inject_adapters(model, make_adapter_config("lora", r=4, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lora_B.weight.normal_(std=0.1)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    want = _logits(model, ids)
    merge_adapters(model)
    merged = unload(model)
    merged.save_pretrained(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(again.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------- evaluation packing per family

MC = [
    Example("fox", "The quick brown fox", "jumps", ("jumps", "sat on the mat", "z"), 0),
    Example("qa", "Question: Which gas do plants absorb? Answer:", "carbon dioxide", ("carbon dioxide", "no"), 0),
]


@pytest.mark.parametrize("family", TESTED_FAMILIES)
def test_shared_scoring_matches_per_choice_or_falls_back(family):
    model, tok = family_model(family)
    reference = ev.score_choices(model, tok, MC, method="per_choice")
    got = ev.score_choices(model, tok, MC, method="shared", batch_size=2)
    for row_a, row_b in zip(got, reference, strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-4)
    kv = ev.score_choices(model, tok, MC, method="kv_cache", batch_size=2)
    for row_a, row_b in zip(kv, reference, strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-4)


def test_a_family_that_ignores_the_block_mask_is_detected(monkeypatch):
    model, tok = family_model("llama")
    assert ev.packing_supported(model)
    ev._PACKING.clear()
    real = model.forward

    def ignores_4d_masks(*args, attention_mask=None, position_ids=None, **kw):
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask, position_ids = None, None  # as a family that builds its own causal mask
        return real(*args, attention_mask=attention_mask, position_ids=position_ids, **kw)

    monkeypatch.setattr(model, "forward", ignores_4d_masks)
    assert not ev.packing_supported(model)
    reference = ev.score_choices(model, tok, MC, method="per_choice")
    got = ev.score_choices(model, tok, MC, method="shared")  # falls back, so still exact
    for row_a, row_b in zip(got, reference, strict=True):
        assert row_a == pytest.approx(row_b, abs=1e-4)


def test_a_family_that_crashes_on_4d_masks_falls_back(monkeypatch):
    model, tok = family_model("qwen2")
    real = model.forward

    def refuses(*args, attention_mask=None, **kw):
        if attention_mask is not None and attention_mask.dim() == 4:
            raise ValueError("this family takes a 2-D mask only")
        return real(*args, attention_mask=attention_mask, **kw)

    monkeypatch.setattr(model, "forward", refuses)
    assert not ev.packing_supported(model)
    ev.score_choices(model, tok, MC, method="shared")  # no crash


def test_models_command_prints_the_family_table(monkeypatch, capsys, family_dirs):
    from conftest import run_cli

    code, out, _ = run_cli(monkeypatch, capsys, "models", str(family_dirs["gpt_neox"]))
    assert code == 0
    for family in TESTED_FAMILIES:
        assert family in out
    assert "query_key_value" in out and "dense_4h_to_h" in out
