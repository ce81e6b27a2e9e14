"""Every route of a LoRA layer against its reference (``LoraLinear.reference_forward``).

A table of routes x ranks x dropout x bias x dtypes: the same seed must give the same output, the
same Align-LoRA feature (phi) and the same gradients for x, A, B (and W0 / bias where they train)
on every route. The C route is a torch custom op: ``torch.library.opcheck`` checks its schema,
fake (meta) implementation and autograd registration, and ``torch.compile`` traces it whole.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from mtlora.adapters import backends, kernels
from mtlora.adapters.context import forward_context
from mtlora.adapters.lora import LoraConfig, LoraLinear
from mtlora.errors import UserError

ROUTES = ["torch", "c", "auto"]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float64: dict(atol=1e-10, rtol=1e-10)}
CASES = [  # (rank, dropout, bias, dtype)
    *itertools.product([1, 8, 16], [0.0, 0.2], [False, True], [torch.float32]),
    *itertools.product([4], [0.0, 0.2], [True], [torch.float64, torch.bfloat16]),
]


def _layer(backend: str, r: int, dropout: float, bias: bool, dtype: torch.dtype, d_in=37, d_out=29) -> LoraLinear:
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=bias).to(dtype)
    base.weight.requires_grad_(False)
    layer = LoraLinear(base, LoraConfig(r=r, dropout=dropout, backend=backend)).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a non-zero update, so B's and A's gradients are both non-trivial
    return layer


def _run(layer: LoraLinear, x: torch.Tensor, phi_loss: bool):
    x = x.clone().requires_grad_(True)
    capture: list = []
    torch.manual_seed(1)  # the same dropout draw for every route
    with forward_context(capture=capture):
        y = layer(x)
    loss = y.float().pow(2).sum() + (capture[0][1].float().pow(3).sum() if phi_loss else 0)
    loss.backward()
    grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
    return y.detach(), capture[0][1].detach(), grads


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(("r", "dropout", "bias", "dtype"), CASES)
@pytest.mark.parametrize("phi_loss", [False, True])
def test_every_route_matches_the_reference(route, r, dropout, bias, dtype, phi_loss):
    x = torch.randn(3, 5, 37).to(dtype)
    ref = _run(_layer("reference", r, dropout, bias, dtype), x, phi_loss)
    got = _run(_layer(route, r, dropout, bias, dtype), x, phi_loss)
    for i, (g, gr) in enumerate(zip([got[0], got[1], *got[2]], [ref[0], ref[1], *ref[2]], strict=True)):
        if dtype == torch.bfloat16:  # other summation orders round differently: 8 bits, relative to the norm
            assert ((g.float() - gr.float()).norm() / gr.float().norm()).item() < 1e-2, i
        else:  # gradients sum over tokens: 10x the output's tolerance
            torch.testing.assert_close(g, gr, **{k: v * (1 if i < 2 else 10) for k, v in TOL[dtype].items()})
    if route != "torch" and dtype == torch.float32 and kernels.library() is not None:
        assert backends.uses_c(_layer(route, r, dropout, bias, dtype), x)  # the route under test is C's


@pytest.mark.parametrize("route", ROUTES)
def test_a_trainable_frozen_layer_gets_the_reference_gradients(route):
    """W0 and its bias made trainable (full fine-tuning of a layer beside its adapter)."""
    x = torch.randn(6, 37)
    out = []
    for backend in ("reference", route):
        layer = _layer(backend, 4, 0.1, True, torch.float32)
        layer.base_layer.weight.requires_grad_(True)
        torch.manual_seed(2)
        layer(x).pow(2).sum().backward()
        out.append((layer.base_layer.weight.grad, layer.base_layer.bias.grad))
    for g, gr in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(g, gr, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("route", ["torch", "c"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_second_order_gradients_match_the_reference(route, dropout):
    """MeTA-LoRA differentiates through an inner step: gradients of gradients must agree too
    (the C op's backward falls back to the torch formulas over the same mask when create_graph)."""
    torch.manual_seed(2)
    x = torch.randn(4, 37)
    out = []
    for backend in ("reference", route):
        layer = _layer(backend, 8, dropout, False, torch.float32)
        a = layer.lora_A.weight
        torch.manual_seed(3)
        (ga,) = torch.autograd.grad(layer(x).pow(2).sum(), a, create_graph=True)
        (gga,) = torch.autograd.grad(ga.pow(2).sum(), a)
        out.append((ga.detach(), gga))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-3, rtol=1e-5)
    # fp32 sums of ~1e4-sized terms: the rounding error scales with the largest entry, not each one
    scale = float(out[0][1].abs().max())
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize("route", ROUTES)
def test_per_example_adapters_match_the_reference(route):
    """Stacked adapters (row j uses A[idx[j]], B[idx[j]]): the block layout and a gather."""
    torch.manual_seed(4)
    stacked = {"l": (torch.randn(3, 4, 37, requires_grad=True), torch.randn(3, 29, 4, requires_grad=True))}
    x = torch.randn(6, 5, 37)
    for idx in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 0, 1, 0, 2, 1])):
        out = []
        for backend in ("reference", route):
            layer = _layer(backend, 4, 0.2, True, torch.float32)
            layer.name = "l"
            torch.manual_seed(5)
            with forward_context(stacked=stacked, adapter_index=idx):
                y = layer(x)
            grads = torch.autograd.grad(y.pow(2).sum(), stacked["l"])
            out.append((y.detach(), grads))
        torch.testing.assert_close(out[1][0], out[0][0], atol=2e-5, rtol=2e-5)
        for g, gr in zip(out[1][1], out[0][1], strict=True):
            torch.testing.assert_close(g, gr, atol=2e-4, rtol=5e-4)  # fp32 sums of large, cancelling terms


