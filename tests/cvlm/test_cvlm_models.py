"""The generator interface and a manipulator training step through the frozen generator."""

import pytest
import torch

from cvlm.generator import (
    CXRReportGenerator,
    FeatureGenerator,
    GeneratorConfig,
    ReportGenerator,
    freeze,
    report_nll,
)
from cvlm.manipulator import Manipulator, ManipulatorConfig, manipulator_losses
from cvlm.phantoms import make_dataset
from cvlm.report_text import Tokenizer, write_report
from cvlm.train import images_tensor, pad_tokens, train_generator

SIZE = 32
TOK = Tokenizer()


def tiny_generator():
    torch.manual_seed(0)
    cfg = GeneratorConfig(d_model=32, n_layers=1, n_heads=2, channels=(8, 16), image_size=SIZE)
    return CXRReportGenerator(TOK, cfg)


def tiny_manipulator():
    torch.manual_seed(0)
    return Manipulator(ManipulatorConfig(channels=(8, 16, 16), d_text=16))


def test_generator_interface_and_gradients():
    g = tiny_generator()
    assert isinstance(g, ReportGenerator) and isinstance(g, FeatureGenerator)
    x = torch.rand(3, 1, SIZE, SIZE, requires_grad=True)
    reports = ["The heart is enlarged.", "No pneumothorax.", "There is a small right pleural effusion."]
    ll = g.report_log_likelihood(x, reports)
    assert ll.shape == (3,) and (ll < 0).all()
    ll.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # explainable: differentiable in the image
    out = g.generate(x.detach())
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    # log-likelihood of a report = sum of its token log-probs; the longer report is less likely
    assert g.report_log_likelihood(x[:1], ["No pneumothorax. No pneumothorax."]) < g.report_log_likelihood(x[:1], ["No pneumothorax."])


def test_generator_learns_and_round_trips_state(tmp_path):
    g = tiny_generator()
    ds = make_dataset(32, seed=1, size=SIZE)
    x = images_tensor(ds)
    tok = pad_tokens([TOK.encode(write_report(p.findings)) for p in ds])
    before = g.loss(x, tok).item()
    train_generator(g, ds, steps=25, batch_size=16, lr=3e-3, progress=False)
    assert g.loss(x, tok).item() < before - 0.5
    g2 = CXRReportGenerator.from_state(g.state())
    assert torch.allclose(g2.report_log_likelihood(x[:2], ["No pneumothorax."] * 2), g.report_log_likelihood(x[:2], ["No pneumothorax."] * 2))


def test_manipulator_step_gradient_flows_through_frozen_generator():
    g = freeze(tiny_generator())
    m = tiny_manipulator()
    ds = make_dataset(6, seed=2, size=SIZE)
    x = images_tensor(ds)
    report = "The heart is enlarged. No pleural effusion."
    cond = m.encode_reports([report] * 6, ["The heart is normal in size. No pleural effusion."] * 6)
    assert cond.shape == (6, 96) and cond[0, 0] == 1  # cardiomegaly present in t'
    assert cond[0, 48] == 1 and cond[0, 49:].abs().sum() == 0  # ... and added by the edit, nothing else changed
    d0 = m(x, cond)
    assert d0.shape == x.shape and d0.abs().max() == 0  # starts as the identity
    losses = manipulator_losses(m, g, x, [report] * 6, cond, torch.tensor([False] * 4 + [True] * 2))
    losses["total"].backward()
    assert all(p.grad is None for p in g.parameters())  # G stays frozen
    assert m.out.weight.grad is not None and m.out.weight.grad.abs().sum() > 0  # the cycle loss reaches M
    # one optimiser step moves the image so that G finds t' more likely
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    nll0 = report_nll(g, x + m(x, cond), [report] * 6).mean().item()
    for _ in range(3):
        opt.zero_grad()
        report_nll(g, x + m(x, cond), [report] * 6).mean().backward()
        opt.step()
    assert report_nll(g, x + m(x, cond), [report] * 6).mean().item() < nll0
    # and the manipulated image differs from x: the CVLM map is non-trivial
    assert (m(x, cond).abs() > 0).any()


