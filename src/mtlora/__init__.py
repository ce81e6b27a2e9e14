"""mtlora: multi-task LoRA fine-tuning on stock Hugging Face transformers models."""

__version__ = "0.1.0"
