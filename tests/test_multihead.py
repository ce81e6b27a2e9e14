"""Multi-head LoRA family (HydraLoRA, R-LoRA, M-LoRA): table-driven across the types and tiny archs."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from rlora_reinit_port import RepoLinear, fine_tuning_sh_config, reinit_lora_modules
from safetensors.torch import load_file
from torch import nn

from mtlora.adapters import (
    adapter_layers,
    count_parameters,
    inject_adapters,
    load_adapter,
    make_adapter_config,
    merge_adapters,
    save_adapter,
    unload,
)
from mtlora.adapters.dropout import InputDropout
from mtlora.adapters.multihead import METHODS, MultiHeadLoraLinear, router_aux_loss
from mtlora.errors import UserError
from mtlora.testing import TINY_ARCHS, tiny_model

ARCHS = pytest.mark.parametrize("arch", TINY_ARCHS)
TYPES = pytest.mark.parametrize("method", METHODS)


def _ids(tok):
    return tok(
        ["the cat sat on the mat", "Question: Is the sky blue? Answer: yes"],
        return_tensors="pt",
        padding=True,
    )


def _inject(model, method, **kw):
    kw.setdefault("target_modules", "all-linear")
    kw.setdefault("r", 4)
    kw.setdefault("alpha", 32)
    kw.setdefault("num_heads", 3)
    return inject_adapters(model, make_adapter_config(method, **kw))


def _randomise(model, seed=1, std=0.3):
    """Heads and routers far from their init, so every path carries signal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            nn.init.normal_(layer.lora_B, std=std)
            if layer.router is not None:
                nn.init.normal_(layer.router.weight, std=1.0)


