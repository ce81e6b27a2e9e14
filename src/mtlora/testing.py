"""Tiny randomly initialised models and a tokenizer built in memory, for tests and examples.

No downloads: the tokenizer is a byte-level BPE trained on a few sentences in a few milliseconds,
and the models are stock ``transformers`` architectures (Llama, Qwen2) with toy sizes. Any test
that runs "every method on every architecture" iterates over ``TINY_ARCHS``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

TINY_ARCHS = ("llama", "qwen2")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: Which gas do plants absorb? Answer: carbon dioxide",
    "Is the sky blue? yes no true false positive negative",
    "Premise: The man turned on the faucet. Hypothesis: Water flowed from the spout.",
    "A B C D 0 1 2 3 4 5 6 7 8 9 + - = ? ! , . : ; ' \"",
    "the cat sat on the mat because it was tired and happy and warm",
] * 4


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab <= 320) trained on a fixed corpus: deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def tiny_config(arch: str, vocab_size: int):
    """A stock transformers config of the named architecture with toy sizes."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected one of {TINY_ARCHS}")


def tiny_model(arch: str = "llama", seed: int = 0):
    """A randomly initialised tiny causal LM (fp32, eval mode) and its tokenizer."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.eval()
    return model, tok


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny model + tokenizer as a plain Hugging Face folder (usable as ``model:`` in configs)."""
    path = Path(path)
    model, tok = tiny_model(arch, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
