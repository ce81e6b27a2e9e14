"""Every metric on hand-made cases."""

import numpy as np

from cvlm.metrics import auroc, collateral_changes, cycle_success, pointing_game, topk_iou
from cvlm.phantoms import Finding
from cvlm.report_text import Edit

EFF_R = Finding("effusion", "right", None, "small")
EFF_L = Finding("effusion", "left", None, "small")
NOD = Finding("nodule", "left", "upper", "small")


def _mask():
    m = np.zeros((16, 16), bool)
    m[4:8, 4:8] = True
    return m


def test_pointing_game():
    m = _mask()
    s = np.zeros((16, 16))
    s[5, 5] = 1
    assert pointing_game(s, m)
    s = np.zeros((16, 16))
    s[9, 9] = 1  # one pixel outside the mask: inside the 2-px tolerance
    assert pointing_game(s, m, tolerance=2) and not pointing_game(s, m, tolerance=0)
    s = np.zeros((16, 16))
    s[15, 15] = 1
    assert not pointing_game(s, m)
    assert not pointing_game(np.ones((16, 16)), m)  # a flat map points nowhere


def test_topk_iou():
    m = _mask()
    assert topk_iou(m.astype(float), m) == 1.0
    s = np.zeros((16, 16))
    s[4:8, 6:10] = 1  # half of the top-16 pixels overlap the mask: IoU = 8 / 24
    assert abs(topk_iou(s, m) - 8 / 24) < 1e-9
    assert topk_iou(s, np.zeros((16, 16), bool)) == 0.0


def test_auroc():
    m = _mask()
    assert auroc(m.astype(float), m) == 1.0
    assert auroc(-m.astype(float), m) == 0.0
    assert auroc(np.zeros((16, 16)), m) == 0.5  # all tied
    rng = np.random.default_rng(0)
    assert abs(auroc(rng.random((64, 64)), rng.random((64, 64)) < 0.2) - 0.5) < 0.03
    # a hand-checkable case: scores 1,2,3,4 with positives {2,4}: pairs (2>1,4>1,4>3) win, (2<3) loses
    assert auroc(np.array([1.0, 2, 3, 4]), np.array([False, True, False, True])) == 0.75


def test_cycle_success_and_collateral():
    before = {"effusion": EFF_R, "nodule": NOD}
    flip = Edit("flip", EFF_L, "effusion")
    assert cycle_success(flip, before, {"effusion": EFF_L, "nodule": NOD})
    assert not cycle_success(flip, before, {"effusion": EFF_R, "nodule": NOD})
    assert not cycle_success(flip, before, {"nodule": NOD})  # removed instead of flipped
    assert collateral_changes(flip, before, {"effusion": EFF_L, "nodule": NOD}) == (0, 5)
    # the nodule vanished and cardiomegaly appeared: two collateral changes out of five
    after = {"effusion": EFF_L, "cardiomegaly": Finding("cardiomegaly")}
    assert collateral_changes(flip, before, after) == (2, 5)
    remove = Edit("remove", NOD, "nodule")
    assert cycle_success(remove, before, {"effusion": EFF_R})
    add = Edit("add", Finding("cardiomegaly"), "cardiomegaly")
    assert cycle_success(add, before, {**before, "cardiomegaly": Finding("cardiomegaly")})
