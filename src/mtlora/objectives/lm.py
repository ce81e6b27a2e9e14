"""Causal-LM loss on answer tokens only, with LM-head logits computed only where they are needed.

The vocabulary of SmolLM2 has 49k entries: projecting every position of a ``(B, T, d)`` batch to
``(B, T, 49152)`` logits costs a large share of each step, while an answer-only loss needs logits
at a few positions per example. We run the decoder, gather the hidden states that predict a
supervised label (position t predicts label t+1), and apply the LM head to those rows only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.context import forward_context
from mtlora.data.collate import IGNORE_INDEX  # noqa: E402,F401 (the labels' home; re-exported)


def supervised_hidden(model: nn.Module, batch: dict[str, torch.Tensor], **context) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states at positions that predict a supervised label, and those labels.

    Returns ``(h, targets)`` with ``h: (n_supervised, d_model)``. Extra keyword arguments go into
    the per-forward context (e.g. ``capture=[]`` for Align-LoRA).
    """
    decoder = model.get_decoder()
    with forward_context(task_ids=batch.get("task_ids"), **context):
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    return hidden[:, :-1][mask], labels[mask]


def supervised_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor], **context) -> tuple[torch.Tensor, dict]:
    """Mean cross-entropy over the answer tokens of the batch (logits in fp32)."""
    h, targets = supervised_hidden(model, batch, **context)
    if targets.numel() == 0:
        raise ValueError("batch has no supervised tokens (every label is -100)")
    logits = model.get_output_embeddings()(h).float()
    loss = F.cross_entropy(logits, targets)
    return loss, {"lm_loss": loss.detach()}