def loop_reference_delta(layer: MultiHeadLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """Slow per-head reference written from the formula, drawing dropout masks like the layer does.

    ``h - W0 x = s * (sum_i w_i(x) B_i drop_i(A drop(x)) - offset_B offset_A x)`` with a Python loop
    over heads; the masks are drawn from the RNG in the layer's order (mask on x, or one
    ``(..., N, r)`` draw, or one ``(..., N, d_in)`` draw), so a test seeds both and compares.
    """
    n, r, p = layer.num_heads, layer.r, layer.dropout_p
    train = layer.training and p > 0
    mode = layer.dropout_mode
    if mode == "input" and train:
        x_a = x * InputDropout(p).train()(torch.ones_like(x))
    else:
        x_a = x
    if layer.router is not None:
        w = torch.softmax(x.double() @ layer.router.weight.double().T, -1)
    else:
        w = layer.head_weights.double().expand(*x.shape[:-1], n)
    x_masks = masks = None
    if mode == "input_per_head" and train:
        x_masks = F.dropout(torch.ones(*x.shape[:-1], n, x.shape[-1], dtype=x.dtype), p, training=True)
    phi = x_a @ layer.lora_A.weight.T
    if mode == "per_head" and train:
        masks = F.dropout(torch.ones(*phi.shape[:-1], n, r, dtype=phi.dtype), p, training=True)
    out = torch.zeros(*x.shape[:-1], layer.out_features, dtype=torch.float64)
    for i in range(n):
        phi_i = phi if masks is None else phi * masks[..., i, :]
        if x_masks is not None:
            phi_i = (x * x_masks[..., i, :]) @ layer.lora_A.weight.T
        out += w[..., i : i + 1] * (phi_i.double() @ layer.lora_B[i].double().T)
    if layer.offset_A is not None:
        out -= (x.double() @ layer.offset_A.double().T) @ layer.offset_B.double().T
    return (out * layer.scaling).to(x.dtype)


@ARCHS
@TYPES
@pytest.mark.parametrize("init, zero_init", [(None, "offset"), (None, "center"), ("lora", "offset")])
def test_initial_update_is_zero(arch, method, init, zero_init):
    """Zero-B inits are bit-exact; random heads cancel up to fp32 rounding, by offset or centring."""
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    base = model(**batch).logits
    _inject(model, method, init=init, num_heads=5, zero_init=zero_init)
    out = model(**batch).logits
    layer = next(layer for _, layer in adapter_layers(model))
    if layer.lora_B.abs().sum() == 0:
        assert torch.equal(out, base)
        assert layer.offset_A is None
        return
    torch.testing.assert_close(out, base, atol=1e-6, rtol=0)
    heads = layer.lora_B.double()
    cancel = heads.sum(0).abs().max() < 1e-6 * heads.abs().max()
    if zero_init == "center":
        assert cancel and layer.offset_A is None
    else:  # heads kept as drawn; the frozen offset is their weighted mean times A at init
        assert not cancel
        assert torch.equal(layer.offset_A, layer.lora_A.weight)
        torch.testing.assert_close(layer.offset_B, layer.lora_B.mean(0))


@ARCHS
@pytest.mark.parametrize("method", ["rlora", "mlora"])
def test_a_learns_from_the_first_step_with_the_offset_not_with_centring(arch, method):
    """The issue the offset fixes: centred heads give sum_i w_i B_i = 0, hence grad A ~ 0 at init."""
    grads = {}
    for zero_init in ("offset", "center"):
        model, tok = tiny_model(arch)
        batch = _ids(tok)
        torch.manual_seed(0)
        _inject(model, method, num_heads=5, zero_init=zero_init, dropout=0.0)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        layers = [layer for _, layer in adapter_layers(model)]
        grads[zero_init] = (
            sum(float(layer.lora_A.weight.grad.norm()) for layer in layers),
            sum(float(layer.lora_B.grad.norm()) for layer in layers),
        )
        assert all(layer.offset_A is None or not layer.offset_A.requires_grad for layer in layers)
    a_off, b_off = grads["offset"]
    a_cen, b_cen = grads["center"]
    assert a_off > 1e-3 * b_off  # A moves at step 0
    assert a_cen < 1e-5 * b_cen  # A's gradient is rounding noise
    assert a_off > 100 * a_cen


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_mlora_initial_update_is_zero_for_both_combines(combine):
    model, tok = tiny_model("llama")
    batch = _ids(tok)
    base = model(**batch).logits
    _inject(model, "mlora", combine=combine, num_heads=5)
    torch.testing.assert_close(model(**batch).logits, base, atol=1e-6, rtol=0)


@ARCHS
@TYPES
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("mode", [None, "input_per_head"])
def test_batched_forward_equals_per_head_loop_reference(arch, method, training, mode):
    model, _ = tiny_model(arch)
    _inject(model, method, dropout=0.3, num_heads=4, dropout_mode=mode)
    _randomise(model)
    model.train(training)
    x = torch.randn(2, 7, model.config.intermediate_size)
    layers = [layer for name, layer in adapter_layers(model) if name.endswith(("q_proj", "down_proj"))]
    for layer in layers:
        xi = x[..., : layer.in_features]
        torch.manual_seed(5)
        fast = layer.adapter_delta(xi)
        torch.manual_seed(5)
        slow = loop_reference_delta(layer, xi)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
        assert fast.abs().max() > 1e-3


@ARCHS
@TYPES
def test_gradients_reach_a_every_head_and_the_router(arch, method):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _inject(model, method, dropout=0.1, num_heads=4)
    _randomise(model)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    for name, layer in adapter_layers(model):
        assert layer.lora_A.weight.grad.abs().sum() > 0, name
        per_head = layer.lora_B.grad.flatten(1).abs().sum(1)
        assert (per_head > 0).all(), (name, per_head)
        if method == "mlora":
            assert layer.router is None
        else:
            assert layer.router.weight.grad.abs().sum() > 0, name
            assert layer.router.weight.dtype == torch.float32


@ARCHS
@pytest.mark.parametrize(
    "method, mode, independent",
    [("hydralora", None, False), ("rlora", None, True), ("mlora", None, True), ("hydralora", "input_per_head", None)],
)
def test_dropout_masks_per_head(arch, method, mode, independent):
    """Each head writes to its own output block, so its dropout pattern is visible in the output."""
    model, _ = tiny_model(arch)
    n, r, p = 4, 4, 0.5
    _inject(model, method, r=r, num_heads=n, dropout=p, target_modules=["q_proj"], init="lora", dropout_mode=mode)
    layer = next(layer for _, layer in adapter_layers(model))
    assert layer.out_features >= n * r
    with torch.no_grad():
        for i in range(n):
            layer.lora_B[i, i * r : (i + 1) * r] = torch.eye(r)
    layer.train()
    torch.manual_seed(0)
    x = torch.randn(3, 50, layer.in_features)
    blocks = layer.adapter_delta(x)[..., : n * r].unflatten(-1, (n, r))  # (..., head, r)
    if independent is None:  # a mask on x per head: every head sees its own A drop_i(x)
        assert all(not torch.allclose(blocks[..., 0, :], blocks[..., i, :]) for i in range(1, n))
        layer.eval()
        clean = layer.adapter_delta(x)[..., : n * r].unflatten(-1, (n, r))
        for i in range(1, n):
            torch.testing.assert_close(clean[..., i, :], clean[..., 0, :])
        # unbiased: the mean over many draws approaches the clean update
        layer.train()
        mean = torch.stack([layer.adapter_delta(x[:1, :8]) for _ in range(400)]).mean(0)
        ref = layer.eval().adapter_delta(x[:1, :8])
        assert (mean - ref).abs().mean() < 0.1 * ref.abs().mean()
    elif independent:
        kept = blocks != 0
        assert all(not torch.equal(kept[..., 0, :], kept[..., i, :]) for i in range(1, n))
        assert 0.35 < kept.float().mean() < 0.65  # rate p, scaled by 1/(1-p) below
        layer.eval()
        torch.testing.assert_close(
            blocks[kept], (layer.adapter_delta(x)[..., : n * r].unflatten(-1, (n, r)) / (1 - p))[kept]
        )
    else:  # one mask on x, uniform router: every head sees the same A drop(x)
        for i in range(1, n):
            torch.testing.assert_close(blocks[..., i, :], blocks[..., 0, :])


@ARCHS
@TYPES
def test_save_load_round_trips_exactly(arch, method, tmp_path):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _inject(model, method, target_modules=["q_proj", "gate_proj", "down_proj"], use_rslora=True, num_heads=3)
    _randomise(model)
    expected = model(**batch).logits
    save_adapter(model, tmp_path / "a")
    peft_cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "a" / "mtlora_config.json").read_text())["adapter"]
    assert peft_cfg["peft_type"].startswith(f"{method.upper()}: a multi-head adapter of mtlora")
    assert ours["method"] == method and ours["num_heads"] == 3 and ours["dropout_mode"]
    assert ours["zero_init"] == "offset"
    saved = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    offsets = {k: v for k, v in saved.items() if ".offset_" in k}
    has_offset = method != "hydralora"  # hydralora's zero heads need none
    assert len(offsets) == 2 * len(list(adapter_layers(model))) * has_offset
    fresh, _ = tiny_model(arch)
    torch.manual_seed(123)  # a different random init: the offset must come from the file
    load_adapter(fresh, tmp_path / "a")
    assert fresh.mtlora_config == model.mtlora_config
    for (_, a), (_, b) in zip(adapter_layers(model), adapter_layers(fresh), strict=True):
        if has_offset:
            assert torch.equal(a.offset_A, b.offset_A) and torch.equal(a.offset_B, b.offset_B)
    assert torch.equal(fresh(**batch).logits, expected)


