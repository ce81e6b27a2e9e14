"""A Hugging Face image-to-text model as a ``ReportGenerator``.

Any model with the ``VisionEncoderDecoderModel`` contract can be explained: ``generate(
pixel_values=...)`` returns token ids, and ``model(pixel_values=..., labels=...)`` returns logits
aligned with the labels (the decoder input is the labels shifted right, as the model builds it).
The adapter turns grey [0, 1] images into the pixel values the model expects (channels repeated,
the image processor's mean / std) and sums the labels' token log-probabilities for the
log-likelihood, so gradients reach the image and the per-token values give the cycle loss's hinge.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .errors import UserError
from .generator import ImageSpec


class HFReportGenerator:
    """Wrap ``model`` (eval mode, frozen) and its ``tokenizer`` with the image spec it expects."""

    def __init__(self, model, tokenizer, image_spec: ImageSpec, max_new_tokens: int = 64):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_spec = image_spec
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, folder: str | Path, max_new_tokens: int = 64,
                        device: torch.device | str | None = None) -> HFReportGenerator:  # fmt: skip
        """Load a saved model folder (``config.json``, weights, tokenizer files, and optionally
        ``preprocessor_config.json`` for the image size and normalisation) onto ``device`` (the
        CPU by default); images passed to the adapter must be on the same device."""
        from transformers import AutoConfig, AutoTokenizer, VisionEncoderDecoderModel

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise UserError(folder, "expected a Hugging Face model folder with config.json (save_pretrained)")
        try:
            config = AutoConfig.from_pretrained(folder)
            if config.model_type == "vision-encoder-decoder":
                model = VisionEncoderDecoderModel.from_pretrained(folder)
            else:
                from transformers import AutoModelForImageTextToText

                model = AutoModelForImageTextToText.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(folder, f"expected a loadable image-to-text model and tokenizer ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120]})") from None  # fmt: skip
        return cls(model.to(device or "cpu"), tokenizer, image_spec_of(folder, model), max_new_tokens)

    # -- the interface ------------------------------------------------------------------------
    def pixel_values(self, images: Tensor) -> Tensor:
        return self.image_spec.normalise(images)

    def _labels(self, reports: list[str], device) -> Tensor:
        """Token ids of each report ending in EOS (so its likelihood includes stopping there),
        padded with -100 (the labels convention: ignored, and never fed to the decoder)."""
        eos = self.tokenizer.eos_token_id
        ids = [self.tokenizer(r, add_special_tokens=True)["input_ids"] for r in reports]
        ids = [i + [eos] if eos is not None and (not i or i[-1] != eos) else i for i in ids]
        labels = torch.full((len(ids), max(len(i) for i in ids)), -100, dtype=torch.long)
        for k, i in enumerate(ids):
            labels[k, : len(i)] = torch.tensor(i)
        return labels.to(device)

    def token_log_likelihoods(self, images: Tensor, reports: list[str]) -> Tensor:
        """Log-probability of each label token (B, T), 0 at padding."""
        labels = self._labels(reports, images.device)
        out = self.model(pixel_values=self.pixel_values(images), labels=labels)
        lp = torch.log_softmax(out.logits.float(), -1)
        keep = labels != -100
        return lp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1) * keep

    def report_log_likelihood(self, images: Tensor, reports: list[str]) -> Tensor:
        return self.token_log_likelihoods(images, reports).sum(1)

    @torch.no_grad()
    def generate(self, images: Tensor, batch_size: int = 32) -> list[str]:
        out: list[str] = []
        for i in range(0, images.shape[0], batch_size):
            ids = self.model.generate(pixel_values=self.pixel_values(images[i : i + batch_size]),
                                      max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)  # fmt: skip
            out += [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out


def image_spec_of(folder: Path, model) -> ImageSpec:
    """Image size, channels and normalisation from the folder's image processor config, else from
    the encoder's config (mean 0.5, std 0.5: the ViT default)."""
    import json

    enc = getattr(model.config, "encoder", model.config)
    size = getattr(enc, "image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    channels = int(getattr(enc, "num_channels", 3))
    mean, std = (0.5,) * channels, (0.5,) * channels
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        s = cfg.get("size", size)
        size = int(s.get("height", s.get("shortest_edge", size))) if isinstance(s, dict) else int(s)
        if cfg.get("do_normalize", True):
            mean = tuple(float(v) for v in cfg.get("image_mean", mean))
            std = tuple(float(v) for v in cfg.get("image_std", std))
        else:
            mean, std = (0.0,) * channels, (1.0,) * channels
        if cfg.get("do_rescale", True) is False:
            # the model was trained on 0..255 values: scale [0, 1] up by folding 255 into mean / std
            mean, std = tuple(m / 255 for m in mean), tuple(s_ / 255 for s_ in std)
    return ImageSpec(size, channels, tuple(mean), tuple(std))
