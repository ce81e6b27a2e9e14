"""Evaluation: log-likelihood multiple choice (acc, acc_norm) and greedy generation (exact match).

Multiple choice follows lm-evaluation-harness exactly, so numbers are comparable with published ones:

- context = ``prompt``, continuation = ``target_delimiter + choice``, encoded like lm-eval's
  ``_encode_pair``: trailing whitespace of the context moves into the continuation,
  ``whole = tok(context + continuation)``, ``ctx = tok(context)``, ``cont = whole[len(ctx):]``, with
  ``add_special_tokens=False`` (lm-eval's default for causal HF models; SmolLM2 adds no BOS anyway).
  An empty context becomes the prefix token (BOS, else EOS) and ``cont = tok(continuation)``, as in
  lm-eval's ``loglikelihood``.
- ``acc``: argmax of the summed log-likelihood of the continuation tokens equals ``gold``.
- ``acc_norm``: argmax of ``loglik / len(choice)``, the length of the raw choice in characters
  *without* the delimiter (lm-eval ``process_results``: ``completion_len = [len(i) for i in choices]``).

Scoring methods; all three give the same log-likelihoods up to float rounding (the tests hold them
to 1e-4 against an unbatched, unpadded reference), and the first two compute each prompt only once:

- ``"shared"`` (default): one forward per batch; each row packs one example as
  ``prompt + choice_1[:-1] + choice_2[:-1] + ...`` with a block attention mask (a choice token sees the
  prompt and its own earlier tokens only) and position ids restarting at ``len(prompt)`` for every
  choice. The last prompt token's logits score every choice's first token.
- ``"kv_cache"``: runs the prompts once with a KV cache, gathers one cache row per choice
  (``DynamicCache.batch_select_indices``) and scores all choices of the batch as one second call.
  Used by ``"shared"`` when the attention implementation cannot take a custom 4D mask (flash-attn).
- ``"per_choice"``: the naive reference, one row ``prompt + choice`` per choice.
Only the logits that score a continuation token are computed (``logits_to_keep``), never the full
``(rows, seq, vocab)`` tensor.

Truncation: the prompt is left-truncated so that prompt + the longest continuation of the example
fits ``max_length + 1`` tokens (the last continuation token is never an input). lm-eval truncates each
(prompt, choice) request separately; the two agree unless a prompt overflows the model's window, and
ours keeps all choices of an example on the same context, which sharing needs.

Open-answer examples (``choices is None``) are scored by greedy decoding from the prompt (as lm-eval's
``generate_until``: no delimiter is appended) for at most ``max_new_tokens`` tokens, stopping at EOS or
at the first newline, and exact match after :func:`normalize_answer`.
"""

from __future__ import annotations

import json
import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch

from mtlora.adapters.context import forward_context
from mtlora.data.collate import encode_pair, pad_id_of, prefix_token_id
from mtlora.data.example import Example

Method = Literal["shared", "kv_cache", "per_choice"]
METHODS: tuple[str, ...] = ("shared", "kv_cache", "per_choice")

__all__ = [
    "EvalReport",
    "METHODS",
    "encode_pair",
    "evaluate",
    "normalize_answer",
    "render_table",
    "score_choices",
]


# --------------------------------------------------------------------------------------------- encoding


@dataclass
class _Encoded:
    ctx: list[int]
    conts: list[list[int]]


def _max_length(model, tokenizer, max_length: int | None) -> int:
    """The model's context window: explicit value, else the config's, else the tokenizer's (capped)."""
    if max_length is not None:
        return int(max_length)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model.config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 1_000_000 else 2048


def _encode_mc(tokenizer, ex: Example, max_length: int, add_special_tokens: bool) -> _Encoded:
    assert ex.choices is not None
    ctx: list[int] | None = None
    conts: list[list[int]] = []
    for choice in ex.choices:
        c, cont = encode_pair(tokenizer, ex.prompt, ex.target_delimiter + choice, add_special_tokens)
        ctx = c  # the context encoding does not depend on the choice
        conts.append(cont)
    assert ctx is not None
    longest = max(len(c) for c in conts)
    budget = max_length + 1 - longest
    if budget < 1:
        raise ValueError(
            f"task {ex.task!r}: a choice has {longest} tokens, more than the model's window of {max_length}"
        )
    return _Encoded(ctx=ctx[-budget:], conts=conts)