@pytest.mark.parametrize("method", ["hydralora", "rlora", "mlora"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_multi_head_fast_ops_match_their_reference(method, dropout):
    from mtlora.adapters import make_adapter_config
    from mtlora.adapters.multihead.layer import MultiHeadLoraLinear

    assert not MultiHeadLoraLinear.fused_route  # its own maths: the two-node fast ops, never the fused node
    x = torch.randn(2, 5, 37)
    out = []
    for backend in ("reference", "auto"):
        torch.manual_seed(0)
        config = make_adapter_config(method, r=4, num_heads=3, dropout=dropout, backend=backend)
        layer = MultiHeadLoraLinear(torch.nn.Linear(37, 29), config).train()
        with torch.no_grad():
            layer.lora_B.normal_()
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = layer(xx)
        y.pow(2).sum().backward()
        out.append((y.detach(), xx.grad, [p.grad for p in layer.parameters() if p.requires_grad]))
    torch.testing.assert_close(out[1][0], out[0][0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out[1][1], out[0][1], atol=2e-4, rtol=2e-5)
    for g, gr in zip(out[1][2], out[0][2], strict=True):
        torch.testing.assert_close(g, gr, atol=2e-4, rtol=2e-5)


def test_a_subclass_keeps_the_fused_route_unless_it_changes_the_maths():
    class Logged(LoraLinear):  # same maths, something extra around it
        def extra_repr(self) -> str:
            return "logged, " + super().extra_repr()

    class OwnMaths(LoraLinear):
        def adapter_delta(self, x, base=None):
            return super().adapter_delta(x, base) * (1 if base is not None else 2)

    x = torch.randn(4, 37)
    assert backends._fusable(Logged(torch.nn.Linear(37, 29), LoraConfig(r=4)), x)
    assert not OwnMaths.fused_route and not backends._fusable(OwnMaths(torch.nn.Linear(37, 29), LoraConfig(r=4)), x)


def test_the_backend_key_is_validated():
    with pytest.raises(UserError, match="adapter.backend: expected one of auto, c, torch, reference"):
        LoraConfig(backend="cuda")


def test_no_compiler_means_one_notice_and_the_torch_route(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLORA_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    kernels.library.cache_clear()
    try:
        x = torch.randn(4, 37)
        layer = _layer("auto", 4, 0.1, False, torch.float32)
        assert not backends.uses_c(layer, x)
        layer(x)
        layer(x)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mtlora: note: the C LoRA kernels are unavailable (no-such-cc")
        with pytest.raises(UserError, match="adapter.backend: c: the C kernels could not be built"):
            _layer("c", 4, 0.1, False, torch.float32)(x)
    finally:
        kernels.library.cache_clear()


def test_the_c_op_passes_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of the custom op."""
    if kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    x2, w0, a, b = torch.randn(7, 37), torch.randn(29, 37), torch.randn(8, 37), torch.randn(29, 8)
    for bias, seed, drop16 in ((None, 0, 0), (torch.randn(29), 123, 9000)):
        args = (x2.requires_grad_(True), w0, bias, a.requires_grad_(True), b.requires_grad_(True), 0.7, 1.2, seed, drop16)
        torch.library.opcheck(kernels.lora_linear, args)


def test_torch_compile_traces_the_c_op_whole():
    """``torch.compile`` sees the op as one node (fullgraph: no graph break) with the eager numbers
    and gradients."""
    if kernels.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    x2, w0, bias = torch.randn(15, 37, requires_grad=True), torch.randn(29, 37), torch.randn(29)
    a, b = torch.randn(8, 37, requires_grad=True), torch.randn(29, 8, requires_grad=True)

    def f(x2, a, b):
        out, phi, _ = kernels.lora_linear(x2, w0, bias, a, b, 0.7, 1.25, 77, 13107)
        return out.pow(2).sum() + phi.sum()

    eager = f(x2, a, b)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x2, a, b)
    torch.testing.assert_close(compiled, eager)
    g1 = torch.autograd.grad(eager, (x2, a, b))
    g2 = torch.autograd.grad(compiled, (x2, a, b))
    for u, v in zip(g2, g1, strict=True):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_torch_compile_traces_a_layer_and_its_context_whole(backend):
    """A LoRA layer and a task-routed multi-head layer compile without a graph break (fullgraph),
    read the forward context (the features Align-LoRA captures, the task ids the router reads) and
    follow a change of it (guards, not a stale graph), with the eager outputs and gradients."""
    from mtlora.adapters import make_adapter_config
    from mtlora.adapters.multihead.layer import MultiHeadLoraLinear

    torch.manual_seed(0)
    lora = LoraLinear(torch.nn.Linear(37, 29), LoraConfig(r=4, dropout=0.0, backend=backend)).train()
    routed = MultiHeadLoraLinear(torch.nn.Linear(37, 29), make_adapter_config(
        "rlora", r=4, num_heads=3, dropout=0.0, backend=backend, router="task", num_tasks=2)).train()
    with torch.no_grad():
        lora.lora_B.weight.normal_()
        routed.lora_B.normal_()
        routed.task_router.normal_()  # rows differ: the task ids change the mixture
    x = torch.randn(2, 5, 37)
    compiled = {id(m): torch.compile(m, backend="aot_eager", fullgraph=True) for m in (lora, routed)}
    for ids in ([0, 1], [1, 1], [0, 1]):
        for layer in (lora, routed):
            runs = []
            for f in (layer, compiled[id(layer)]):
                xx, captured = x.clone().requires_grad_(True), []
                with forward_context(task_ids=torch.tensor(ids), capture=captured):
                    y = f(xx)
                y.pow(2).sum().backward()
                runs.append((y.detach(), xx.grad, [c[1].detach() for c in captured]))
            (y0, g0, c0), (y1, g1, c1) = runs
            # the traced graph may decompose the fused products differently: fp32 rounding, scaled
            for got, want in ((y1, y0), (g1, g0)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
            assert len(c1) == len(c0) == 1
            torch.testing.assert_close(c1[0], c0[0])
    with forward_context(task_ids=torch.tensor([0, 0])):
        wanted = routed(x)
    with forward_context(task_ids=torch.tensor([1, 1])):
        other = routed(x)
    assert not torch.allclose(wanted, other)  # the task ids matter, so following them was tested


def test_a_compiled_layer_compiles_once_over_steps_with_new_contexts():
    """Every step makes a new context (new task ids, a new capture list) and, with dropout, a new
    mask: the compiled layer keeps one graph for all of them (no recompile per step)."""
    from torch._dynamo.testing import CompileCounter

    layer = LoraLinear(torch.nn.Linear(16, 8), LoraConfig(r=4, dropout=0.1)).train()
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(3, 16)
    for step in range(6):
        captured = []
        with forward_context(task_ids=torch.tensor([step % 2] * 3), capture=captured):
            compiled(x).sum().backward()
        assert len(captured) == 1
    assert counter.frame_count == 1
