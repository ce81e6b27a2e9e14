"""The designated report generator: a small interface and the default CNN + transformer decoder.

Anything that can (1) generate a report for a batch of images and (2) give the log-likelihood of a
given report, differentiably in the image, can be explained by CVLM, integrated gradients and
occlusion (``ReportGenerator``). Grad-CAM additionally needs a spatial feature map, which
``FeatureGenerator`` exposes. The default ``CXRReportGenerator`` is a small CNN encoder (stride-2 convolutions down to an 8 x 8
feature grid) and a 2-layer transformer decoder cross-attending to it, trained from scratch on
phantoms in a couple of minutes on CPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .report_text import REPORT_DIM, Tokenizer


@dataclass(frozen=True)
class ImageSpec:
    """The images a generator reads: ``size`` x ``size`` pixels, ``channels`` and the per-channel
    ``mean`` / ``std`` it normalises with. Callers always pass grey (B, 1, size, size) images in
    [0, 1] (the space the manipulator edits and clips in); the generator repeats and normalises."""

    size: int
    channels: int = 1
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def normalise(self, images: Tensor) -> Tensor:
        x = images.expand(-1, self.channels, -1, -1) if images.shape[1] != self.channels else images
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@runtime_checkable
class ReportGenerator(Protocol):
    """All that the manipulator, the refinement, the baselines and the metrics need of a report
    generator; images are grey (B, 1, S, S) in [0, 1] with S = ``image_spec.size``."""

    image_spec: ImageSpec

    def generate(self, images: Tensor) -> list[str]:
        """Greedy reports, one per image."""
        ...

    def report_log_likelihood(self, images: Tensor, reports: list[str]) -> Tensor:
        """Sum of the log-probabilities of each report's tokens (the generator's own tokenizer)
        given its image, shape (B,); differentiable in the images."""
        ...


@runtime_checkable
class FeatureGenerator(ReportGenerator, Protocol):
    """A generator whose image evidence passes through one spatial feature map (for Grad-CAM)."""

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, h, w) features."""
        ...

    def log_likelihood_from_features(self, feats: Tensor, reports: list[str]) -> Tensor: ...


def report_nll(gen: ReportGenerator, images: Tensor, reports: list[str], margin: float = 0.0) -> Tensor:
    """Summed negative log-likelihood of each report (B,): the cycle loss. With ``margin`` > 0 and a
    generator that also gives per-token log-probabilities (``token_log_likelihoods``, (B, T), 0 at
    padding), each token counts only beyond ``margin`` nats (a hinge), so that nothing is gained by
    making G more confident of tokens it already predicts; otherwise the plain sum."""
    if margin > 0 and hasattr(gen, "token_log_likelihoods"):
        return F.relu(-gen.token_log_likelihoods(images, reports) - margin).sum(1)
    return -gen.report_log_likelihood(images, reports)


@dataclass
class GeneratorConfig:
    """Sizes of the default generator (the demo trains it for ~3 minutes on one CPU core)."""

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    channels: tuple[int, ...] = (16, 32, 64, 64)
    max_len: int = 72
    image_size: int = 64
    # weight of the auxiliary finding loss (0 = off): a linear head on the mean- and max-pooled
    # encoder grid predicts the report's 48-d finding vector (``reports.report_vector``). It is a
    # training signal only (generation and log-likelihood never use the head); it makes the encoder
    # learn the small findings (nodule, pneumothorax, opacity) within the CPU budget.
    aux_weight: float = 1.0
    # border handling of the encoder's convolutions: "zeros" makes the image frame an artificial
    # edge that G becomes sensitive to (and a manipulator then edits the frame instead of the
    # finding); "replicate" treats the frame like the pixels next to it
    padding_mode: str = "replicate"
    # training-time input noise (0 = off): per image, white noise of standard deviation up to
    # ``aug_noise`` plus a smooth random field of the same amplitude. Training with input noise
    # penalises the input gradient (Bishop 1995), so G becomes insensitive to small changes that
    # are not findings and the cheapest way to change its report is to change the finding.
    aug_noise: float = 0.05


