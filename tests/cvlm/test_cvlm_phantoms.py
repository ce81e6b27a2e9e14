"""Phantom anatomy and finding masks."""

import numpy as np

from cvlm.phantoms import FINDINGS, MARKER_NAME, Finding, lung_bank, make_dataset, render, xrv_data_dir

SIZE = 64


def _all(side="right"):
    return {
        "cardiomegaly": Finding("cardiomegaly"),
        "effusion": Finding("effusion", side, None, "large"),
        "pneumothorax": Finding("pneumothorax", side),
        "opacity": Finding("opacity", side, "lower"),
        "nodule": Finding("nodule", side, "upper", "large"),
        "device": Finding("device", side),
    }


def test_lungs_come_from_real_masks_when_available():
    bank = lung_bank(SIZE)
    if xrv_data_dir() is not None:
        assert len(bank) > 50  # the v7labs masks, not the analytic fallback
    for m in bank[:20]:
        assert m.shape == (SIZE, SIZE) and 0.15 < m.mean() < 0.6


def test_every_finding_has_a_mask_on_its_side():
    for side in ("right", "left"):
        p = render(_all(side), seed=3, size=SIZE, marker=True)
        assert p.image.shape == (SIZE, SIZE) and 0 <= p.image.min() and p.image.max() <= 1
        for n in FINDINGS:
            assert p.masks[n].any(), n
        for n in ("effusion", "pneumothorax", "opacity", "nodule"):
            ys, xs = np.nonzero(p.masks[n])
            # radiological convention: the patient's right is on the image's left
            assert (xs.mean() < SIZE / 2) == (side == "right"), (n, side)
        assert p.masks[MARKER_NAME].any()


def test_same_seed_is_a_counterfactual_pair():
    a = render({}, seed=5, size=SIZE)
    f = {"nodule": Finding("nodule", "left", "mid", "large")}
    b = render(f, seed=5, size=SIZE)
    diff = np.abs(a.image - b.image) > 0.05
    assert diff.any()
    assert (diff & ~b.masks["nodule"]).sum() == 0  # the image changes only inside the finding mask


def test_shortcut_marker_follows_the_finding():
    ds = make_dataset(60, seed=9, size=32, shortcut="cardiomegaly")
    for p in ds:
        assert (MARKER_NAME in p.masks) == ("cardiomegaly" in p.findings)
