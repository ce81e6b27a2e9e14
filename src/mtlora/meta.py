"""MeTA-LoRA: two-stage, data-efficient multi-task meta-learning of one shared LoRA (arXiv 2510.11598).

::

    k-shot pools (k train examples per task, drawn per seed: meta.pool_seed, else train.seed)
        task t: [ support pool (k * support_fraction) | query pool (rest) ]

    theta = the model's LoRA weights (lora_A / lora_B of every adapted layer)

    for each meta-iteration:
        sample n tasks; for slot i: support_i (support_size ex.), query_i (query_size ex.)

        stage 1  (ONE batched pass over the shared frozen base per inner step)
            theta_i = theta                      for all i   -> stacked (n, r, d_in) / (n, d_out, r)
            repeat S times:
                L = sum_i  mean-CE_i(support_i ; theta_i)     row b uses adapter slot[b]
                g = dL / d theta_stack                        (g[i] = grad of task i alone)
                theta_i <- theta_i - alpha * g[i]             (plain SGD, as in MAML)

        stage 2  (one batched pass)
            Q = sum_i w_i * mean-CE_i(query_i ; theta_i)      w: mean 1/n | sum 1 | weighted c_i/sum c
            first order : theta.grad = sum_i dQ/d theta_i     (theta_i treated as constants)
            second order: theta.grad = dQ/d theta             (through the inner updates)
            clip -> AdamW(beta) step ON THETA -> cosine schedule

The adapted theta_i live only in the stacked tensors handed to the adapter layers through the
per-forward context; they are never written into the model. That is the fix for the third-party
port that copies theta_i into the shared parameters and so applies the meta-gradient at the wrong
point. The result is the model's plain LoRA adapter, saved in PEFT's layout.

``reference_meta_gradients`` is the slow sequential deep-copy implementation (one model copy per
task) the tests check the batched one against, and the benchmark times it against.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters import trainable_parameters
from mtlora.adapters.inject import adapter_layers
from mtlora.config import MetaConfig, RunConfig
from mtlora.data.collate import TaskCollator
from mtlora.data.example import Example
from mtlora.errors import UserError
from mtlora.objectives.lm import IGNORE_INDEX, supervised_hidden, supervised_lm_loss
from mtlora.train import TrainingDiverged

Stacked = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------- data
@dataclass
class TaskPools:
    """The k-shot data of one task, split once into disjoint support and query pools."""

    task: str
    support: list[Example]
    query: list[Example]


def kshot_pools(examples: Sequence[Example], meta: MetaConfig, seed: int = 0) -> list[TaskPools]:
    """``k`` examples of every task drawn with ``seed``, split support | query.

    The draw is per seed so that a seed spread includes data-selection variance (with one fixed
    pool for every seed, k = 50 would measure one particular 50). Each task draws from its own
    ``random.Random(f"kshot:{seed}:{task}")``: the pool of a task depends neither on the other
    tasks nor on the torch RNG. Support and query are disjoint so that the query gradient measures
    how well the adapted theta_i generalises within the task, which is what the meta-update optimises.
    """
    from mtlora.data.tasks import kshot_sample

    by_task: dict[str, list[Example]] = {}
    for ex in kshot_sample(examples, meta.k, seed):
        by_task.setdefault(ex.task, []).append(ex)
    pools = []
    for task, shots in by_task.items():
        n_support = round(len(shots) * meta.support_fraction)
        support, query = shots[:n_support], shots[n_support:]
        if len(support) < meta.support_size or len(query) < meta.query_size:
            raise UserError(
                "meta",
                f"task {task!r}: {len(shots)} shots give pools of {len(support)} support / {len(query)} query "
                f"examples, fewer than support_size={meta.support_size} / query_size={meta.query_size}; "
                "lower the sizes or raise k (or data.max_train_per_task)",
            )
        pools.append(TaskPools(task, support, query))
    if len(pools) < meta.tasks_per_iter:
        raise UserError(
            "meta.tasks_per_iter", f"expected at most the {len(pools)} training tasks, got {meta.tasks_per_iter}"
        )
    return pools


class MetaSampler:
    """Draws n distinct tasks and, per task, support/query examples without replacement.

    Its own seeded ``random.Random`` (checkpointed via ``state_dict``), so a resumed run draws the
    same episodes as an uninterrupted one.
    """

    def __init__(self, pools: list[TaskPools], meta: MetaConfig, seed: int):
        self.pools, self.meta = pools, meta
        self.rng = random.Random(seed)

    def sample(self) -> list[tuple[list[Example], list[Example]]]:
        """``[(support_i, query_i) for i in range(n)]``; slot i is the i-th sampled task."""
        chosen = self.rng.sample(self.pools, self.meta.tasks_per_iter)
        return [
            (self.rng.sample(p.support, self.meta.support_size), self.rng.sample(p.query, self.meta.query_size))
            for p in chosen
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["rng"])


def collate_slots(collator: TaskCollator, groups: Sequence[Sequence[Example]]) -> dict[str, torch.Tensor]:
    """Concatenate the n groups into one batch; ``slot[b]`` = the group (adapter) row b belongs to."""
    batch = collator([ex for group in groups for ex in group])
    sizes = torch.tensor([len(g) for g in groups])
    batch["slot"] = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    return batch


# ------------------------------------------------------------------------------------------- loss
def per_task_losses(model: nn.Module, batch: dict[str, torch.Tensor], n: int, stacked: Stacked | None):
    """Per-slot mean answer-token cross-entropy, ``(losses (n,), token counts (n,))``.

    ``supervised_lm_loss`` averages over the whole batch; here each slot's loss is the mean over its
    own tokens, so ``d sum_i loss_i / d stacked[i]`` is exactly task i's gradient (slot i's rows are
    the only ones that use adapter i).
    """
    slot = batch["slot"]
    context = {} if stacked is None else {"stacked": stacked, "adapter_index": slot}
    h, targets = supervised_hidden(model, batch, **context)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    rows = slot[:, None].expand_as(mask)[mask]  # same row-major order as supervised_hidden's gather
    token_loss = F.cross_entropy(model.get_output_embeddings()(h).float(), targets, reduction="none")
    counts = torch.bincount(rows, minlength=n)
    if bool((counts == 0).any()):
        raise ValueError(f"a task slot has no supervised tokens (token counts {counts.tolist()})")
    sums = torch.zeros(n, dtype=token_loss.dtype, device=token_loss.device).index_add(0, rows, token_loss)
    return sums / counts, counts


def aggregation_weights(counts: torch.Tensor, aggregation: str) -> torch.Tensor:
    """w_i of the meta-objective sum_i w_i * query_loss_i (``weighted``: by query answer tokens)."""
    n = counts.numel()
    if aggregation == "mean":
        return torch.full((n,), 1.0 / n)
    if aggregation == "sum":
        return torch.ones(n)
    if aggregation == "weighted":
        return counts.float() / counts.sum()
    raise ValueError(f"unknown aggregation {aggregation!r}")


# ------------------------------------------------------------------------------------ meta-gradient
def lora_parameters(model: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """theta: ``{layer name: (lora_A.weight (r, d_in), lora_B.weight (d_out, r))}``."""
    return {name: (layer.lora_A.weight, layer.lora_B.weight) for name, layer in adapter_layers(model)}


def double_backward_attention(enabled: bool):
    """Second order needs the gradient of a gradient through attention: the fused CPU/CUDA SDPA
    kernels have no double backward, the math kernel has. A no-op context for first order."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def meta_gradients(
    model: nn.Module,
    support: dict[str, torch.Tensor],
    query: dict[str, torch.Tensor],
    meta: MetaConfig,
) -> dict[str, Any]:
    """Stages 1 and 2 of one meta-iteration; leaves the meta-gradient in theta's ``.grad``.

    ``support`` / ``query`` come from ``collate_slots`` (n slots each). theta is not modified:
    the caller clips and takes the optimiser step. Returns detached per-task losses for logging.
    """
    with double_backward_attention(meta.second_order):
        return _meta_gradients(model, support, query, meta)


