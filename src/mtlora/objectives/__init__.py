"""Training objectives: callables ``(model, batch) -> (loss, logs)`` used by the trainer."""

from mtlora.objectives.lm import supervised_lm_loss

__all__ = ["supervised_lm_loss"]
