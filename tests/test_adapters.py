"""Plain LoRA injection, PEFT interoperability, save/load, merge — on every tiny architecture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from mtlora.adapters import (
    adapter_layers,
    count_parameters,
    find_target_modules,
    forward_context,
    inject_adapters,
    load_adapter,
    make_adapter_config,
    merge_adapters,
    save_adapter,
    set_adapters_enabled,
    trainable_parameters,
    unload,
    unmerge_adapters,
)
from mtlora.errors import UserError
from mtlora.testing import TINY_ARCHS, tiny_model

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)


def _ids(tok):
    return tok(["the cat sat on the mat", "Question: Is the sky blue? Answer: yes"], return_tensors="pt", padding=True)


def _randomise_b(model, std=0.2):
    torch.manual_seed(1)
    for name, p in trainable_parameters(model):
        if "lora_B" in name:
            nn.init.normal_(p, std=std)


def _lora(model, **kw):
    kw.setdefault("target_modules", "all-linear")
    kw.setdefault("r", 4)
    return inject_adapters(model, make_adapter_config("lora", alpha=8, **kw))


@ARCHS
def test_initial_update_is_exactly_zero(arch):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    base = model(**batch).logits
    _lora(model)
    assert torch.equal(model(**batch).logits, base)


@ARCHS
@pytest.mark.parametrize(
    "targets, expected",
    [
        (["q_proj", "v_proj"], {"q_proj", "v_proj"}),
        (r".*mlp\.(gate|up)_proj", {"gate_proj", "up_proj"}),
        ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_target_selection(arch, targets, expected):
    model, _ = tiny_model(arch)
    names = find_target_modules(model, targets)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected
    assert len(names) == len(expected) * model.config.num_hidden_layers
    assert "lm_head" not in names


def test_target_without_match_is_a_user_error():
    model, _ = tiny_model("llama")
    with pytest.raises(UserError, match="matches no nn.Linear"):
        find_target_modules(model, ["qkv_proj"])


def test_bad_config_values_are_user_errors():
    with pytest.raises(UserError, match="adapter.r"):
        make_adapter_config("lora", r=0)
    with pytest.raises(UserError, match="adapter.dropout"):
        make_adapter_config("lora", dropout=1.5)
    with pytest.raises(UserError, match="unknown option"):
        make_adapter_config("lora", rank=4)
    with pytest.raises(UserError, match="unknown adapter type"):
        make_adapter_config("dora")


@ARCHS
def test_only_adapter_parameters_train(arch):
    model, _ = tiny_model(arch)
    _lora(model, target_modules=["q_proj", "up_proj"])
    names = [n for n, _ in trainable_parameters(model)]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    trainable, total = count_parameters(model)
    layers = model.config.num_hidden_layers
    h, i = model.config.hidden_size, model.config.intermediate_size
    assert trainable == layers * 4 * ((h + h) + (h + i))


def test_rslora_scaling():
    assert make_adapter_config("lora", r=16, alpha=32).scaling == 2.0
    assert make_adapter_config("lora", r=16, alpha=32, use_rslora=True).scaling == 8.0


@ARCHS
def test_adapter_changes_output_and_can_be_disabled(arch):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    base = model(**batch).logits
    _lora(model)
    _randomise_b(model)
    tuned = model(**batch).logits
    assert not torch.allclose(tuned, base, atol=1e-4)
    set_adapters_enabled(model, False)
    assert torch.equal(model(**batch).logits, base)


@ARCHS
def test_injection_keeps_eval_mode(arch):
    model, _ = tiny_model(arch)
    _lora(model, dropout=0.5)
    assert all(not layer.training for _, layer in adapter_layers(model))


@ARCHS
def test_save_load_round_trip_is_exact(arch, tmp_path):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _lora(model, use_rslora=True)
    _randomise_b(model)
    save_adapter(model, tmp_path / "adapter", extra={"task_names": ["a", "b"]})
    fresh, _ = tiny_model(arch)
    _, extra = load_adapter(fresh, tmp_path / "adapter")
    assert extra == {"task_names": ["a", "b"]}
    assert torch.equal(fresh(**batch).logits, model(**batch).logits)
    assert fresh.mtlora_config == model.mtlora_config


@ARCHS
def test_peft_loads_our_adapter_with_same_logits(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _lora(model, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True)
    _randomise_b(model)
    ours = model(**batch).logits
    save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    fresh, _ = tiny_model(arch)
    peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    peft_model.eval()
    torch.testing.assert_close(peft_model(**batch).logits, ours, atol=1e-5, rtol=1e-5)


@ARCHS
def test_we_load_an_adapter_written_by_peft(arch, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["k_proj", "up_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, cfg)
    peft_model.eval()
    expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "peft")
    fresh, _ = tiny_model(arch)
    load_adapter(fresh, tmp_path / "peft")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)


@ARCHS
def test_merge_unmerge_and_unload(arch):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    _lora(model)
    _randomise_b(model)
    tuned = model(**batch).logits
    merge_adapters(model)
    torch.testing.assert_close(model(**batch).logits, tuned, atol=1e-5, rtol=1e-5)
    unmerge_adapters(model)
    torch.testing.assert_close(model(**batch).logits, tuned, atol=1e-5, rtol=1e-5)
    unload(model, merge=True)
    assert not list(adapter_layers(model))
    assert set(model.state_dict()) == set(original)
    torch.testing.assert_close(model(**batch).logits, tuned, atol=1e-5, rtol=1e-5)


@ARCHS
def test_stacked_per_example_adapters_match_one_adapter_at_a_time(arch):
    """Row b with adapter idx[b] gives the same logits as a model holding only that adapter."""
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _lora(model, target_modules=["q_proj", "up_proj"])
    layers = dict(adapter_layers(model))
    torch.manual_seed(3)
    stacked = {
        name: (torch.randn(3, layer.r, layer.in_features) * 0.2, torch.randn(3, layer.out_features, layer.r) * 0.2)
        for name, layer in layers.items()
    }
    idx = torch.tensor([2, 0])
    with forward_context(stacked=stacked, adapter_index=idx):
        mixed = model(**batch).logits
    for row, k in enumerate(idx.tolist()):
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A.weight.copy_(stacked[name][0][k])
                layer.lora_B.weight.copy_(stacked[name][1][k])
        single = model(**batch).logits
        torch.testing.assert_close(mixed[row], single[row], atol=1e-5, rtol=1e-5)


def test_input_dropout_rate_scaling_and_eval_identity():
    from mtlora.adapters.dropout import InputDropout

    torch.manual_seed(0)
    drop = InputDropout(0.2)
    x = torch.ones(400, 500)
    y = drop.train()(x)
    assert abs((y == 0).float().mean().item() - 0.2) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.8))
    assert abs(y.mean().item() - 1.0) < 0.02
    assert drop.eval()(x) is x


@pytest.mark.parametrize("lead", [(6,), (2, 3)])
def test_add_low_rank_matches_autograd_of_the_plain_formula(lead):
    from mtlora.adapters.backends import add_low_rank

    torch.manual_seed(0)
    base = torch.randn(*lead, 5, dtype=torch.float64, requires_grad=True)
    z = torch.randn(*lead, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    # base * 1: a fresh non-leaf output, like the frozen layer's (add_low_rank writes into it)
    fn = lambda bs, zz, bb: add_low_rank(bs * 1, zz, bb, 0.7)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (base, z, b))
    assert torch.autograd.gradgradcheck(fn, (base, z, b))  # MeTA-LoRA's second-order path needs it
    y = add_low_rank(base * 1, z, b, 0.7)
    torch.testing.assert_close(y, base + 0.7 * torch.nn.functional.linear(z, b))
    leaf = add_low_rank(base, z, b, 0.7)  # a leaf that wants a gradient is not written into
    torch.testing.assert_close(leaf, y)
    # frozen base output (no grad needed): only z and b get gradients
    y = add_low_rank(base.detach().clone(), z, b, 0.7)
    y.sum().backward()
    assert z.grad is not None and b.grad is not None and b.grad.is_contiguous()


def test_dropout_keep_mask_is_seeded_and_has_the_realised_rate():
    from mtlora.adapters.dropout import dropout_keep_mask

    x = torch.zeros(300, 501)  # an odd element count: the last 64-bit draw is partly used
    torch.manual_seed(3)
    keep, rescale = dropout_keep_mask(x, 0.05)
    torch.manual_seed(3)
    again, _ = dropout_keep_mask(x, 0.05)
    other, _ = dropout_keep_mask(x, 0.05)
    assert keep.dtype == torch.bool and keep.shape == x.shape
    assert torch.equal(keep, again) and not torch.equal(keep, other)
    assert abs((~keep).float().mean().item() - 0.05) < 0.003
    assert rescale == pytest.approx(1 / (1 - 3277 / 65536))


def test_masked_down_projection_matches_autograd_of_the_plain_formula():
    from mtlora.adapters.backends import project_kept

    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, dtype=torch.float64, requires_grad=True)
    keep = (torch.rand(2, 4, 6) > 0.3).to(torch.uint8)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    fn = lambda xx, aa: project_kept(xx, keep, aa)  # noqa: E731
    torch.testing.assert_close(fn(x, a), torch.nn.functional.linear(x * keep, a))
    assert torch.autograd.gradcheck(fn, (x, a))
    assert torch.autograd.gradgradcheck(fn, (x, a))


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("read", ["out", "both", "phi"])
def test_fused_lora_linear_matches_autograd_of_the_plain_formula(dropout, bias, read):
    """The one-node layer (grad_x = g (W0 + s B A) without dropout) against the textbook formula,
    to second order (MeTA-LoRA), with and without a loss on phi (Align-LoRA), and with phi alone."""
    from mtlora.adapters.backends import _FusedLoraLinear

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w0 = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    bs = (torch.randn(5, dtype=torch.float64, requires_grad=True),) if bias else ()
    keep = (torch.rand(2, 3, 6) > 0.3).to(torch.uint8) if dropout else None
    rescale = 1.4 if dropout else 1.0

    def fused(xx, ww, aa, bb, *bias_):
        out, phi = _FusedLoraLinear.apply(xx, keep, ww, bias_[0] if bias_ else None, aa, bb, 0.7, rescale)
        return {"out": out, "both": (out, phi), "phi": phi}[read]

    args = (x, w0, a, b, *bs)
    kept = x if keep is None else x * keep
    phi = torch.nn.functional.linear(kept, a) * rescale
    plain = torch.nn.functional.linear(x, w0, bs[0] if bias else None) + 0.7 * torch.nn.functional.linear(phi, b)
    out = fused(*args)
    expected = {"out": plain, "both": (plain, phi), "phi": phi}[read]
    torch.testing.assert_close(out, expected)
    assert torch.autograd.gradcheck(fused, args)
    assert torch.autograd.gradgradcheck(fused, args)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_fused_backward_forms_no_extra_input_wide_product(dropout, use_kernels, monkeypatch):
    """The backward issues one tokens x d_in product, never a second one for the adapter's share.
    With the C kernels the kernel writes the masked share (no mask: nothing hashed) and the frozen
    layer's GEMM adds into it. On torch ops, without dropout (and phi unread) the input gradient is
    one GEMM against W0 + s B A; the test fails there if an unread phi's gradient arrives as zeros
    instead of None (that silently costs the slow path). On torch ops with dropout: two products."""
    monkeypatch.setenv("MTLORA_KERNELS", "1" if use_kernels else "0")
    from torch.utils._python_dispatch import TorchDispatchMode

    from mtlora.adapters import kernels
    from mtlora.adapters.lora import LoraConfig, LoraLinear

    layer = LoraLinear(torch.nn.Linear(12, 20, bias=False), LoraConfig(r=4, dropout=dropout)).train()
    layer.base_layer.weight.requires_grad_(False)
    x = torch.randn(64, 12, requires_grad=True)

    class WideProducts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            products = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default)
            if func in products and out.shape == x.shape:
                WideProducts.count += 1
            if func is torch.ops.mtlora.lora_linear_backward.default:  # the C op: its grad_x is one GEMM inside
                WideProducts.count += 1
            return out

    kernels.library.cache_clear()
    try:
        y = layer(x)
        with WideProducts():
            y.pow(2).sum().backward()
        assert WideProducts.count == (1 if dropout == 0 or kernels.library() is not None else 2)
        assert x.grad is not None and layer.lora_A.weight.grad is not None
    finally:
        kernels.library.cache_clear()


@ARCHS
def test_plain_lora_layers_take_the_fused_path_and_agree_with_the_two_node_form(arch):
    """Same logits and gradients whether a LoRA layer runs as one autograd node or two (a forward
    hook on the frozen layer forces the two-node form, which keeps the hook's semantics)."""
    from mtlora.adapters import backends
    from mtlora.adapters.lora import LoraLinear

    results = []
    for fused in (True, False):
        model, tok = tiny_model(arch)
        _lora(model, dropout=0.0)
        _randomise_b(model)
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        if not fused:
            for m in layers:
                m.base_layer.register_forward_hook(lambda mod, inp, out: None)
        x = torch.randn(2, 5, layers[0].in_features)
        assert backends._fusable(layers[0], x) is fused
        out = model(**_ids(tok)).logits
        out.float().pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4)


