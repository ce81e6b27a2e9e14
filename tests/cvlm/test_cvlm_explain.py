"""Explanation maps on a hand-made generator whose evidence is a known pixel region."""

import torch

from cvlm.explain import gradcam, integrated_gradients, occlusion
from cvlm.generator import FeatureGenerator, ReportGenerator
from cvlm.metrics import pointing_game
from cvlm.reports import Tokenizer

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
