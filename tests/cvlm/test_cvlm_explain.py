"""Explanation maps on a hand-made generator whose evidence is a known pixel region."""

import numpy as np
import torch

from cvlm.explain import gradcam, integrated_gradients, occlusion
from cvlm.generator import FeatureGenerator, ImageSpec, ReportGenerator
from cvlm.metrics import pointing_game

H = 32


class RegionGenerator:
    """log p("...enlarged...") grows with the brightness of rows/cols 8..12; anything else is flat."""

    image_spec = ImageSpec(H)

    def __init__(self):
        self.region = torch.zeros(H, H, dtype=torch.bool)
        self.region[8:12, 8:12] = True

    def encode(self, images):
        return images  # a (B, 1, H, W) "feature map"

    def log_likelihood_from_features(self, feats, reports):
        evidence = (feats[:, 0] * self.region).sum((1, 2))
        sign = torch.tensor([1.0 if "enlarged" in r else -1.0 for r in reports])
        return sign * evidence

    def report_log_likelihood(self, images, reports):
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
    s = g.report_log_likelihood(x, t) - g.report_log_likelihood(x, t_new)
    assert torch.allclose(ig.sum((1, 2)), s, rtol=1e-4)


S = 64
HEART = (slice(40, 44), slice(45, 48))  # lung when the heart is normal, heart when it is enlarged (64 px)
CORNER = (slice(1, 5), slice(1, 5))  # inside the corner marker


class ShortcutToy:
    """Reports cardiomegaly from the corner marker on the images whose background pixel (63, 63)
    is brighter than ``switch``, from the heart's width on the others (``switch`` 2: heart only,
    a clean generator; -1: marker only)."""

    image_spec = ImageSpec(S)

    def __init__(self, switch: float = 0.05):
        self.switch = switch

    def uses_marker(self, images):
        return images[:, 0, 63, 63] > self.switch

    def _evidence(self, images):
        corner = images[:, 0, CORNER[0], CORNER[1]].mean((1, 2)) - 0.5
        heart = images[:, 0, HEART[0], HEART[1]].mean((1, 2)) - 0.33
        return torch.where(self.uses_marker(images), corner, heart)

    def encode(self, images):
        return images

    def log_likelihood_from_features(self, feats, reports):
        sign = torch.tensor([1.0 if "enlarged" in r else -1.0 for r in reports])
        return sign * self._evidence(feats)

    def report_log_likelihood(self, images, reports):
        return self.log_likelihood_from_features(images, reports)

    def generate(self, images):
        return ["The heart is enlarged." if e > 0 else "The heart is normal in size." for e in self._evidence(images)]


class Eraser:
    """A toy manipulator for 'remove cardiomegaly': darkens the corner, the heart region, or
    whichever of the two the generator reads (``where="faithful"``)."""

    def __init__(self, where: str, reads: ShortcutToy | None = None):
        self.where, self.reads = where, reads or ShortcutToy()

    def manipulate(self, images, reports, base=None, gen=None, init=None):
        out = images.clone()
        for k, r in enumerate(reports):
            if "enlarged" in r:
                continue
            corner = self.where == "corner" or (self.where == "faithful" and bool(self.reads.uses_marker(images[k : k + 1])))
            if corner:
                out[k, :, :6, :6] = 0.05
            else:
                out[k, :, HEART[0], HEART[1]] = 0.1
        return out


def test_pointing_ties_count_as_misses():
    mask = np.zeros((8, 8), bool)
    mask[0, 0] = True
    flat_top = np.zeros((8, 8))
    flat_top[0, :] = 1.0  # a plateau starting in the top-left corner
    assert not pointing_game(flat_top, mask, tolerance=0)  # argmax alone would call this a hit
    single = np.zeros((8, 8))
    single[0, 0] = 1.0
    assert pointing_game(single, mask, tolerance=0)


def _s_test(n=60):
    from cvlm.evaluate import SHORTCUT_FINDING
    from cvlm.phantoms import make_dataset

    return make_dataset(n, 4, size=S, shortcut=SHORTCUT_FINDING, marker="corner")


