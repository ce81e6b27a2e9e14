"""Explanation maps for an edit t -> t' of a generator's report: CVLM and three baselines.

All maps are (B, H, W), larger = more responsible. The baselines explain the *same* quantity the
edit is about, the contrastive score ``s(x) = log p(t | x) - log p(t' | x)`` of the frozen
generator (how much the image supports the current report over the edited one), so every method
answers the same question on the same model:

- CVLM: ``|x' - x|`` with ``x' = clip(x + M(x, t'))``, optionally refined per image.
- Grad-CAM: gradient-weighted activations of the generator's last spatial feature map, upsampled.
- Integrated gradients: ``(x - x0) * mean_alpha grad s(x0 + alpha (x - x0))``, black baseline x0,
  absolute value.
- Occlusion: drop of s when a square patch is replaced by the image mean, averaged over patches.

Written in plain torch (a few lines each) rather than with captum, to keep dependencies small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .generator import FeatureGenerator, ReportGenerator
from .manipulator import Manipulator


def contrastive_score(gen: ReportGenerator, images: Tensor, t: list[str], t_new: list[str]) -> Tensor:
    return gen.report_log_likelihood(images, t) - gen.report_log_likelihood(images, t_new)


def cvlm_map(
    manip: Manipulator,
    images: Tensor,
    t_new: list[str],
    t: list[str] | None = None,
    gen: ReportGenerator | None = None,
    init: str | None = None,
) -> tuple[Tensor, Tensor]:
    """The manipulated images x' and the CVLM map |x' - x| for the edit t -> t': M alone without
    ``gen``; with it, refined through the generator (``Manipulator.manipulate``, ``init``)."""
    x_new = manip.manipulate(images, t_new, t, gen=gen, init=init).detach()
    return x_new, (x_new - images).abs()[:, 0]


def gradcam(gen: FeatureGenerator, images: Tensor, t: list[str], t_new: list[str]) -> Tensor:
    feats = gen.encode(images).detach().requires_grad_(True)
    s = gen.log_likelihood_from_features(feats, t) - gen.log_likelihood_from_features(feats, t_new)
    (grad,) = torch.autograd.grad(s.sum(), feats)
    w = grad.mean((2, 3), keepdim=True)
    cam = F.relu((w * feats).sum(1, keepdim=True))
    return F.interpolate(cam.detach(), size=images.shape[-2:], mode="bilinear")[:, 0]


def integrated_gradients(
    gen: ReportGenerator, images: Tensor, t: list[str], t_new: list[str], steps: int = 16
) -> Tensor:
    base = torch.zeros_like(images)
    total = torch.zeros_like(images)
    for k in range(steps):  # midpoint Riemann sum
        alpha = (k + 0.5) / steps
        xi = (base + alpha * (images - base)).detach().requires_grad_(True)
        s = contrastive_score(gen, xi, t, t_new)
        (g,) = torch.autograd.grad(s.sum(), xi)
        total += g
    return ((images - base) * total / steps).abs()[:, 0]


@torch.no_grad()
def occlusion(
    gen: ReportGenerator, images: Tensor, t: list[str], t_new: list[str], patch: int | None = None,
    stride: int | None = None,
) -> Tensor:
    """Patch = 1/8 of the image side, stride = half a patch unless given."""
    B, _, H, W = images.shape
    patch = patch or max(2, H // 8)
    stride = stride or max(1, patch // 2)
    s0 = contrastive_score(gen, images, t, t_new)
    heat = torch.zeros(B, H, W, device=images.device)
    count = torch.zeros(B, H, W, device=images.device)
    fill = images.mean((1, 2, 3), keepdim=True)
    for y in range(0, H - patch + 1, stride):
        for x in range(0, W - patch + 1, stride):
            xo = images.clone()
            xo[:, :, y : y + patch, x : x + patch] = fill
            drop = s0 - contrastive_score(gen, xo, t, t_new)
            heat[:, y : y + patch, x : x + patch] += drop[:, None, None]
            count[:, y : y + patch, x : x + patch] += 1
    return F.relu(heat / count.clamp_min(1))


BASELINES = ("gradcam", "ig", "occlusion")


def baseline_maps(gen: FeatureGenerator, images: Tensor, t: list[str], t_new: list[str]) -> dict[str, Tensor]:
    return {
        "gradcam": gradcam(gen, images, t, t_new),
        "ig": integrated_gradients(gen, images, t, t_new),
        "occlusion": occlusion(gen, images, t, t_new),
    }