@ARCHS
def test_dropout_masks_replay_under_activation_checkpointing(arch):
    """Recomputed blocks draw the same masks (seeded from torch's RNG), so gradients are unchanged."""
    grads = []
    for checkpointing in (False, True):
        model, tok = tiny_model(arch)
        batch = _ids(tok)
        _lora(model, dropout=0.3)
        _randomise_b(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(7)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_hash_keep_mask_c_and_numpy_agree_and_look_like_bernoulli():
    """The C kernel's mask and its numpy twin are the same bits (machines without a compiler train
    with the same masks); the bits are an unbiased Bernoulli draw, with no correlation between
    neighbouring elements, and a different seed gives a different mask."""
    from mtlora.adapters import kernels

    n, drop16 = 1_000_003, 3277
    for seed in (0, 12345, 2**61 + 7):
        ref = kernels.keep_mask_numpy(n, seed, drop16)
        if kernels.library() is not None:
            assert np.array_equal(kernels.keep_mask((n,), seed, drop16).numpy(), ref)
        dropped = 1 - ref.astype(np.float64)
        p = drop16 / 65536
        assert abs(dropped.mean() - p) < 4 * (p * (1 - p) / n) ** 0.5
        both = (dropped[:-1] * dropped[1:]).mean()  # neighbours: P(both dropped) = p^2
        assert abs(both - p * p) < 4 * (p * p / n) ** 0.5
        rows = dropped[: 1000 * 1000].reshape(1000, 1000)
        assert abs((rows[:-1] * rows[1:]).mean() - p * p) < 4 * (p * p / 1e6) ** 0.5  # next row, same column
    assert not np.array_equal(kernels.keep_mask_numpy(n, 1, drop16), kernels.keep_mask_numpy(n, 2, drop16))
    assert not np.array_equal(kernels.keep_mask_numpy(n, 1, drop16), kernels.keep_mask_numpy(n, 1 + 2**32, drop16))


@pytest.mark.parametrize("rank", [8, 3, 16])
@pytest.mark.parametrize("rows", [0, 1, 7, 64])
@pytest.mark.parametrize("d", [5, 37, 64])
def test_adapter_kernels_match_the_torch_formulas(rank, rows, d):
    """The C kernels' forward (phi = rescale * A (x * m), bias + s phi B.T) and backward (grad_A,
    grad_B, the masked share of grad_x, with and without a gradient reaching phi) against torch ops
    over the same mask: the r = 8 AVX-512 paths and the generic loops (3, 16); no rows, one row and
    an odd number of rows (the kernels pair rows); widths below one 16-lane vector, odd (rows start
    at odd element indices, the last word is partial) and a multiple of 32 (every word from the
    vectorised hash)."""
    from mtlora.adapters import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler: the torch path is used (and tested) instead")
    torch.manual_seed(0)
    _check_adapter_kernels(kernels, rank, rows, d=d, seed=99, drop16=9000, rescale=1.3)
    _check_adapter_kernels(kernels, rank, rows, d=d, seed=0, drop16=0, rescale=1.0)  # no dropout: no hash


def test_packed_keep_bits_match_the_hash_past_two_to_the_32_pairs():
    """The packed words hash 16 pairs at once with 32-bit counters; near pair 2**32 (element 2**33)
    the counter's high half changes inside a word, which the kernel routes to the per-element
    hash. Both sides of that edge, and an odd start, against the numpy twin."""
    from mtlora.adapters import kernels

    if kernels.library() is None:
        pytest.skip("no C compiler")
    for first in (2**33 - 40, 2**33 - 31, 2**33 + 64, 5):
        got = kernels.keep_bits_row(first, 100, seed=2**40 + 3, drop16=30000)
        ref = kernels.keep_mask_numpy(100, 2**40 + 3, 30000, first=first)
        assert np.array_equal(got, ref), first


def _check_adapter_kernels(kernels, rank: int, rows: int, d: int, seed: int, drop16: int, rescale: float) -> None:
    """``lora_forward`` / ``lora_backward`` against torch ops over ``keep_mask``'s bits (d_out = d + 5,
    with a bias; the backward with and without phi's gradient)."""
    d_out, s = d + 5, 0.7
    x, a, b, bias = torch.randn(rows, d), torch.randn(rank, d), torch.randn(d_out, rank), torch.randn(d_out)
    keep = kernels.keep_mask((rows, d), seed, drop16)
    m = keep.float()
    out, z, bits = kernels.lora_forward(x, a, b, bias, seed, drop16, rescale, s)
    assert torch.equal(kernels.unpack_bits(bits, d), keep)  # the packed mask the backward reads: the same bits
    torch.testing.assert_close(z, rescale * (x * m) @ a.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, bias + s * z @ b.T, atol=1e-5, rtol=1e-5)
    g = torch.randn(rows, d_out)
    for g_phi in (None, torch.randn(rows, rank)):
        gz = s * rescale * g @ b + (0 if g_phi is None else rescale * g_phi)
        grad_x = torch.randn(rows, d)  # overwritten, not added to
        grad_a, grad_b = kernels.lora_backward(g, b, z, g_phi, x, a, bits, grad_x, s * rescale, s, rescale)
        torch.testing.assert_close(grad_b, s * g.T @ z, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad_a, gz.T @ (x * m), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad_x, (gz @ a) * m, atol=1e-4, rtol=1e-5)


@ARCHS
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_is_the_same_with_and_without_the_kernels(arch, dropout, monkeypatch):
    """The one-node layer with the C kernels (r = 8: the AVX-512 paths; the mask from the seed),
    the one-node layer on torch ops (MTLORA_KERNELS=0: the mask materialised from the same seed)
    and the two-node form (a forward hook on the frozen layer) give the same logits and
    gradients for the same seed, with and without dropout."""
    from mtlora.adapters import kernels
    from mtlora.adapters.lora import LoraLinear

    results = []
    for variant in ("kernel", "torch", "two_node"):
        kernels.library.cache_clear()
        monkeypatch.setenv("MTLORA_KERNELS", "0" if variant == "torch" else "1")
        model, tok = tiny_model(arch)
        _lora(model, dropout=dropout, r=8)
        _randomise_b(model)
        model.train()
        if variant == "two_node":
            for m in model.modules():
                if isinstance(m, LoraLinear):
                    m.base_layer.register_forward_hook(lambda mod, inp, out: None)
        torch.manual_seed(5)
        out = model(**_ids(tok)).logits
        out.float().pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    kernels.library.cache_clear()
    (o1, g1), *others = results
    for o2, g2 in others:
        torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-4)
        assert g1.keys() == g2.keys() and g1
        for k in g1:
            torch.testing.assert_close(g1[k], g2[k], atol=1e-5, rtol=1e-4)