@ARCHS
@pytest.mark.parametrize(
    "method, kw",
    [
        ("mlora", {"combine": "mean"}),
        ("mlora", {"combine": "sum"}),
        ("rlora", {"head_weights": [0.5, 0.3, 0.2]}),
        ("hydralora", {"head_weights": [1.0, 0.0, 2.0]}),
    ],
)
def test_merge_is_exact_without_a_learned_router(arch, method, kw):
    model, tok = tiny_model(arch)
    batch = _ids(tok)
    _inject(model, method, num_heads=3, **kw)
    _randomise(model, std=0.05)
    tuned = model(**batch).logits
    merge_adapters(model)
    torch.testing.assert_close(model(**batch).logits, tuned, atol=1e-5, rtol=1e-5)
    unload(model, merge=False)
    torch.testing.assert_close(model(**batch).logits, tuned, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["hydralora", "rlora"])
def test_merge_with_a_learned_router_is_a_clear_error(method):
    model, _ = tiny_model("llama")
    _inject(model, method)
    with pytest.raises(UserError, match="learned token router"):
        merge_adapters(model)
    assert not any(layer.merged for _, layer in adapter_layers(model))


@TYPES
def test_trainable_parameters_are_a_heads_and_router(method):
    model, _ = tiny_model("llama")
    n, r = 5, 4
    _inject(model, method, r=r, num_heads=n, target_modules=["q_proj"])
    h, layers = model.config.hidden_size, model.config.num_hidden_layers
    router = n * h if method != "mlora" else 0
    assert count_parameters(model)[0] == layers * (r * h + n * h * r + router)


