"""What each cell gets: trainable parameters (counted, not assumed) and training data (counted too).

Matched budgets: each method's adapter is injected into the model on the meta device (no weights
loaded) and its trainable parameters counted before any training; ``matched_lora_rank`` gives the
LoRA rank closest to a multi-head budget. Training data: the distinct examples a cell's sampler
actually hands to the trainer, replayed from its seed, so a "k examples per task match all the
data" claim can be checked against what the "all data" cell really saw.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from typing import Any

from mtlora.bench.config import BenchConfig, adapter_summary, prepare_cells
from mtlora.config import RunConfig
from mtlora.errors import UserError


def linear_shapes(model, target_modules) -> list[tuple[int, int]]:
    """(d_in, d_out) of every module an adapter config targets."""
    from mtlora.adapters import find_target_modules

    return [(m.in_features, m.out_features) for m in
            (model.get_submodule(n) for n in find_target_modules(model, target_modules))]


def lora_parameter_count(shapes: Sequence[tuple[int, int]], r: int) -> int:
    """LoRA: A (r x d_in) + B (d_out x r) per layer."""
    return sum(r * (d_in + d_out) for d_in, d_out in shapes)


def multihead_parameter_count(shapes: Sequence[tuple[int, int]], r: int, num_heads: int, router: bool) -> int:
    """Shared A (r x d_in) + N heads (d_out x r) + router (N x d_in, when learned) per layer."""
    return sum(r * d_in + num_heads * d_out * r + (num_heads * d_in if router else 0) for d_in, d_out in shapes)


def matched_lora_rank(shapes: Sequence[tuple[int, int]], budget: int) -> int:
    """The LoRA rank whose parameter count is closest to ``budget`` (ties: the smaller rank)."""
    per_rank = lora_parameter_count(shapes, 1)
    low = max(1, budget // per_rank)
    return min((low, low + 1), key=lambda r: (abs(lora_parameter_count(shapes, r) - budget), r))


def _skeleton(model_name: str):
    """The model's modules on the meta device: shapes without loading or allocating weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from mtlora.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model_name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_budgets(configs: Sequence[RunConfig]) -> dict[str, dict[str, Any]]:
    """Trainable parameters of each config's adapter, by injecting it into a meta-device model.

    Keyed by a description of the adapter, so methods sharing an adapter are counted once.
    """
    from mtlora.adapters import count_parameters, inject_adapters

    counts: dict[str, dict[str, Any]] = {}
    skeletons: dict[str, Any] = {}
    for config in configs:
        adapter = _adapter(config)
        key = budget_key(config)
        if key in counts:
            continue
        try:
            if config.model not in skeletons:
                skeletons[config.model] = _skeleton(config.model)
            shapes = linear_shapes(skeletons[config.model], adapter.target_modules)
            model = copy.deepcopy(skeletons[config.model])
            inject_adapters(model, adapter)
            trainable, _ = count_parameters(model)
        except (UserError, OSError, ValueError) as exc:  # the cell itself will fail and say why
            counts[key] = {"trainable_parameters": None, "shapes": [], "error": str(exc)}
            continue
        counts[key] = {"trainable_parameters": trainable, "shapes": shapes}
    return counts


def _adapter(config: RunConfig):
    from mtlora.train import run_adapter_config

    return run_adapter_config(config, len(config.tasks))  # a task router: one row per task (built-in names)


def budget_key(config: RunConfig) -> str:
    return json.dumps({"model": config.model, **_adapter(config).to_dict()}, sort_keys=True, default=str)


def budget_report(bench: BenchConfig) -> list[dict[str, Any]]:
    """Per method: adapter, counted trainable parameters, and the LoRA rank with the closest budget."""
    cells = prepare_cells(bench)
    first = {}
    for m, _, c in cells:
        first.setdefault(m.name, (m, c))
    budgets = count_budgets([c for m, c in first.values() if not m.eval_only])
    rows = []
    for m, c in first.values():
        if m.eval_only:
            rows.append({"method": m.name, "adapter": "-", "trainable_parameters": 0, "matched_lora_rank": None})
            continue
        b = budgets[budget_key(c)]
        shapes = [tuple(s) for s in b["shapes"]]
        rows.append({"method": m.name, "adapter": adapter_summary(c), "trainable_parameters": b["trainable_parameters"],
                     "matched_lora_rank": matched_lora_rank(shapes, b["trainable_parameters"])
                     if b["trainable_parameters"] else None})
    return rows


def training_data_seen(config: RunConfig, eval_only: bool = False) -> dict[str, Any]:
    """Per task: the training pool and the distinct examples the cell's trainer is handed.

    Replays the run's own sampler from its seed (the plain loop's batch sampler for
    ``train.max_steps`` or the epochs' steps, MeTA-LoRA's k-shot pools and episode sampler for its
    iterations), so the count is what the cell saw, not what its config suggests. Loads the task
    data only (cheap); no model.
    """
    if eval_only:
        return {"pool_per_task": {}, "distinct_per_task": {}, "example_passes": 0, "k_shot": None}
    from mtlora.train import training_examples

    examples = training_examples(config)
    pool: dict[str, int] = {}
    for ex in examples:
        pool[ex.task] = pool.get(ex.task, 0) + 1
    seen: dict[str, set] = {task: set() for task in pool}
    from mtlora.methods import get_method

    if get_method(config.method).k_shot:
        from mtlora.meta import MetaSampler, kshot_pools

        seed = config.train.seed
        pool_seed = seed if config.meta.pool_seed is None else config.meta.pool_seed
        sampler = MetaSampler(kshot_pools(examples, config.meta, seed=pool_seed), config.meta, seed=seed)
        passes = 0
        for _ in range(config.meta.iterations):
            for support, query in sampler.sample():
                for ex in (*support, *query):
                    seen[ex.task].add(ex)
                passes += len(support) + len(query)
        k_shot: int | None = config.meta.k
    else:
        from mtlora.train import Run, total_steps

        # the trainer's own sampler factory; the model, tokenizer and collator play no part in it
        sampler = Run(config, None, None, sorted(pool), examples, [], None).sampler()
        steps = total_steps(config, len(sampler)) * config.train.grad_accum
        passes, done = 0, 0
        while done < steps:
            for indices in sampler:
                for i in indices:
                    seen[examples[i].task].add(i)
                passes += len(indices)
                done += 1
                if done == steps:
                    break
        k_shot = None
    return {"pool_per_task": pool, "distinct_per_task": {t: len(s) for t, s in seen.items()},
            "example_passes": passes, "k_shot": k_shot}