def test_kernel_build_is_cached_atomically_and_a_missing_compiler_falls_back(tmp_path, monkeypatch):
    """The first use builds one library into $MTLORA_CACHE/kernels (no temp files left behind);
    a compiler that cannot run means no kernel, not an error: the layer then uses torch ops."""
    import shutil

    from mtlora.adapters import kernels

    monkeypatch.setenv("MTLORA_CACHE", str(tmp_path))
    monkeypatch.delenv("MTLORA_KERNELS", raising=False)
    try:
        kernels.library.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        assert kernels.library() is None
        assert list((tmp_path / "kernels").iterdir()) == []  # the failed build's temp file is gone
        kernels.library.cache_clear()
        if not (shutil.which("cc") or shutil.which("gcc")):
            pytest.skip("no C compiler on this machine")
        monkeypatch.delenv("CC")
        assert kernels.library() is not None
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"
    finally:
        kernels.library.cache_clear()


def test_kernels_built_without_avx512_agree_too(tmp_path, monkeypatch):
    """The portable loops (what a CPU without AVX-512 runs) give the same results as torch: built
    here with -mno-avx512f into a fresh cache."""
    from mtlora.adapters import kernels

    monkeypatch.setenv("MTLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_FLAGS", [*kernels._FLAGS, "-mno-avx512f"])
    kernels.library.cache_clear()
    try:
        if kernels.library() is None:
            pytest.skip("no C compiler")
        torch.manual_seed(0)
        for rank, rows in ((8, 9), (4, 6), (3, 5)):
            _check_adapter_kernels(kernels, rank, rows, d=21, seed=5, drop16=20000, rescale=0.9)
    finally:
        kernels.library.cache_clear()