@pytest.mark.parametrize("scale_dim, m", [("rank", 8), ("d_out", 1024)])
def test_paper_init_scale(scale_dim, m):
    """paper: A and every head at c = m^0.25/sqrt(gamma), m the rank (reinit.py) or d_out (LoRA-GA)."""
    torch.manual_seed(0)
    base = nn.Linear(256, 1024, bias=False)
    c = m**0.25 / 8
    cfg = make_adapter_config("rlora", r=8, num_heads=4, scale_dim=scale_dim, zero_init="offset")
    layer = MultiHeadLoraLinear(base, cfg)
    assert math.isclose(layer.lora_A.weight.std().item(), c / math.sqrt(256), rel_tol=0.05)
    torch.testing.assert_close(layer.lora_B.flatten(1).std(1), torch.full((4,), c / 32), rtol=0.05, atol=0)
    assert layer.router.weight.abs().sum() == 0  # uniform start


def test_repo_init_scale_compounds_per_head():
    """repo: the scale block inside reinit.py's head loop leaves A at c^N and head i at c^(N-i)."""
    torch.manual_seed(0)
    n, r = 4, 8
    base = nn.Linear(256, 1024, bias=False)
    c = r**0.25 / 8
    layer = MultiHeadLoraLinear(base, make_adapter_config("rlora", r=r, num_heads=n, init_scale="repo"))
    assert math.isclose(layer.lora_A.weight.std().item(), c**n / math.sqrt(256), rel_tol=0.05)
    torch.testing.assert_close(
        layer.lora_B.flatten(1).std(1), torch.tensor([c ** (n - i) / 32 for i in range(n)]), rtol=0.05, atol=0
    )
    with pytest.raises(UserError, match="adapter.scale_dim"):
        make_adapter_config("rlora", init_scale="repo", scale_dim="d_out")


@pytest.mark.parametrize("d_in, d_out, n", [(48, 96, 5), (96, 32, 3)])
def test_repo_init_matches_a_line_by_line_port_of_reinit_py(d_in, d_out, n):
    """Same seed, same draws: A, every head, the router, the rsLoRA scaling and the layer output
    equal those of the port of reinit.py + R-LoRA's layer (tests/rlora_reinit_port.py)."""
    r, alpha = 4, 32.0
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out)
    cfg = make_adapter_config("rlora", r=r, alpha=alpha, num_heads=n, init_scale="repo", use_rslora=True, dropout=0.1)
    ours = MultiHeadLoraLinear(base, cfg)
    port = RepoLinear(base, r=r, lora_alpha=alpha, lora_nums=n, lora_dropout=0.1)
    port.reset_parameters_adapter()
    torch.manual_seed(7)
    ours._reset_heads(cfg)
    torch.manual_seed(7)
    reinit_lora_modules("layer", port, fine_tuning_sh_config())
    nn.init.kaiming_uniform_(port.lora_route.weight, a=math.sqrt(5))  # R-LoRA draws it at construction
    assert ours.scaling == port.scaling == alpha / math.sqrt(r)
    assert torch.equal(ours.lora_A.weight, port.lora_A.weight)
    for i in range(n):
        assert torch.equal(ours.lora_B[i], getattr(port, f"lora_B{i}").weight), i
    assert torch.equal(ours.router.weight, port.lora_route.weight)
    # the repo writes the offset into W0; ours keeps it beside W0, and the layers agree
    torch.testing.assert_close(
        port.weight, base.weight - ours.scaling * (ours.offset_B.double() @ ours.offset_A.double()).float()
    )
    ours.eval()
    port.eval()
    x = torch.randn(2, 5, d_in)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), port(x), atol=1e-6, rtol=1e-6)