def _meta_gradients(model, support, query, meta: MetaConfig) -> dict[str, Any]:
    theta = lora_parameters(model)
    n = int(support["slot"].max()) + 1
    names = list(theta)

    # stage 1: theta_i = theta for every slot; second order keeps the graph back to theta.
    def start(p: torch.Tensor) -> torch.Tensor:
        if meta.second_order:
            return p.unsqueeze(0).expand(n, *p.shape)
        return p.detach().unsqueeze(0).repeat(n, *([1] * p.dim())).requires_grad_(True)

    fast: Stacked = {name: (start(a), start(b)) for name, (a, b) in theta.items()}
    support_losses = torch.zeros(n)
    for step in range(meta.inner_steps):
        losses, _ = per_task_losses(model, support, n, fast)
        if step == 0:
            support_losses = losses.detach()  # before adaptation
        flat = [t for name in names for t in fast[name]]
        grads = torch.autograd.grad(losses.sum(), flat, create_graph=meta.second_order)
        updated = [t - meta.inner_lr * g for t, g in zip(flat, grads, strict=True)]
        if not meta.second_order:  # first order: theta_i are constants of the outer problem
            updated = [t.detach().requires_grad_(True) for t in updated]
        fast = {name: (updated[2 * j], updated[2 * j + 1]) for j, name in enumerate(names)}

    # stage 2: query losses at theta_i, aggregated; the gradient lands on theta.
    query_losses, counts = per_task_losses(model, query, n, fast)
    weights = aggregation_weights(counts, meta.aggregation).to(query_losses)
    meta_loss = (weights * query_losses).sum()
    params = [p for name in names for p in theta[name]]
    if meta.second_order:
        grads = torch.autograd.grad(meta_loss, params)
    else:
        flat = [t for name in names for t in fast[name]]
        grads = [g.sum(0) for g in torch.autograd.grad(meta_loss, flat)]  # sum_i of w_i * grad_i
    for p, g in zip(params, grads, strict=True):
        p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()
    return {
        "meta_loss": meta_loss.detach(),
        "query_losses": query_losses.detach(),
        "support_losses": support_losses,
    }


