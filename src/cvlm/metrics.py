"""Faithfulness metrics: cycle success, collateral change, pointing game, IoU and AUROC.

All functions take plain numpy arrays / findings so that they can be checked on hand-made cases.
"""

from __future__ import annotations

import numpy as np

from .phantoms import FINDINGS, Findings, dilate
from .report_text import Edit, state


def cycle_success(edit: Edit, before: Findings, after: Findings) -> bool:
    """Does the regenerated report (labelled ``after``) state the edit applied to ``before``?"""
    target = edit.apply(before)
    return state(after, edit.name) == state(target, edit.name)


def collateral_changes(edit: Edit, before: Findings, after: Findings) -> tuple[int, int]:
    """(number of findings other than the edited one whose state changed, number of others)."""
    others = [n for n in FINDINGS if n != edit.name]
    changed = sum(state(before, n) != state(after, n) for n in others)
    return changed, len(others)


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance: int = 2) -> bool:
    """Hit when the map's maximum lies in the mask dilated by ``tolerance`` pixels.

    Ties count against the map: the hit needs *every* pixel that attains the maximum inside the
    dilated mask (``argmax`` would pick the first, top-left one, and reward a flat map whose
    plateau happens to start in the upper-left findings). A constant map is therefore a miss.
    """
    if not mask.any() or np.ptp(saliency) == 0:
        return False
    top = saliency == saliency.max()
    return bool(dilate(mask.astype(bool), tolerance)[top].all())


def topk_iou(saliency: np.ndarray, mask: np.ndarray) -> float:
    """IoU between the mask and the map's top-k pixels, k = mask area (no threshold to tune)."""
    k = int(mask.sum())
    if k == 0:
        return 0.0
    order = np.argsort(-saliency.ravel(), kind="stable")[:k]
    top = np.zeros(saliency.size, bool)
    top[order] = True
    m = mask.ravel().astype(bool)
    return float((top & m).sum() / (top | m).sum())


def auroc(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Pixel-level AUROC of the map as a detector of mask pixels (ties count one half)."""
    s = saliency.ravel().astype(np.float64)
    m = mask.ravel().astype(bool)
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inv]  # 1-based average ranks (ties share)
    return float((ranks[m].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