def test_router_softmax_is_fp32_in_a_bf16_model():
    model, tok = tiny_model("qwen2")
    _inject(model, "rlora", target_modules=["up_proj"])
    model.to(torch.bfloat16)
    layer = next(layer for _, layer in adapter_layers(model))
    nn.init.normal_(layer.router.weight)
    w = layer.router_weights(torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3))
    assert model(**_ids(tok)).logits.dtype == torch.bfloat16


def test_load_balancing_loss_is_off_by_default_and_trains_the_router():
    model, tok = tiny_model("llama")
    batch = _ids(tok)
    _inject(model, "rlora")
    model.train()
    model(**batch)
    assert router_aux_loss(model) is None
    model, _ = tiny_model("llama")
    _inject(model, "hydralora", load_balance_coef=0.01)
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    aux = router_aux_loss(model)
    assert aux is not None and aux.ndim == 0 and 0.01 * 0.99 <= aux.item() <= 0.01 * 3
    (out.loss + aux).backward()
    assert all(layer.router.weight.grad.abs().sum() > 0 for _, layer in adapter_layers(model))
    assert router_aux_loss(model) is None  # consumed
    model.eval()
    model(**batch)
    assert router_aux_loss(model) is None  # eval forwards store nothing


@pytest.mark.parametrize(
    "kw, where",
    [
        ({"num_heads": 0}, "adapter.num_heads"),
        ({"init": "xavier"}, "adapter.init"),
        ({"init_scale": "huge"}, "adapter.init_scale"),
        ({"dropout_mode": "tokens"}, "adapter.dropout_mode"),
        ({"scale_dim": "d_in"}, "adapter.scale_dim"),
        ({"zero_init": "none"}, "adapter.zero_init"),
        ({"combine": "max"}, "adapter.combine"),
        ({"gamma": 0}, "adapter.gamma"),
        ({"head_weights": [1.0, 2.0]}, "adapter.head_weights"),
        ({"load_balance_coef": -1.0}, "adapter.load_balance_coef"),
        ({"num_heads": 2, "head_weights": [0.5, 0.5], "load_balance_coef": 0.1}, "adapter.load_balance_coef"),
    ],
)
def test_bad_options_are_user_errors(kw, where):
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        make_adapter_config("rlora", **kw)


def test_method_defaults():
    hydra, rlora, mlora = (make_adapter_config(m) for m in METHODS)
    assert (hydra.init, hydra.dropout_mode, hydra.has_router) == ("hydra", "input", True)
    assert (rlora.init, rlora.dropout_mode, rlora.has_router) == ("multihead", "per_head", True)
    assert (mlora.init, mlora.dropout_mode, mlora.has_router) == ("multihead", "per_head", False)
    with pytest.raises(UserError, match="expected none for mlora"):
        make_adapter_config("mlora", num_heads=2, head_weights=[1.0, 1.0])


@pytest.mark.parametrize("zero_init, init_scale", [("offset", "paper"), ("center", "paper"), ("offset", "repo")])
def test_layers_build_on_the_meta_device(zero_init, init_scale):
    """Parameter budgets inject into a meta-device skeleton: every init must build there."""
    with torch.device("meta"):
        base = nn.Linear(32, 64)
    cfg = make_adapter_config("rlora", r=4, num_heads=3, zero_init=zero_init, init_scale=init_scale)
    layer = MultiHeadLoraLinear(base, cfg)
    assert layer.lora_B.is_meta and sum(p.numel() for p in layer.parameters() if p.requires_grad) > 0
