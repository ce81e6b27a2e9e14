"""The manipulator M: (image x, edited report t') -> residual delta, x' = x + delta.

A small U-Net (with coordinate channels, so that words like "left upper" can be mapped to places)
whose every level is FiLM-modulated by an encoding of t'. The report is read through the
rule-based labeller into a 48-d finding vector (per finding: present, side, zone, size one-hots)
and an MLP: a learnt transformer text encoder (mean-pooled) was tried first and, within the
CPU budget of the demo (500 steps), ignored the text and learnt one edit-agnostic change; the
labeller encoding makes the few words an edit changes impossible to average away. The residual is predicted at half
resolution and upsampled: a smooth, blob-like change is what an edit to a finding should look
like, and it makes pixel-level adversarial noise (which would fool G without explaining it)
harder to produce. The last layer starts at zero, so M starts as the identity. By default the
condition also carries the change v(t') - v(t) from the generator's current report t.

M needs nothing of the generator but the ``ReportGenerator`` interface: the edited report goes in
as text, so any generator (the phantom CNN, a Hugging Face vision-encoder-decoder) can be
explained, and x' is clipped to the valid range [0, 1] inside every optimisation (``clip``).

Losses (CVLM, arXiv 2411.05261): cycle = summed token NLL of t' under the frozen generator
at x' (gradient flows through G into x' and M; optionally hinged per token), proximity = L1 + total
variation of delta, identity = L1 of delta when t' = t, and an optional common-mode penalty on
the part of |delta| that the batch's edits share (``manipulator_losses``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .generator import ReportGenerator, report_nll
from .report_text import REPORT_DIM, report_vector


@dataclass
class ManipulatorConfig:
    channels: tuple[int, ...] = (16, 32, 64)
    d_text: int = 64
    max_len: int = 72
    # condition on the change as well: [v(t'), v(t') - v(t)] with t the generator's current report
    # of x (known whenever an edit is explained), so "what to change" is explicit and t' = t reads
    # as "change nothing"; False = v(t') only (the first design)
    condition_on_change: bool = True
    # coordinate channels (y, x) as extra inputs: they let M place an added finding by position,
    # but also let it paint bands along the image frame; "zeros" or "replicate" convolution padding
    coords: bool = True
    padding_mode: str = "zeros"
    # per-image refinement: when the generator is at hand, ``refine_steps`` Adam steps (learning
    # rate ``refine_lr``) on the image's own copy of the objective M was trained on (cycle + L1 +
    # total variation), starting from M's residual ("manipulator") or from zero ("zero": the
    # objective solved for this image alone, M unused). 0 steps = M alone, one forward pass.
    # The demo chooses the start and the total-variation weight on a validation split.
    refine_steps: int = 200
    refine_lr: float = 5e-3
    refine_init: str = "manipulator"
    # overrides of M's training weights for the refinement: a strong total variation makes the
    # refined change one compact region instead of speckle, while M itself trains at the default
    # 0.3 (trained at 10, M can collapse to the identity; docs/cvlm.md)
    refine_weights: dict[str, float] = field(default_factory=lambda: {"tv": 10.0})
    # x' = clip(x + delta, 0, 1) in training, refinement and output: a change that leaves the
    # valid intensity range cannot be saved as an image, so it must not count as an explanation
    clip: bool = True

    def __post_init__(self) -> None:
        if self.refine_init not in REFINE_INITS:
            raise ValueError(f"refine_init: expected one of {', '.join(REFINE_INITS)}, got {self.refine_init!r}")
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps: expected a number >= 0, got {self.refine_steps}")


# "margin": per-token hinge of the cycle loss in nats (``generator.report_nll``)
# "common": penalty on the part of |delta| shared by the batch's different edits (see below)
REFINE_INITS = ("zero", "manipulator")
DEFAULT_WEIGHTS = {"cycle": 1.0, "l1": 1.0, "tv": 0.3, "identity": 10.0, "margin": 0.0, "common": 0.0}




class TextEncoder(nn.Module):
    """Report vector (labeller) -> MLP -> conditioning vector."""

    def __init__(self, d: int, n_in: int = REPORT_DIM):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(n_in, d), nn.GELU(), nn.Linear(d, d), nn.GELU())

    def forward(self, cond: Tensor) -> Tensor:
        return self.mlp(cond)


class FiLMBlock(nn.Module):
    """conv -> GroupNorm -> FiLM(gamma, beta from text) -> GELU."""

    def __init__(self, c_in: int, c_out: int, d_text: int, stride: int = 1, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, padding_mode=padding_mode)
        self.n1 = nn.GroupNorm(8, c_out)
        self.film = nn.Linear(d_text, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        g1, b1 = self.film(c)[..., None, None].chunk(2, 1)
        return F.gelu(self.n1(self.conv1(x)) * (1 + g1) + b1)


class Manipulator(nn.Module):
    """U-Net residual generator conditioned on the edited report by FiLM."""

    def __init__(self, cfg: ManipulatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or ManipulatorConfig()
        c1, c2, c3 = cfg.channels
        d = cfg.d_text
        self.text = TextEncoder(d, REPORT_DIM * (2 if cfg.condition_on_change else 1))
        pm = cfg.padding_mode
        self.e1 = FiLMBlock(3 if cfg.coords else 1, c1, d, stride=2, padding_mode=pm)  # 1/2
        self.e2 = FiLMBlock(c1, c2, d, stride=2, padding_mode=pm)  # 1/4
        self.e3 = FiLMBlock(c2, c3, d, stride=2, padding_mode=pm)  # 1/8
        self.mid = FiLMBlock(c3, c3, d, padding_mode=pm)
        self.mid2 = FiLMBlock(c3, c3, d, padding_mode=pm)
        self.d2 = FiLMBlock(c3 + c2, c2, d, padding_mode=pm)
        self.d1 = FiLMBlock(c2 + c1, c1, d, padding_mode=pm)
        self.out = nn.Conv2d(c1, 1, 3, padding=1, padding_mode=pm)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # the loss weights M was trained with (set by ``train_manipulator``, saved with M): the
        # refinement optimises the same objective
        self.loss_weights: dict[str, float] = {}

    def forward(self, images: Tensor, cond: Tensor) -> Tensor:
        """The residual delta (B, 1, H, W) for images (B, 1, H, W) and conditions from ``encode_reports``."""
        B, _, H, W = images.shape
        c = self.text(cond)
        ys = torch.linspace(-1, 1, H, device=images.device).view(1, 1, H, 1).expand(B, 1, H, W)
        xs = torch.linspace(-1, 1, W, device=images.device).view(1, 1, 1, W).expand(B, 1, H, W)
        inp = torch.cat([(images - 0.3) / 0.2, ys, xs], 1) if self.cfg.coords else (images - 0.3) / 0.2
        h1 = self.e1(inp, c)
        h2 = self.e2(h1, c)
        h3 = self.mid2(self.mid(self.e3(h2, c), c), c)
        u2 = self.d2(torch.cat([F.interpolate(h3, size=h2.shape[-2:], mode="bilinear"), h2], 1), c)
        u1 = self.d1(torch.cat([F.interpolate(u2, size=h1.shape[-2:], mode="bilinear"), h1], 1), c)
        delta = F.interpolate(self.out(u1), size=(H, W), mode="bilinear")
        return torch.tanh(delta)

    def encode_reports(self, reports: list[str], base: list[str] | None = None) -> Tensor:
        """M's condition for edited reports t' (``reports``) of images whose current reports are
        ``base`` (required when ``condition_on_change``)."""
        device = self.out.weight.device  # the condition lives where M does
        v = torch.tensor([report_vector(r) for r in reports], dtype=torch.float32)
        if not self.cfg.condition_on_change:
            return v.to(device)
        if base is None or len(base) != len(reports):
            raise ValueError("this manipulator is conditioned on the edit: pass the current reports t as base")
        return torch.cat([v, v - torch.tensor([report_vector(r) for r in base], dtype=torch.float32)], 1).to(device)

    def manipulate(
        self,
        images: Tensor,
        reports: list[str],
        base: list[str] | None = None,
        gen: ReportGenerator | None = None,
        init: str | None = None,
    ) -> Tensor:
        """x' = x + M(x, t') for edited report strings t' of images whose current reports are ``base``;
        with the (frozen) generator ``gen`` and ``cfg.refine_steps`` > 0, x' = x + the refined
        change (``refine``, from zero or from M's residual: ``init``, by default ``cfg.refine_init``)."""
        if gen is not None and self.cfg.refine_steps > 0 and (init or self.cfg.refine_init) == "zero":
            return self.apply_delta(images, self.refine(gen, images, torch.zeros_like(images), reports))
        with torch.no_grad():
            delta = self(images, self.encode_reports(reports, base).to(images.device))
        if gen is not None and self.cfg.refine_steps > 0:
            delta = self.refine(gen, images, delta, reports)
        return self.apply_delta(images, delta)

    def apply_delta(self, images: Tensor, delta: Tensor) -> Tensor:
        """x' = x + delta, clipped to [0, 1] when ``cfg.clip``."""
        return (images + delta).clamp(0, 1) if self.cfg.clip else images + delta

    def refine(self, gen: ReportGenerator, images: Tensor, delta: Tensor, reports: list[str]) -> Tensor:
        """``cfg.refine_steps`` Adam steps on ``delta`` (the starting change) on the per-image
        objective M was trained on: cycle (with its hinge) + L1 + total variation, with M's
        training weights overridden by ``cfg.refine_weights``.

        Why: M is amortised - one network for every image and edit - and within the demo's CPU
        budget it reaches the edited report only part of the time. The same objective optimised
        for one image, from M's change, reaches it nearly always, and the L1 and total-variation
        pull shrinks the change to what moves the generator most per unit of change, while M's
        change keeps the optimisation near the evidence M learnt to edit (on a shortcut generator:
        the marker). Every image's delta is optimised independently (the batch loss is a sum of
        per-image terms and Adam is per element), so the result does not depend on which images
        share a batch. Only delta receives gradients; the generator's parameters are never touched."""
        w = {**DEFAULT_WEIGHTS, **self.loss_weights, **self.cfg.refine_weights}
        delta = delta.detach().clone()
        if self.cfg.clip:
            delta = (images + delta).clamp(0, 1) - images
        delta.requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=self.cfg.refine_lr)
        with torch.enable_grad():
            for _ in range(self.cfg.refine_steps):
                loss = (report_nll(gen, images + delta, reports, w["margin"]) + w["l1"] * delta.abs().flatten(1).mean(1)
                        + w["tv"] * total_variation(delta)).sum()  # fmt: skip
                (grad,) = torch.autograd.grad(loss, delta)
                delta.grad = grad
                opt.step()
                if self.cfg.clip:  # projected step: x + delta stays a valid image
                    with torch.no_grad():
                        delta.copy_((images + delta).clamp(0, 1) - images)
        return delta.detach()

    def state(self) -> dict:
        """The checkpoint; weights on the CPU, so one written on a GPU loads anywhere."""
        return {"kind": "Manipulator", "config": asdict(self.cfg),
                "weights": {k: v.cpu() for k, v in self.state_dict().items()}, "loss_weights": dict(self.loss_weights)}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str | None = None) -> Manipulator:
        cfg = dict(state["config"])
        cfg["channels"] = tuple(cfg["channels"])
        m = cls(ManipulatorConfig(**cfg))
        m.load_state_dict(state["weights"])
        m.loss_weights = dict(state.get("loss_weights", {}))
        return m.to(device or "cpu").eval()