class CXRReportGenerator(nn.Module):
    """CNN encoder (stride 8 -> 16 x 16 grid for 128 px) + causal transformer decoder."""

    def __init__(self, tokenizer: Tokenizer, cfg: GeneratorConfig | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = cfg = cfg or GeneratorConfig()
        # stride-2 convolutions down to an 8 x 8 grid whatever the image size (64 px: 3, 128 px: 4)
        n_down = max(1, int(math.log2(cfg.image_size // 8)))
        chans = [1, *cfg.channels[:n_down]]
        chans += [chans[-1]] * (n_down + 1 - len(chans))
        layers: list[nn.Module] = []
        for i in range(n_down):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 4, stride=2, padding=1, padding_mode=cfg.padding_mode),
                       nn.GroupNorm(8, chans[i + 1]), nn.GELU()]  # fmt: skip
        layers += [nn.Conv2d(chans[-1], cfg.d_model, 3, padding=1, padding_mode=cfg.padding_mode), nn.GELU()]
        self.encoder = nn.Sequential(*layers)
        grid = cfg.image_size // 2**n_down
        self.pos_img = nn.Parameter(torch.randn(grid * grid, cfg.d_model) * 0.02)
        self.tok = nn.Embedding(len(tokenizer), cfg.d_model)
        self.pos_tok = nn.Parameter(torch.randn(cfg.max_len, cfg.d_model) * 0.02)
        layer = nn.TransformerDecoderLayer(
            cfg.d_model, cfg.n_heads, 2 * cfg.d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, cfg.n_layers)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, len(tokenizer))
        self.finding_head = nn.Linear(2 * cfg.d_model, REPORT_DIM)

    # -- pieces ---------------------------------------------------------------------------------
    @property
    def image_spec(self) -> ImageSpec:
        return ImageSpec(self.cfg.image_size, 1, (0.3,), (0.2,))

    def encode(self, images: Tensor) -> Tensor:
        return self.encoder(self.image_spec.normalise(images))

    def _memory(self, feats: Tensor) -> Tensor:
        mem = feats.flatten(2).transpose(1, 2)
        return mem + self.pos_img[: mem.shape[1]]

    def logits(self, feats: Tensor, tokens: Tensor) -> Tensor:
        """Next-token logits (B, T, V) for input tokens (B, T) given image features."""
        T = tokens.shape[1]
        x = self.tok(tokens) + self.pos_tok[:T]
        causal = torch.triu(torch.full((T, T), float("-inf"), device=tokens.device), 1)
        h = self.decoder(x, self._memory(feats), tgt_mask=causal, tgt_is_causal=True)
        return self.head(self.norm(h))

    def batch_tokens(self, reports: list[str], device: torch.device | str | None = None) -> Tensor:
        return pad_tokens([self.tokenizer.encode(r)[: self.cfg.max_len] for r in reports], device)

    def token_logprobs(self, feats: Tensor, tokens: Tensor) -> Tensor:
        """Log-probability of each target token (B, T-1); 0 at padding."""
        logits = self.logits(feats, tokens[:, :-1])
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        return lp * (tokens[:, 1:] != Tokenizer.PAD)

    # -- interface ------------------------------------------------------------------------------
    def log_likelihood_from_features(self, feats: Tensor, reports: list[str]) -> Tensor:
        return self.token_logprobs(feats, self.batch_tokens(reports, feats.device)).sum(1)

    def report_log_likelihood(self, images: Tensor, reports: list[str]) -> Tensor:
        return self.log_likelihood_from_features(self.encode(images), reports)

    def token_log_likelihoods(self, images: Tensor, reports: list[str]) -> Tensor:
        return self.token_logprobs(self.encode(images), self.batch_tokens(reports, images.device))

    def loss(self, images: Tensor, tokens: Tensor, findings: Tensor | None = None) -> Tensor:
        """Mean token cross-entropy (teacher forcing), plus ``aux_weight`` x the binary
        cross-entropy of the finding head when the reports' finding vectors (B, 48) are given."""
        feats = self.encode(images)
        logits = self.logits(feats, tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), ignore_index=Tokenizer.PAD)
        if findings is not None and self.cfg.aux_weight > 0:
            loss = loss + self.cfg.aux_weight * F.binary_cross_entropy_with_logits(self.finding_logits(feats), findings)
        return loss

    def finding_logits(self, feats: Tensor) -> Tensor:
        """Auxiliary head: (B, 48) finding-vector logits from the pooled encoder grid."""
        return self.finding_head(torch.cat([feats.mean((2, 3)), feats.amax((2, 3))], 1))

    @torch.no_grad()
    def generate(self, images: Tensor, batch_size: int = 128) -> list[str]:
        out: list[str] = []
        for i in range(0, images.shape[0], batch_size):
            out += self._generate(images[i : i + batch_size])
        return out

    def _generate(self, images: Tensor) -> list[str]:
        feats = self.encode(images)
        B = images.shape[0]
        tokens = torch.full((B, 1), Tokenizer.BOS, dtype=torch.long, device=images.device)
        done = torch.zeros(B, dtype=torch.bool, device=images.device)
        for _ in range(self.cfg.max_len - 1):
            nxt = self.logits(feats, tokens)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, Tokenizer.PAD), nxt)
            tokens = torch.cat([tokens, nxt[:, None]], 1)
            done |= nxt == Tokenizer.EOS
            if bool(done.all()):
                break
        return [self.tokenizer.decode(t.tolist()) for t in tokens]

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict:
        """The checkpoint; weights on the CPU, so one written on a GPU loads anywhere."""
        return {"kind": "CXRReportGenerator", "config": asdict(self.cfg), "vocab": self.tokenizer.itos,
                "weights": {k: v.cpu() for k, v in self.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str | None = None) -> CXRReportGenerator:
        cfg = dict(state["config"])
        cfg["channels"] = tuple(cfg["channels"])
        model = cls(Tokenizer(list(state["vocab"])[len(Tokenizer.SPECIAL) :]), GeneratorConfig(**cfg))
        model.load_state_dict(state["weights"])
        return model.to(device or "cpu").eval()


def pad_tokens(ids: list[list[int]], device: torch.device | str | None = None) -> Tensor:
    """Right-pad token id lists with ``Tokenizer.PAD`` into one (B, T) tensor on ``device``
    (built on the CPU and copied once: one transfer, not one per report)."""
    T = max(len(i) for i in ids)
    out = torch.full((len(ids), T), Tokenizer.PAD, dtype=torch.long)
    for k, i in enumerate(ids):
        out[k, : len(i)] = torch.tensor(i)
    return out if device is None else out.to(device)


def augment(images: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Images plus random white noise and a random smooth field, both of amplitude <= ``amount``."""
    if amount <= 0:
        return images
    B, _, H, W = images.shape
    dev = images.device  # ``generator`` must live there too (``torch.Generator(device=...)``)
    a = torch.rand(B, 1, 1, 1, generator=generator, device=dev) * amount
    b = torch.rand(B, 1, 1, 1, generator=generator, device=dev) * amount
    coarse = torch.randn(B, 1, 5, 5, generator=generator, device=dev)
    field = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=True)
    return images + a * torch.randn(images.shape, generator=generator, device=dev) + b * field


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode and no parameter gradients: the generator is fixed while it is explained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def cosine_lr(step: int, total: int, base: float, warmup: int = 50) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