class _LossOf(nn.Module):
    """Wraps the answer-only loss as a module call, so ``functional_call`` can swap in theta_i."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return supervised_lm_loss(self.model, batch)[0]


def reference_meta_gradients(
    model: nn.Module,
    episodes: Sequence[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    meta: MetaConfig,
) -> None:
    """The slow sequential reference: deep-copy the model per task, adapt it, take query grads.

    ``episodes[i] = (support batch, query batch)`` of task i (ordinary collated batches). Writes the
    aggregated meta-gradient into theta's ``.grad`` of ``model``, like ``meta_gradients``.
    First order: S steps of ``torch.optim.SGD`` on the copy, then ``backward`` of its query loss.
    Second order: theta_i is a function of theta (``create_graph=True``), swapped into the copy with
    ``torch.func.functional_call``; the aggregated query loss is backpropagated to theta.
    """
    with double_backward_attention(meta.second_order):
        _reference_meta_gradients(model, episodes, meta)


def _reference_meta_gradients(model, episodes, meta: MetaConfig) -> None:
    theta = dict(trainable_parameters(model))
    outer_grads: list[dict[str, torch.Tensor]] = []
    query_losses, counts = [], []
    for support, query in episodes:
        clone = copy.deepcopy(model)
        if meta.second_order:
            wrapper = _LossOf(clone)
            fast = {name: p for name, p in theta.items()}
            for _ in range(meta.inner_steps):
                loss = torch.func.functional_call(wrapper, {f"model.{k}": v for k, v in fast.items()}, (support,))
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {k: v - meta.inner_lr * g for (k, v), g in zip(fast.items(), grads, strict=True)}
            q_loss = torch.func.functional_call(wrapper, {f"model.{k}": v for k, v in fast.items()}, (query,))
            query_losses.append(q_loss)
        else:
            inner = torch.optim.SGD([p for _, p in trainable_parameters(clone)], lr=meta.inner_lr)
            for _ in range(meta.inner_steps):
                inner.zero_grad(set_to_none=True)
                supervised_lm_loss(clone, support)[0].backward()
                inner.step()
            inner.zero_grad(set_to_none=True)
            q_loss = supervised_lm_loss(clone, query)[0]
            q_loss.backward()
            outer_grads.append({k: p.grad.detach().clone() for k, p in trainable_parameters(clone)})
            query_losses.append(q_loss.detach())
        counts.append(int((query["labels"][:, 1:] != IGNORE_INDEX).sum()))
        del clone
    weights = aggregation_weights(torch.tensor(counts), meta.aggregation)
    if meta.second_order:
        total = sum(w * loss for w, loss in zip(weights.tolist(), query_losses, strict=True))
        grads = torch.autograd.grad(total, list(theta.values()))
        aggregated = dict(zip(theta, grads, strict=True))
    else:
        aggregated = {k: sum(w * g[k] for w, g in zip(weights.tolist(), outer_grads, strict=True)) for k in theta}
    for k, p in theta.items():
        p.grad = aggregated[k].detach().clone() if p.grad is None else p.grad + aggregated[k].detach()


# ------------------------------------------------------------------------------------------- train
class MetaSteps:
    """MeTA-LoRA's procedure for ``mtlora.train.train``'s loop: one meta-iteration per optimiser step.

    The loop does the rest (AdamW with lr beta on theta, clipping, schedule, checkpoints, resume,
    logging). It reads ``meta.*``, and ``train.{seed, weight_decay, warmup_ratio, max_grad_norm,
    log_every, eval_every, save_every}``; the train keys it has no use for are rejected by the config.
    """

    description = "meta"

    def __init__(self, run, dist):
        if dist.world_size > 1:  # the registry marks the method single-process; the CLI says so first
            raise UserError("method", "meta_lora trains in one process; data parallelism covers the other methods")
        if run.config.precision == "fp16":  # its inner SGD step on raw autograd.grad has no loss scale
            raise UserError("precision", "meta_lora trains in fp32 or bf16; fp16 needs a loss scaler its inner step lacks")
        self.run, self.meta, self.dist = run, run.config.meta, dist
        seed = run.config.train.seed
        pool_seed = seed if self.meta.pool_seed is None else self.meta.pool_seed
        self.sampler = MetaSampler(kshot_pools(run.train_examples, self.meta, seed=pool_seed), self.meta, seed=seed)
        self.total = self.meta.iterations
        self.lr = self.meta.outer_lr

    def bind(self, optimizer):
        return optimizer

    def gradients(self, step: int) -> dict[str, float]:
        episodes = self.sampler.sample()
        support = self.dist.to_device(collate_slots(self.run.collator, [s for s, _ in episodes]))
        query = self.dist.to_device(collate_slots(self.run.collator, [q for _, q in episodes]))
        stats = meta_gradients(self.run.model, support, query, self.meta)
        if not torch.isfinite(stats["meta_loss"]):
            raise TrainingDiverged(f"meta loss is {stats['meta_loss'].item()} at iteration {step}")
        tokens = float(support["attention_mask"].sum() * self.meta.inner_steps + query["attention_mask"].sum())
        return {
            "loss": float(stats["meta_loss"]),
            "support_loss": float(stats["support_losses"].mean()),
            "query_loss": float(stats["query_losses"].mean()),
            "tokens": tokens,
        }

    def extra(self) -> dict[str, Any]:
        return {}


def train_meta(config: RunConfig, **kwargs) -> dict[str, Any]:
    """``mtlora.train.train`` for a ``method: meta_lora`` config (kept for callers that name it)."""
    from mtlora.train import train

    return train(config, **kwargs)