def test_auxiliary_finding_loss_trains_the_encoder():
    from cvlm.report_text import report_vector

    g = tiny_generator()
    ds = make_dataset(8, seed=3, size=SIZE)
    x = images_tensor(ds)
    texts = [write_report(p.findings) for p in ds]
    tok = pad_tokens([TOK.encode(t) for t in texts])
    labels = torch.tensor([report_vector(t) for t in texts])
    assert labels.shape == (8, 48) and labels.sum() > 0
    plain, with_aux = g.loss(x, tok), g.loss(x, tok, labels)
    assert with_aux > plain  # the BCE term is added
    with_aux.backward()
    assert g.finding_head.weight.grad.abs().sum() > 0 and g.encoder[0].weight.grad.abs().sum() > 0
    g.zero_grad()
    g.cfg.aux_weight = 0.0
    assert torch.allclose(g.loss(x, tok, labels), plain)  # aux_weight 0 switches it off


def test_time_budget_stops_training_and_anneals():
    import time

    from cvlm.train import _schedule

    t0 = time.process_time()  # the budget is CPU time of this process
    assert _schedule(0, 100, t0, None) == 0 and _schedule(100, 100, t0, None) is None
    assert _schedule(3, 100, t0 - 5.0, 10.0) >= 49  # half the time gone: the schedule is half way
    assert _schedule(3, 100, t0 - 11.0, 10.0) is None  # budget spent: stop
    g = tiny_generator()
    h = train_generator(g, make_dataset(16, seed=1, size=SIZE), steps=10_000, batch_size=4, progress=False, max_seconds=0.5)
    assert 0 < h["steps"] < 10_000 and h["max_steps"] == 10_000 and 0.5 <= h["cpu_seconds"] < 2


def test_manipulator_trains_from_given_base_reports():
    from cvlm.train import generator_reports, train_manipulator

    g = freeze(tiny_generator())
    ds = make_dataset(8, seed=4, size=SIZE)
    base = generator_reports(g, ds)
    assert len(base) == 8 and all(isinstance(b, str) for b in base)
    m = tiny_manipulator()
    h = train_manipulator(m, g, ds, steps=3, batch_size=4, base=base, progress=False)
    assert h["steps"] == 3 and h["cycle"] > 0