def total_variation(delta: Tensor) -> Tensor:
    """Mean absolute difference between neighbouring pixels, per image (B,), with delta taken as
    zero outside the image: otherwise a band along the image frame has one edge fewer to pay for
    and total variation itself steers the change to the frame."""
    d = F.pad(delta, (1, 1, 1, 1))
    dy = (d[..., 1:, :] - d[..., :-1, :]).abs().flatten(1).mean(1)
    dx = (d[..., :, 1:] - d[..., :, :-1]).abs().flatten(1).mean(1)
    return dy + dx


def manipulator_losses(
    manip: Manipulator,
    gen: ReportGenerator,
    images: Tensor,
    reports: list[str],
    cond: Tensor,
    identity: Tensor,
    weights: dict[str, float] | None = None,
) -> dict[str, Tensor]:
    """The training losses for one batch: ``reports`` and ``cond`` are the edited reports t' as
    text and as M's condition; ``gen`` must be frozen (no parameter gradients)."""
    w = {**DEFAULT_WEIGHTS, **(weights or {})}
    delta = manip(images, cond)
    x_new = manip.apply_delta(images, delta)
    cycle = report_nll(gen, x_new, reports, w["margin"])  # (B,)  gradient flows through frozen G into x'
    l1 = delta.abs().flatten(1).mean(1)
    tv = total_variation(delta)
    ident = identity.to(delta.device).float()
    # common-mode penalty: |delta| weighted by the batch's mean |delta| (detached, normalised to
    # mean 1). Different images with different edits should change different places, so a
    # pattern every edit shares (an image-frame band, a global shift: changes that move G without
    # being about any finding) is what it taxes; an edit's own local change is barely touched.
    a = delta.abs().flatten(1)
    keep = ~identity.to(delta.device)
    u = a[keep].mean(0).detach() if bool(keep.any()) else a.mean(0).detach()
    common = (a * (u / u.mean().clamp_min(1e-8))).mean(1)
    total = (
        w["cycle"] * cycle.mean()
        + w["l1"] * l1.mean()
        + w["tv"] * tv.mean()
        + w["identity"] * (l1 * ident).sum() / ident.sum().clamp_min(1)
        + w["common"] * common.mean()
    )
    return {"total": total, "cycle": cycle.mean().detach(), "l1": l1.mean().detach(), "tv": tv.mean().detach(),
            "common": common.mean().detach()}