# ---------------------------------------------------------------------------------------------- scoring


def _cache_kwarg(model) -> str:
    """Name of the KV-cache argument: ``cache`` in recent transformers, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, attention mask and position ids (0 at each row's first real token)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) from logits ``(..., V)`` without materialising a second full-vocabulary tensor."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _score_batch_kv_cache(model, encs: list[_Encoded], task_ids: torch.Tensor, pad_id: int) -> list[list[float]]:
    """Prompt pass once per example, then every choice of the batch as one pass against the cache."""
    device = _device(model)
    ids, mask, pos = _left_pad([e.ctx for e in encs], pad_id, device)
    with forward_context(task_ids=task_ids):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float()
    first = first - first.logsumexp(-1, keepdim=True)  # (B, V): predicts every choice's first token
    cache = _out_cache(out)

    rows = [(b, j) for b, e in enumerate(encs) for j, c in enumerate(e.conts) if c]
    result = [[0.0] * len(e.conts) for e in encs]
    if not rows:
        return result
    row_ex = torch.tensor([b for b, _ in rows], device=device)
    conts = [encs[b].conts[j] for b, j in rows]
    score = first[row_ex, torch.tensor([c[0] for c in conts], device=device)]

    width = max(len(c) for c in conts) - 1
    if width > 0:  # tokens after the first: feed cont[:-1] after the prompt, read the next-token logits
        n = len(rows)
        inp = torch.full((n, width), pad_id, dtype=torch.long)
        tgt = torch.zeros((n, width), dtype=torch.long)
        cmask = torch.zeros((n, width), dtype=torch.long)
        for r, c in enumerate(conts):
            k = len(c) - 1
            if k:
                inp[r, :k] = torch.tensor(c[:-1])
                tgt[r, :k] = torch.tensor(c[1:])
                cmask[r, :k] = 1
        inp, tgt, cmask = inp.to(device), tgt.to(device), cmask.to(device)
        cache.batch_select_indices(row_ex)  # one cache row per choice (gathered copy of its prompt's row)
        ctx_len = mask.sum(-1)[row_ex]
        cpos = ctx_len[:, None] + torch.arange(width, device=device)[None, :]
        attn = torch.cat([mask[row_ex], cmask], dim=1)
        with forward_context(task_ids=task_ids[row_ex]):
            out2 = model(
                input_ids=inp, attention_mask=attn, position_ids=cpos, use_cache=True,
                **{_cache_kwarg(model): cache},
            )
        score = score + (_token_logprobs(out2.logits, tgt) * cmask).sum(-1)
    for (b, j), s in zip(rows, score.tolist(), strict=True):
        result[b][j] = s
    return result


def _score_batch_per_choice(
    model, encs: list[_Encoded], task_ids: torch.Tensor, pad_id: int
) -> list[list[float]]:
    """Reference path: one row ``ctx + cont[:-1]`` per choice, the prompt recomputed for every choice."""
    device = _device(model)
    rows = [(b, j) for b, e in enumerate(encs) for j, c in enumerate(e.conts) if c]
    result = [[0.0] * len(e.conts) for e in encs]
    if not rows:
        return result
    seqs = [encs[b].ctx + encs[b].conts[j][:-1] for b, j in rows]
    conts = [encs[b].conts[j] for b, j in rows]
    keep = max(len(c) for c in conts)
    ids, mask, pos = _left_pad(seqs, pad_id, device)
    tgt = torch.zeros((len(rows), keep), dtype=torch.long)
    tmask = torch.zeros((len(rows), keep), dtype=torch.long)
    for r, c in enumerate(conts):  # right-aligned: the last len(c) positions predict the continuation
        tgt[r, keep - len(c):] = torch.tensor(c)
        tmask[r, keep - len(c):] = 1
    tgt, tmask = tgt.to(device), tmask.to(device)
    row_ex = torch.tensor([b for b, _ in rows], device=device)
    with forward_context(task_ids=task_ids[row_ex]):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep)
    score = (_token_logprobs(out.logits, tgt) * tmask).sum(-1)
    for (b, j), s in zip(rows, score.tolist(), strict=True):
        result[b][j] = s
    return result


def _score_batch_packed(model, encs: list[_Encoded], task_ids: torch.Tensor, pad_id: int) -> list[list[float]]:
    """One forward per batch: each row packs ``ctx + cont_1[:-1] + cont_2[:-1] + ...`` of one example.

    A block attention mask lets choice tokens see the prompt and earlier tokens of their own choice
    only, and position ids restart at ``len(ctx)`` for every choice, so each choice is scored exactly
    as if it followed the prompt alone. The prompt is still computed once per example. Same work as
    ``kv_cache`` minus its second model call and cache copies (measurably faster on CPU, where each
    call's per-op overhead counts); needs an attention implementation that takes a 4D float mask
    (eager, sdpa), otherwise ``method="shared"`` falls back to ``kv_cache``.
    """
    device = _device(model)
    result = [[0.0] * len(e.conts) for e in encs]
    seqs, poss, segs = [], [], []
    for e in encs:
        p = len(e.ctx)
        ids, pos, seg = list(e.ctx), list(range(p)), [0] * p
        for j, c in enumerate(e.conts):
            ids += c[:-1]
            pos += range(p, p + len(c) - 1)
            seg += [j + 1] * (len(c) - 1)
        seqs.append(ids)
        poss.append(pos)
        segs.append(seg)
    width = max(len(s) for s in seqs)
    n = len(encs)
    ids_t = torch.full((n, width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((n, width), dtype=torch.long)
    seg_t = torch.full((n, width), -1, dtype=torch.long)
    for b, (s, p, g) in enumerate(zip(seqs, poss, segs, strict=True)):  # left padding
        ids_t[b, width - len(s):] = torch.tensor(s)
        pos_t[b, width - len(s):] = torch.tensor(p)
        seg_t[b, width - len(s):] = torch.tensor(g)
    ids_t, pos_t, seg_t = ids_t.to(device), pos_t.to(device), seg_t.to(device)
    q, k = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(width, dtype=torch.bool, device=device) & (q < 0)  # padding sees itself: no NaN rows
    dtype = next(model.parameters()).dtype
    mask = torch.zeros((n, 1, width, width), dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    # (row, column, target, example, choice) of every continuation token to score
    rows, cols, tgts, owner = [], [], [], []
    keep = 1
    for b, e in enumerate(encs):
        start = width - len(seqs[b])
        last_ctx = start + len(e.ctx) - 1
        keep = max(keep, width - last_ctx)
        col = last_ctx + 1
        for j, c in enumerate(e.conts):
            for t, tok in enumerate(c):
                rows.append(b)
                cols.append(last_ctx if t == 0 else col + t - 1)
                tgts.append(tok)
                owner.append((b, j))
            col += max(len(c) - 1, 0)
    if not rows:
        return result
    with forward_context(task_ids=task_ids):
        out = model(input_ids=ids_t, attention_mask=mask, position_ids=pos_t, use_cache=False, logits_to_keep=keep)
    r = torch.tensor(rows, device=device)
    c = torch.tensor(cols, device=device) - (width - keep)
    lp = _token_logprobs(out.logits[r, c], torch.tensor(tgts, device=device)).tolist()
    for (b, j), v in zip(owner, lp, strict=True):
        result[b][j] += v
    return result


_PACKING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def packing_supported(model) -> bool:
    """Whether ``model`` scores a packed row (4-D block mask + explicit position ids) exactly.

    Not every family honours a custom 4-D float mask (GPT-2 under transformers 5 builds its own
    causal mask and gets a different answer; flash-attention kernels take no mask at all), and
    nothing in a config says so reliably. So a one-row probe decides, once per model: a prompt of
    two tokens and two two-token choices, scored packed and per choice. A mismatch beyond rounding,
    or an exception, means no packing. The result is cached per model object.
    """
    cached = _PACKING.get(model)
    if cached is not None:
        return cached
    if getattr(model.config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        ok = False
    else:
        vocab = int(getattr(model.config, "vocab_size", 8) or 8)
        probe = [_Encoded(ctx=[1 % vocab, 2 % vocab], conts=[[3 % vocab, 4 % vocab], [5 % vocab, 6 % vocab]])]
        tids = torch.zeros(1, dtype=torch.long, device=_device(model))
        low = next(model.parameters()).dtype not in (torch.float32, torch.float64)
        try:
            with _EvalMode(model):
                packed = _score_batch_packed(model, probe, tids, 0)[0]
                single = _score_batch_per_choice(model, probe, tids, 0)[0]
            ok = all(abs(a - b) <= (5e-2 if low else 1e-3) for a, b in zip(packed, single, strict=True))
        except Exception:  # noqa: BLE001 - any failure of the packed call means: do not pack
            ok = False
    _PACKING[model] = ok
    return ok


def _fallback_method(model) -> str:
    """``kv_cache`` where the model takes a cache and explicit positions, else ``per_choice``."""
    return "kv_cache" if "past_key_values" in _forward_params(model) or "cache" in _forward_params(model) else "per_choice"


def _forward_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


class _EvalMode:
    """``model.eval()`` + ``torch.inference_mode()`` for the block; restores the previous training mode."""

    def __init__(self, model) -> None:
        self.model = model
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.inference.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.inference.__exit__(*exc)
        self.model.train(self.was_training)


def _task_id_map(examples: Sequence[Example], task_names: Sequence[str] | None) -> dict[str, int]:
    names = list(task_names) if task_names is not None else sorted({ex.task for ex in examples})
    mapping = {name: i for i, name in enumerate(names)}
    missing = sorted({ex.task for ex in examples} - set(mapping))
    if missing:
        raise ValueError(f"tasks {missing} are not in task_names {names}")
    return mapping


def _progress(total: int, enabled: bool, desc: str):
    from mtlora.progress import bar

    return bar(total, enabled=enabled, description=desc, transient=True)


class NonFiniteScoreError(RuntimeError):
    """The model gave a NaN/inf log-likelihood: its weights are broken, and no accuracy is meaningful."""


def _score_mc(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    method: str,
    task_ids: dict[str, int],
    max_length: int | None,
    add_special_tokens: bool,
    progress: bool,
) -> list[list[float]]:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
    limit = _max_length(model, tokenizer, max_length)
    encs = [_encode_mc(tokenizer, ex, limit, add_special_tokens) for ex in examples]
    # Longest first (like lm-eval): similar lengths share a batch, so little padding, and an
    # out-of-memory error shows up on the first batch rather than the last.
    order = sorted(range(len(encs)), key=lambda i: -(len(encs[i].ctx) + max(map(len, encs[i].conts))))
    if method == "shared" and not packing_supported(model):
        method = _fallback_method(model)  # e.g. flash-attention, or a family that ignores 4-D masks
    score_batch = {
        "shared": _score_batch_packed, "kv_cache": _score_batch_kv_cache, "per_choice": _score_batch_per_choice
    }[method]
    pad_id = pad_id_of(tokenizer)
    device = _device(model)
    out: list[list[float]] = [[] for _ in encs]
    with _progress(len(encs), progress, f"scoring ({method})") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            tids = torch.tensor([task_ids[examples[i].task] for i in idx], device=device)
            scores = score_batch(model, [encs[i] for i in idx], tids, pad_id)
            for i, s in zip(idx, scores, strict=True):
                out[i] = s
            bar.update(len(idx))
    return out


def score_choices(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    method: Method = "shared",
    batch_size: int = 8,
    task_names: Sequence[str] | None = None,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    progress: bool = False,
) -> list[list[float]]:
    """Summed log-likelihood of every choice of every (multiple-choice) example, in input order.

    ``batch_size`` counts examples (each brings all its choices). ``task_names`` maps task names to
    the task ids that adapters read from the forward context (default: sorted unique names).
    """
    if any(ex.choices is None for ex in examples):
        raise ValueError("score_choices needs multiple-choice examples (choices is not None)")
    ids = _task_id_map(examples, task_names)
    with _EvalMode(model):
        return _score_mc(
            model, tokenizer, examples, batch_size=batch_size, method=method, task_ids=ids,
            max_length=max_length, add_special_tokens=add_special_tokens, progress=progress,
        )


# ------------------------------------------------------------------------------------------- generation

_TRAILING_PUNCT = re.compile(r"[\s.,;:!?\"')\]]+$")


def normalize_answer(text: str) -> str:
    """Light normalisation for exact match: strip, lowercase, collapse whitespace, drop trailing punctuation.

    Deliberately light (no article or inner-punctuation removal, unlike SQuAD's): "Paris." and
    " paris" match "Paris", but "the Paris" does not. Trailing ``. , ; : ! ? " ' ) ]`` are removed.
    """
    text = " ".join(text.strip().lower().split())
    return _TRAILING_PUNCT.sub("", text)


def _stop_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(s) for s in source)
    return ids


def _generate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    task_ids: dict[str, int],
    max_length: int | None,
    add_special_tokens: bool,
    progress: bool,
    first_line: bool = True,
) -> list[str]:
    """Greedy decoding with a KV cache; a row stops at EOS, the token budget, or (``first_line``, the
    open-answer tasks' rule) once its text holds a newline, and only that first line is returned."""
    limit = _max_length(model, tokenizer, max_length)
    budget = max(1, limit - max_new_tokens)
    prompts = []
    for ex in examples:
        ids = list(tokenizer.encode(ex.prompt, add_special_tokens=add_special_tokens)) or [prefix_token_id(tokenizer)]
        prompts.append(ids[-budget:])
    stops = _stop_ids(model, tokenizer)
    pad_id, device = pad_id_of(tokenizer), _device(model)
    texts: list[str] = [""] * len(examples)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with _progress(len(examples), progress, "generating") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask, pos = _left_pad([prompts[i] for i in idx], pad_id, device)
            tids = torch.tensor([task_ids[examples[i].task] for i in idx], device=device)
            generated: list[list[int]] = [[] for _ in idx]
            done = [False] * len(idx)
            cache, cache_kw = None, _cache_kwarg(model)
            step_ids, step_pos = ids, pos
            with forward_context(task_ids=tids):
                for _ in range(max_new_tokens):
                    out = model(
                        input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                        use_cache=True, logits_to_keep=1, **{cache_kw: cache},
                    )
                    cache = _out_cache(out)
                    nxt = out.logits[:, -1].argmax(-1)
                    for r, tok in enumerate(nxt.tolist()):
                        if done[r]:
                            continue
                        if tok in stops:
                            done[r] = True
                            continue
                        generated[r].append(tok)
                        if first_line and "\n" in tokenizer.decode(generated[r], skip_special_tokens=True):
                            done[r] = True
                    if all(done):
                        break
                    step_ids = nxt[:, None]
                    step_pos = step_pos[:, -1:] + 1
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for r, i in enumerate(idx):
                text = tokenizer.decode(generated[r], skip_special_tokens=True)
                texts[i] = text.split("\n", 1)[0] if first_line else text
            bar.update(len(idx))
    return texts


# ---------------------------------------------------------------------------------------------- report


@dataclass
class EvalReport:
    """Metrics of one evaluation.

    ``per_task[task]``: ``n`` and, for multiple-choice tasks, ``acc`` and ``acc_norm``; for generation
    tasks ``exact_match``. ``macro``: ``primary`` = mean over tasks of each task's primary metric
    (``acc`` for multiple choice, ``exact_match`` for generation), ``acc_norm`` = mean over the
    multiple-choice tasks, ``n_tasks``. ``micro``: the same over all examples pooled (``n``).
    ``predictions``: one dict per example, in input order.
    """

    per_task: dict[str, dict[str, float]]
    macro: dict[str, float]
    micro: dict[str, float]
    predictions: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Inverse of :meth:`to_dict`; unknown keys (e.g. a training step stored beside it) are ignored."""
        known = {"per_task", "macro", "micro", "predictions", "meta"}
        return cls(**{k: v for k, v in data.items() if k in known})


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def _argmax(values: Sequence[float]) -> int:
    """First index of the maximum (numpy's tie rule, as lm-eval uses ``np.argmax``)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _build_report(examples: Sequence[Example], predictions: list[dict[str, Any]], meta: dict) -> EvalReport:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for p in predictions:
        by_task.setdefault(p["task"], []).append(p)
    per_task: dict[str, dict[str, float]] = {}
    for task in sorted(by_task):
        preds = by_task[task]
        if preds[0]["kind"] == "multiple_choice":
            per_task[task] = {
                "acc": _mean([float(p["correct"]) for p in preds]),
                "acc_norm": _mean([float(p["correct_norm"]) for p in preds]),
                "n": len(preds),
            }
        else:
            per_task[task] = {"exact_match": _mean([float(p["correct"]) for p in preds]), "n": len(preds)}
    primary = [m.get("acc", m.get("exact_match", math.nan)) for m in per_task.values()]
    mc = [p for p in predictions if p["kind"] == "multiple_choice"]
    macro = {
        "primary": _mean(primary),
        "acc_norm": _mean([m["acc_norm"] for m in per_task.values() if "acc_norm" in m]),
        "n_tasks": len(per_task),
    }
    micro = {
        "primary": _mean([float(p["correct"]) for p in predictions]),
        "acc_norm": _mean([float(p["correct_norm"]) for p in mc]),
        "n": len(predictions),
    }
    return EvalReport(per_task=per_task, macro=macro, micro=micro, predictions=predictions, meta=meta)


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    method: Method = "shared",
    max_new_tokens: int = 32,
    progress: bool = True,
    task_names: Sequence[str] | None = None,
    max_length: int | None = None,
    add_special_tokens: bool = False,
    protocol: str = "loglik",
) -> EvalReport:
    """Score ``examples`` (multiple choice and/or open answer, any mix of tasks) and aggregate metrics.

    ``protocol="generate_extract"`` scores every example instead as the papers' released scripts do
    (instruction prompt, greedy generation, answer extraction: :mod:`mtlora.eval_protocols`).

    Runs under ``torch.inference_mode()`` with ``model.eval()``, restoring the training mode after.
    Every model call is wrapped in ``forward_context(task_ids=...)`` (ids from ``task_names``,
    default sorted unique task names), so adapters that route by task see the right ids.
    ``batch_size`` counts examples per forward pass (a multiple-choice example brings all its choices).
    """
    examples = list(examples)
    ids = _task_id_map(examples, task_names)
    if protocol != "loglik":
        from mtlora.eval_protocols import render_prompt, score_generations

        if protocol != "generate_extract":
            raise ValueError(f"protocol must be 'loglik' or 'generate_extract', got {protocol!r}")
        prompted = [replace(ex, prompt=render_prompt(ex).prompt) for ex in examples]
        with _EvalMode(model):  # the released scripts: tokenizer defaults (BOS), greedy to EOS, whole text parsed
            texts = _generate(model, tokenizer, prompted, batch_size=batch_size, max_new_tokens=max_new_tokens,
                              task_ids=ids, max_length=max_length, add_special_tokens=True, progress=progress,
                              first_line=False)
        predictions = score_generations(examples, [ex.prompt + t for ex, t in zip(prompted, texts, strict=True)])
        meta = {"protocol": protocol, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "task_ids": ids}
        return _build_report(examples, predictions, meta)
    mc_idx = [i for i, ex in enumerate(examples) if ex.choices is not None]
    gen_idx = [i for i, ex in enumerate(examples) if ex.choices is None]
    predictions: list[dict[str, Any]] = [{} for _ in examples]
    common = dict(task_ids=ids, max_length=max_length, add_special_tokens=add_special_tokens, progress=progress)
    with _EvalMode(model):
        if mc_idx:
            lls = _score_mc(model, tokenizer, [examples[i] for i in mc_idx], batch_size=batch_size,
                            method=method, **common)
            for i, ll in zip(mc_idx, lls, strict=True):
                ex = examples[i]
                assert ex.choices is not None
                if not all(math.isfinite(v) for v in ll):
                    raise NonFiniteScoreError(
                        f"non-finite log-likelihood {ll} on task {ex.task!r} (example {i}); the model's or the "
                        "adapter's weights are broken, so no accuracy is reported")
                normed = [v / max(len(c), 1) for v, c in zip(ll, ex.choices, strict=True)]
                pred, pred_norm = _argmax(ll), _argmax(normed)
                predictions[i] = {
                    "task": ex.task, "kind": "multiple_choice", "pred": pred, "pred_norm": pred_norm,
                    "gold": ex.gold, "correct": pred == ex.gold, "correct_norm": pred_norm == ex.gold,
                    "logliks": ll,
                }
        if gen_idx:
            texts = _generate(model, tokenizer, [examples[i] for i in gen_idx], batch_size=batch_size,
                              max_new_tokens=max_new_tokens, **common)
            for i, text in zip(gen_idx, texts, strict=True):
                ex = examples[i]
                predictions[i] = {
                    "task": ex.task, "kind": "generation", "pred": text, "gold": ex.answer,
                    "correct": normalize_answer(text) == normalize_answer(ex.answer),
                }
    meta = {"method": method, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "task_ids": ids}
    return _build_report(examples, predictions, meta)


# ----------------------------------------------------------------------------------------------- table


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def render_table(
    report: EvalReport,
    other: EvalReport | None = None,
    labels: tuple[str, str] = ("base", "tuned"),
    *,
    console=None,
):
    """A rich table of per-task metrics (percent), one report or two side by side with their difference.

    Rows: each task's primary metric (and ``acc_norm`` for multiple choice), then the macro and micro
    averages. Returned as a ``rich.table.Table`` (``console.print(render_table(base, tuned))``), and
    also printed when a ``console`` is given.
    """
    from rich.table import Table

    table = Table(title="evaluation" if other is None else f"evaluation: {labels[0]} vs {labels[1]}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("n", justify="right")
    table.add_column(labels[0] if other is not None else "score", justify="right")
    if other is not None:
        table.add_column(labels[1], justify="right")
        table.add_column("delta", justify="right")

    def add(task: str, metric: str, n: Any, a: float | None, b: float | None) -> None:
        cells = [task, metric, str(n), _fmt(a)]
        if other is not None:
            delta = None if a is None or b is None else b - a
            cells += [_fmt(b), "-" if delta is None or math.isnan(delta) else f"{100 * delta:+.1f}"]
        table.add_row(*cells)

    tasks = list(report.per_task) + [t for t in (other.per_task if other else {}) if t not in report.per_task]
    for task in tasks:
        mine = report.per_task.get(task, {})
        theirs = other.per_task.get(task, {}) if other is not None else {}
        metrics = [m for m in ("acc", "acc_norm", "exact_match") if m in mine or m in theirs]
        for metric in metrics:
            add(task, metric, int(mine.get("n", theirs.get("n", 0))), mine.get(metric), theirs.get(metric))
    table.add_section()
    for name, agg in (("macro", "macro"), ("micro", "micro")):
        a, b = getattr(report, agg), getattr(other, agg) if other is not None else {}
        n = a.get("n", a.get("n_tasks", ""))
        add(f"[bold]{name}[/bold]", "primary", n, a.get("primary"), b.get("primary"))
        add(f"[bold]{name}[/bold]", "acc_norm", n, a.get("acc_norm"), b.get("acc_norm"))
    if console is not None:
        console.print(table)
    return table
