"""Tokenisation with the loss on answer tokens only, and a collator that keeps task ids with the batch.

Prompt and answer are split exactly as lm-evaluation-harness's ``_encode_pair`` splits a context
and a continuation, so training supervises the very tokens the evaluator scores:

1. trailing whitespace of the prompt moves to the front of the continuation
   (``target_delimiter + answer``), so ``"Answer: "`` + ``"yes"`` tokenises like ``"Answer:" + " yes"``;
2. the whole string and the context are encoded separately; the continuation's tokens are
   ``whole[len(context_tokens):]`` (tokenising the continuation alone would change merges at the
   boundary for BPE tokenizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mtlora.data.example import Example

IGNORE_INDEX = -100  # label of positions the loss skips (transformers' and torch's convention); the one definition


def split_context(prompt: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context into the continuation (lm-eval ``_encode_pair``)."""
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        continuation = prompt[-n_spaces:] + continuation
        prompt = prompt[:-n_spaces]
    return prompt, continuation


def _bos_prefix(tokenizer: Any, add_bos: bool | None) -> list[int]:
    if add_bos is None:
        add_bos = bool(getattr(tokenizer, "add_bos_token", False))
    if add_bos and tokenizer.bos_token_id is not None:
        return [tokenizer.bos_token_id]
    return []


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's ``prefix_token_id``: BOS, else EOS; stands in for an empty context."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if prefix is None:
        raise ValueError("an empty prompt needs a BOS or EOS token to condition on")
    return int(prefix)


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_special_tokens: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) the lm-eval way (``_encode_pair``).

    The continuation tokens come from tokenising the *whole* string, so an answer is trained and
    scored on the tokens the model sees in running text. Training and evaluation share this one
    function. An empty (or whitespace-only) context becomes the prefix token (BOS, else EOS), as in
    lm-eval's ``loglikelihood``, so the first answer token is always conditioned on something.
    """
    context, continuation = split_context(context, continuation)
    whole = tokenizer(context + continuation, add_special_tokens=add_special_tokens)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=add_special_tokens)["input_ids"] if context else []
    ctx_ids, cont_ids = list(whole[: len(ctx)]), list(whole[len(ctx):])
    if not ctx_ids:
        ctx_ids = [prefix_token_id(tokenizer)]
    return ctx_ids, cont_ids


def encode_example(
    tokenizer: Any, ex: Example, max_length: int, add_eos: bool = True, add_bos: bool | None = None
) -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` (``-100`` on prompt tokens) for one example.

    EOS follows the answer (``add_eos``) so a trained model learns to stop generating. BOS is added
    only when the tokenizer asks for one (``add_bos=None`` follows ``tokenizer.add_bos_token``).
    Too-long inputs lose prompt tokens from the left (the answer and the prompt's end are what the
    model must see); an answer that alone exceeds ``max_length`` is an error, never cut.
    """
    ctx, cont = encode_pair(tokenizer, ex.prompt, ex.target_delimiter + ex.answer)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("add_eos=True but the tokenizer has no eos_token_id")
        cont = cont + [tokenizer.eos_token_id]
    bos = _bos_prefix(tokenizer, add_bos)
    if bos and ctx[:1] == bos:  # empty prompt: the prefix token is already the BOS
        bos = []
    if len(bos) + len(cont) > max_length:
        raise ValueError(
            f"task {ex.task!r}: the answer alone takes {len(cont)} tokens (with EOS/BOS: {len(bos) + len(cont)}), "
            f"more than max_length={max_length}; raise max_length or shorten the answer"
        )
    room = max_length - len(bos) - len(cont)
    ctx = ctx[len(ctx) - room:] if len(ctx) > room else ctx
    input_ids = bos + ctx + cont
    labels = [IGNORE_INDEX] * (len(bos) + len(ctx)) + cont
    return {"input_ids": input_ids, "labels": labels}


def pad_id_of(tokenizer: Any) -> int:
    """The pad token id, falling back to EOS (SmolLM2 and many base models have no pad token)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")


class TaskCollator:
    """Examples -> right-padded tensors ``input_ids``, ``attention_mask``, ``labels``, ``task_ids``.

    ``task_ids[i]`` is ``task_names.index(examples[i].task)``: ids travel with the batch and never
    depend on row order. Encodings are cached per example (Examples are frozen and hashable), so
    later epochs skip tokenisation.
    """

    def __init__(
        self,
        tokenizer: Any,
        task_names: Sequence[str],
        max_length: int,
        pad_to_multiple_of: int | None = None,
        add_eos: bool = True,
        cache: bool = True,
    ):
        if len(set(task_names)) != len(task_names):
            raise ValueError(f"task_names must be distinct, got {list(task_names)}")
        self.tokenizer = tokenizer
        self.task_names = list(task_names)
        self.task_to_id = {name: i for i, name in enumerate(self.task_names)}
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.add_eos = add_eos
        self.pad_token_id = pad_id_of(tokenizer)
        self._cache: dict[Example, dict[str, list[int]]] | None = {} if cache else None

    def task_id(self, task: str) -> int:
        try:
            return self.task_to_id[task]
        except KeyError:
            raise KeyError(f"example of task {task!r} is not among the collator's tasks {self.task_names}") from None

    def encode(self, ex: Example) -> dict[str, list[int]]:
        if self._cache is not None and ex in self._cache:
            return self._cache[ex]
        enc = encode_example(self.tokenizer, ex, self.max_length, add_eos=self.add_eos)
        if self._cache is not None:
            self._cache[ex] = enc
        return enc

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        task_ids = [self.task_id(ex.task) for ex in examples]
        encs = [self.encode(ex) for ex in examples]
        width = max(len(e["input_ids"]) for e in encs)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = -(-width // m) * m
        n = len(encs)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(encs):
            k = len(e["input_ids"])
            input_ids[i, :k] = torch.tensor(e["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.tensor(e["labels"], dtype=torch.long)
            attention_mask[i, :k] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "task_ids": torch.tensor(task_ids, dtype=torch.long),
        }
