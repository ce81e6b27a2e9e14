"""Explanation maps on a hand-made generator whose evidence is a known pixel region."""

import torch

from cvlm.explain import gradcam, integrated_gradients, occlusion
from cvlm.generator import FeatureGenerator, ReportGenerator
from cvlm.metrics import pointing_game
from cvlm.report_text import Tokenizer

H = 32


class RegionGenerator:
    """log p("...enlarged...") grows with the brightness of rows/cols 8..12; anything else is flat."""

    tokenizer = Tokenizer()

    def __init__(self):
        self.region = torch.zeros(H, H, dtype=torch.bool)
        self.region[8:12, 8:12] = True

    def encode(self, images):
        return images  # a (B, 1, H, W) "feature map"

    def log_likelihood_from_features(self, feats, reports):
        evidence = (feats[:, 0] * self.region).sum((1, 2))
        sign = torch.tensor([1.0 if "enlarged" in r else -1.0 for r in reports])
        return sign * evidence

    def log_likelihood(self, images, reports):
        return self.log_likelihood_from_features(self.encode(images), reports)

    def generate(self, images):
        return ["The heart is enlarged." if e > 1 else "The heart is normal in size."
                for e in (images[:, 0] * self.region).sum((1, 2))]


def test_toy_generator_satisfies_the_interfaces():
    g = RegionGenerator()
    assert isinstance(g, ReportGenerator) and isinstance(g, FeatureGenerator)


def test_baselines_point_at_the_evidence():
    g = RegionGenerator()
    torch.manual_seed(0)
    x = torch.rand(3, 1, H, H) * 0.3
    x[:, :, 8:12, 8:12] += 0.5
    t, t_new = ["The heart is enlarged."] * 3, ["The heart is normal in size."] * 3
    mask = g.region.numpy()
    for m in (gradcam(g, x, t, t_new), integrated_gradients(g, x, t, t_new, steps=4),
              occlusion(g, x, t, t_new, patch=4, stride=4)):
        assert m.shape == (3, H, H)
        for k in range(3):
            assert pointing_game(m[k].detach().numpy(), mask, tolerance=0)


def test_integrated_gradients_completeness():
    # for a linear score IG is exact: attributions sum to s(x) - s(0)
    g = RegionGenerator()
    x = torch.rand(2, 1, H, H)
    t, t_new = ["enlarged"] * 2, ["normal"] * 2
    ig = integrated_gradients(g, x, t, t_new, steps=3)  # |.| of non-negative terms here
    s = g.log_likelihood(x, t) - g.log_likelihood(x, t_new)
    assert torch.allclose(ig.sum((1, 2)), s, rtol=1e-4)


class MarkerGenerator:
    """Reports cardiomegaly exactly when the top-left corner (where the planted marker sits) is
    bright: a generator that relies on the shortcut only (``always`` = ignores the image)."""

    tokenizer = Tokenizer()

    def __init__(self, always: bool = False):
        self.always = always

    def _evidence(self, images):
        return images[:, 0, 1:5, 1:5].mean((1, 2))

    def encode(self, images):
        return images

    def log_likelihood_from_features(self, feats, reports):
        sign = torch.tensor([1.0 if "enlarged" in r else -1.0 for r in reports])
        return sign * self._evidence(feats)

    def log_likelihood(self, images, reports):
        return self.log_likelihood_from_features(images, reports)

    def generate(self, images):
        return ["The heart is enlarged." if self.always or e > 0.5 else "The heart is normal in size."
                for e in self._evidence(images)]


class CornerEraser:
    """A manipulator that darkens the corner when the edited report drops cardiomegaly."""

    def manipulate(self, images, reports, base=None, gen=None, init=None):
        out = images.clone()
        for k, r in enumerate(reports):
            if "enlarged" not in r:
                out[k, :, :6, :6] = 0.05
        return out


class NoChange:
    def manipulate(self, images, reports, base=None, gen=None, init=None):
        return images.clone()


def test_shortcut_evaluation_scores_reliant_cases_on_the_marker():
    from cvlm.phantoms import make_dataset
    from cvlm.pipeline import SHORTCUT_FINDING, DemoConfig, evaluate_shortcut

    cfg = DemoConfig(size=64, n_short=4, seed=0)
    s_test = make_dataset(16, cfg.seed * 10 + 4, size=64, shortcut=SHORTCUT_FINDING)
    assert any(SHORTCUT_FINDING in p.findings for p in s_test)
    res = evaluate_shortcut(MarkerGenerator(), CornerEraser(), s_test, cfg)
    assert res["n_cases"] > 0 and res["n_reliant"] == res["n_cases"]  # removing the marker flips every report
    assert res["reports_finding_without_marker"] == 0.0 and res["reports_finding_with_marker_only"] == 1.0
    assert res["cycle_success"] == 1.0 and res["on_marker_reliant"]["cvlm"] == 1.0
    # a manipulator that changes nothing exposes nothing (a constant map has no maximum)
    assert evaluate_shortcut(MarkerGenerator(), NoChange(), s_test, cfg)["on_marker_reliant"]["cvlm"] == 0.0
    # a generator that does not look at the marker is never reliant, so nothing can be exposed
    res = evaluate_shortcut(MarkerGenerator(always=True), CornerEraser(), s_test, cfg)
    assert res["n_reliant"] == 0 and res["on_marker_reliant"]["cvlm"] == 0.0 and res["cycle_success"] == 0.0