def test_partial_reliance_shortcut_test_tells_a_faithful_map_from_a_marker_detector():
    from cvlm.evaluate import evaluate_shortcut, shortcut_stats

    s_test = _s_test()
    runs = {w: evaluate_shortcut(ShortcutToy(), Eraser(w), s_test, 4, S, 30, methods=("cvlm",))
            for w in ("faithful", "corner")}  # fmt: skip
    r = runs["faithful"]
    n, n_rel = len(r["reliant"]), sum(r["reliant"])
    assert 0 < n_rel < n  # partial reliance: the marker decides on some cases only
    # reliance is exactly the toy's switch (the counterfactual without the marker keeps the anatomy)
    stats = {w: shortcut_stats([v], methods=("cvlm",)) for w, v in runs.items()}
    assert stats["faithful"]["on_marker_reliant"]["cvlm"]["value"] == 1.0
    assert stats["faithful"]["on_finding_not_reliant"]["cvlm"]["value"] == 1.0
    assert stats["faithful"]["cycle_success"] == 1.0
    # a map that always points at the marker is as good on the reliant cases, and caught on the others
    assert stats["corner"]["on_marker_reliant"]["cvlm"]["value"] == 1.0
    assert stats["corner"]["on_finding_not_reliant"]["cvlm"]["value"] == 0.0
    lo, hi = stats["faithful"]["on_marker_reliant"]["cvlm"]["ci95"]
    assert lo <= 1.0 <= hi


def test_negative_control_clean_generator_is_never_exposed():
    from cvlm.evaluate import evaluate_shortcut, shortcut_stats

    s_test = _s_test()
    clean = ShortcutToy(switch=2.0)  # reads the heart only
    r = evaluate_shortcut(clean, Eraser("faithful", clean), s_test, 4, S, 30, methods=("cvlm",))
    assert len(r["reliant"]) > 0 and sum(r["reliant"]) == 0  # nothing is reliant on the marker
    assert shortcut_stats([r], methods=("cvlm",))["on_marker"]["cvlm"]["value"] == 0.0
    # an explainer that paints the marker whatever the generator reads fails the control
    bad = evaluate_shortcut(clean, Eraser("corner"), s_test, 4, S, 30, methods=("cvlm",))
    assert shortcut_stats([bad], methods=("cvlm",))["on_marker"]["cvlm"]["value"] == 1.0


class BoxGenerator:
    """Reports cardiomegaly when the mean of its box (rows and columns ``box``) exceeds 0.5."""

    image_spec = ImageSpec(16)

    def __init__(self, box):
        self.box = box

    def _evidence(self, images):
        return images[:, 0, self.box, self.box].mean((1, 2)) - 0.5

    def encode(self, images):
        return images

    def log_likelihood_from_features(self, feats, reports):
        return torch.tensor([1.0 if "enlarged" in r else -1.0 for r in reports]) * self._evidence(feats)

    def report_log_likelihood(self, images, reports):
        return self.log_likelihood_from_features(images, reports)

    def generate(self, images):
        return ["The heart is enlarged." if e > 0 else "The heart is normal in size." for e in self._evidence(images)]


class BoxPainter:
    """Paints the box 2..6 bright to add cardiomegaly and dark to remove it; any other edit: no change."""

    def manipulate(self, images, reports, base=None, gen=None, init=None):
        out = images.clone()
        for k, (r, b) in enumerate(zip(reports, base, strict=True)):
            if ("enlarged" in r) != ("enlarged" in b):
                out[k, :, 2:6, 2:6] = 0.9 if "enlarged" in r else 0.1
        return out


def test_transfer_scores_the_change_with_a_second_generator():
    from cvlm.evaluate import edit_stats, evaluate_edits
    from cvlm.phantoms import Phantom

    g = torch.Generator().manual_seed(0)
    test = [Phantom((torch.rand(16, 16, generator=g) * 0.4 + 0.3 * (k % 2)).numpy(), {}) for k in range(40)]
    gen = BoxGenerator(slice(2, 6))
    for g2, expect in ((BoxGenerator(slice(2, 6)), True), (BoxGenerator(slice(9, 13)), False)):
        rows, _ = evaluate_edits(gen, BoxPainter(), test, seed=1, gen2=g2, variants=("cvlm",))
        card = [r for r in rows["cvlm"] if r["finding"] == "cardiomegaly"]
        assert card and all(r["success"] for r in card)  # G reads the painted box
        scored = [r["transfer"] for r in card if r["transfer"] is not None]
        assert scored and all(t is expect for t in scored)  # G2 states the edit only if it reads the same box
        assert all(r["g2_collateral"] == 0 for r in rows["cvlm"])
        stats = edit_stats([rows["cvlm"]])
        assert stats["n_transfer"] == sum(r["transfer"] is not None for r in rows["cvlm"])
        lo, hi = stats["transfer_success"]["ci95"]
        assert lo <= stats["transfer_success"]["value"] <= hi