def test_input_noise_augmentation():
    from cvlm.generator import augment

    x = torch.full((4, 1, SIZE, SIZE), 0.3)
    assert torch.equal(augment(x, 0.0), x)
    y = augment(x, 0.05, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(y, x)
    assert (y - x).abs().mean() < 0.1  # small perturbations, not a different image


def test_cycle_margin_ignores_confident_tokens():
    g = freeze(tiny_generator())
    x = images_tensor(make_dataset(2, seed=5, size=SIZE))
    r = ["The heart is enlarged. No pneumothorax."] * 2
    full, hinged = report_nll(g, x, r), report_nll(g, x, r, margin=0.5)
    assert torch.allclose(full, -g.report_log_likelihood(x, r))
    assert (hinged < full).all() and (hinged >= 0).all()
    assert torch.allclose(report_nll(g, x, r, margin=1e6), torch.zeros(2))


def test_proximity_terms_tax_the_image_frame_and_shared_patterns():
    from cvlm.manipulator import total_variation

    frame, inner = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    frame[..., 0, :] = 1.0  # a band along the top edge of the image
    inner[..., 7, :] = 1.0  # the same band inside the image
    # delta is zero outside the image, so the band on the frame costs at least as much as inside
    assert total_variation(frame) >= 0.5 * total_variation(inner) > 0
    assert total_variation(torch.ones(1, 1, 16, 16)) > 0  # a global shift is not free either

    # common-mode penalty: the same change for every edit costs more than different changes
    g = freeze(tiny_generator())
    m = tiny_manipulator()
    x = images_tensor(make_dataset(4, seed=6, size=SIZE))
    no_ident = torch.tensor([False] * 4)

    def common_of(delta):
        m.forward = lambda images, cond: delta  # a stand-in residual
        return manipulator_losses(m, g, x, ["No pneumothorax."] * 4, torch.zeros(4, 96), no_ident, {"common": 1.0})["common"]

    shared = torch.zeros(4, 1, SIZE, SIZE)
    shared[:, :, 2:6, 2:6] = 0.5
    distinct = torch.zeros(4, 1, SIZE, SIZE)
    for k in range(4):
        distinct[k, :, 2 + 6 * k : 6 + 6 * k, 2:6] = 0.5
    assert common_of(shared) > 2 * common_of(distinct)


def test_manipulator_condition_needs_the_current_report():
    import pytest

    m = tiny_manipulator()
    with pytest.raises(ValueError):
        m.encode_reports(["No pneumothorax."])
    same = m.encode_reports(["No pneumothorax."], ["No pneumothorax."])
    assert same[0, 48:].abs().sum() == 0  # t' = t: "change nothing"


def test_refinement_lowers_the_objective_per_image_and_leaves_the_generator_alone():
    g = freeze(tiny_generator())
    m = tiny_manipulator()
    m.loss_weights = {"l1": 5.0, "margin": 0.2}
    m.cfg.refine_steps, m.cfg.refine_lr, m.cfg.refine_weights = 30, 0.01, {}
    x = images_tensor(make_dataset(3, seed=5, size=SIZE))
    base = ["The heart is normal in size. No pleural effusion."] * 3
    edited = ["The heart is enlarged. No pleural effusion."] * 3
    g_before = [p.clone() for p in g.parameters()]
    # give M a non-zero residual, so that the two starting points differ
    torch.nn.init.normal_(m.out.bias, std=0.05)
    alone = m.manipulate(x, edited, base)
    assert not torch.equal(alone, x)
    def objective(x_new, rows=slice(None)):
        d = x_new - x[rows]
        return report_nll(g, x_new, edited[rows], 0.2) + 5.0 * d.abs().flatten(1).mean(1)

    for init, start in (("manipulator", alone), ("zero", x)):
        refined = m.manipulate(x, edited, base, gen=g, init=init)
        assert (objective(refined) < objective(start) - 1e-3).all()  # every image's own objective falls
        # each image is refined on its own: the result does not depend on the rest of the batch (up to
        # rounding, which Adam's per-element normalisation amplifies where L1 holds a pixel near zero)
        single = m.manipulate(x[1:2], edited[1:2], base[1:2], gen=g, init=init)
        assert (single - refined[1:2]).abs().max() < 0.02
        assert torch.allclose(objective(single, slice(1, 2)), objective(refined)[1:2], rtol=0.02)
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(g_before, g.parameters(), strict=True))
    # the refinement's own weight overrides apply: a large total variation gives a smoother change
    from cvlm.manipulator import total_variation

    rough = m.manipulate(x, edited, base, gen=g, init="zero")
    m.cfg.refine_weights = {"tv": 50.0}
    assert (total_variation(m.manipulate(x, edited, base, gen=g, init="zero") - x) < total_variation(rough - x)).all()
    m.cfg.refine_weights = {}
    # from zero, M's residual plays no part
    m.cfg.refine_init = "zero"
    from_zero = m.manipulate(x, edited, base, gen=g)
    torch.nn.init.normal_(m.out.bias, std=0.05)  # another M
    assert torch.allclose(m.manipulate(x, edited, base, gen=g), from_zero, atol=1e-6)
    # steps = 0 is M alone, and the weights M was trained with travel with its state
    m.cfg.refine_steps = 0
    assert torch.equal(m.manipulate(x, edited, base, gen=g), m.manipulate(x, edited, base))
    assert Manipulator.from_state(m.state()).loss_weights == {"l1": 5.0, "margin": 0.2}
    with pytest.raises(ValueError, match="refine_init"):
        ManipulatorConfig(refine_init="random")
