"""``mtlora generate``: try a trained adapter (or any base model) on prompts.

Loads ``ADAPTER_OR_MODEL`` (an adapter folder: its base comes from the adapter; otherwise a model
alias or Hugging Face folder), then decodes with transformers' ``generate``: greedy by default,
sampling when ``temperature > 0``. A prompts file is decoded in left-padded batches, longest prompts
first. ``--task NAME`` (or a ``task`` field per line) sets the task id that task-aware adapters
read from the forward context; the names are the adapter's training tasks. ``--chat`` wraps each
prompt in the tokenizer's chat template as one user turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mtlora.adapters.context import forward_context
from mtlora.adapters.io import CONFIG_NAME
from mtlora.data.collate import pad_id_of
from mtlora.errors import UserError


@dataclass
class Prompt:
    text: str
    task: str | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """A JSONL file of ``{"prompt": ..., "task": ...}`` lines (``task`` optional); a line may also be a bare JSON string."""
    path = Path(path)
    if not path.is_file():
        raise UserError(path, "prompts file not found")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(path, f"invalid JSON ({exc.msg})", line=number) from None
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(path, 'expected {"prompt": "...", "task": "..."} (task optional)', line=number)
        task = row.get("task")
        if task is not None and not isinstance(task, str):
            raise UserError(path, "expected task to be a string", line=number)
        prompts.append(Prompt(row["prompt"], task))
    if not prompts:
        raise UserError(path, "no prompts in this file")
    return prompts


def load_for_generation(source: str | Path, *, base: str | None = None, device: str | None = None,
                        precision: str | None = None):
    """``(model, tokenizer, task_names)`` for an adapter folder or a plain model."""
    if (Path(source) / CONFIG_NAME).is_file():
        from mtlora.train import load_trained

        model, tokenizer, extra = load_trained(source, base=base, device=device, precision=precision)
        return model, tokenizer, list(extra.get("task_names") or [])
    from mtlora.models import load_model

    model, tokenizer = load_model(base or source, device=device, precision=precision)
    return model, tokenizer, []


def _task_ids(prompts: Sequence[Prompt], task: str | None, task_names: Sequence[str]) -> list[int]:
    ids = []
    for p in prompts:
        name = p.task or task
        if name is None:
            ids.append(0)
        elif name in task_names:
            ids.append(task_names.index(name))
        else:
            known = list(task_names) or "none: this model was not trained on named tasks"
            raise UserError("--task", f"unknown task {name!r}; expected one of {known}")
    return ids


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("--chat", "this tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        from mtlora.data.collate import prefix_token_id

        ids = [prefix_token_id(tokenizer)]
    return list(ids)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    task: str | None = None,
    task_names: Sequence[str] = (),
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 8,
    chat: bool = False,
    seed: int = 0,
) -> list[str]:
    """Completions of ``prompts`` (text after the prompt, special tokens dropped), in input order."""
    if max_new_tokens < 1:
        raise UserError("--max-new-tokens", f"expected an integer >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise UserError("--temperature", f"expected a number >= 0, got {temperature}")
    from mtlora.evaluate import _left_pad, _stop_ids

    ids = _task_ids(prompts, task, task_names)
    encoded = [_encode(tokenizer, p.text, chat) for p in prompts]
    device = next(model.parameters()).device
    pad_id = pad_id_of(tokenizer)
    stops = sorted(_stop_ids(model, tokenizer)) or None
    sample = temperature > 0
    if sample:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, mask, _ = _left_pad([encoded[i] for i in idx], pad_id, device)
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {
                "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
            with forward_context(task_ids=torch.tensor([ids[i] for i in idx], device=device)):
                result = model.generate(
                    input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id, eos_token_id=stops, **kwargs,
                )
            for row, i in enumerate(idx):
                new = result[row, input_ids.shape[1]:].tolist()
                out[i] = tokenizer.decode(new, skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out
