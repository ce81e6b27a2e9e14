"""Align-LoRA: align the task representations in the shared adapter space (arXiv 2508.05078).

::

    main forward (inside forward_context(capture=[...]))  -- never checkpoint recomputation
        every adapted layer l appends  phi_l = A_l drop(x)        (B, T, r)
                                                   |
    rows grouped by batch["task_ids"], padding masked (attention_mask)
                                                   |
    per layer l, per task t (fp32):   S_t = sum phi,  Q_t = sum phi^2,  n_t = count
                                      [optional reduce_fn: all_reduce over data-parallel ranks]
            mu_t = S_t / n_t,  var_t = max(Q_t / n_t - mu_t^2, 0) + eps       (diagonal Gaussian)
                                                   |
    A-LoRA-K:  D_ij = 0.5 (KL(p_i||p_j) + KL(p_j||p_i))
                    = 1/4 sum_d [ var_i/var_j + var_j/var_i - 2 + (mu_i - mu_j)^2 (1/var_i + 1/var_j) ]
    A-LoRA-M:  MMD^2_ij = mean k(X_i,X_i) + mean k(X_j,X_j) - 2 mean k(X_i,X_j)   (biased)
               k(x, y) = sum_s exp(-||x - y||^2 / (2 sigma_s)),  sigma_s log-spaced
                                                   |
    L_align = mean over layers of ( mean | sum over task pairs i<j of D_ij )
    L       = L_LM + lambda * L_align                      (one micro-batch at a time)

Defects of the released trainer that this module avoids, one by one:

1. *No gradient under reentrant checkpointing.* Its features come from forward hooks; under
   reentrant checkpointing the main forward runs in ``no_grad`` so the "loss" is a logged constant.
   We capture through the per-forward context and *raise* when a captured feature has no grad
   while the model trains with ``lambda > 0``, instead of silently logging a constant. Non-reentrant
   checkpointing works: recomputation happens during ``backward()``, after the context has exited,
   so nothing is captured twice (checked: one feature per adapted layer per forward).
2. *Features concatenated across gradient-accumulation micro-steps.* Each call of the objective
   owns a fresh capture list and forms its loss inside that micro-batch; nothing persists.
3. *Task groups from chunking the batch by position.* Rows are grouped by the batch's explicit
   ``task_ids``; the task-balanced sampler (``data.sampler: task_balanced``) guarantees >= 2 tasks.
   A micro-batch with fewer than two tasks is skipped and counted (``align_skipped`` log,
   ``AlignObjective.skipped``), or is a ``UserError`` with ``align.require_all_steps: true``.
4. *bf16 kernels, per-position statistics that include padding.* Statistics are fp32 and
   token-pooled over non-padding tokens by default (``statistics: per_position`` is the option).

The released losses stay available as options, padding masked and in fp32 (tested against a port
of ``custom.py`` in ``tests/align_repo_port.py``): A-LoRA-K's statistics are ``statistics:
per_position, variance: unbiased, eps: 1e-8``; A-LoRA-M's kernel is ``mmd_kernel: repo``
(:func:`mmd_loss_per_position`, 19 absolute bandwidths over rows at the same position), where the
default is token-pooled, subsampled and relative to the mean distance (:func:`mmd_loss`).

Data parallelism: statistics are additive (sum, sum of squares, count), computed locally, then
passed through ``reduce_fn`` (identity by default) before the loss is formed. Plug in a
differentiable all-reduce (``torch.distributed.nn.functional.all_reduce``) and fix ``num_tasks``
so every rank's tensors have the same shape. MMD needs samples, not sums: it stays per-rank (the
task-balanced sampler interleaves rows, so every rank's slice holds all k tasks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.errors import UserError
from mtlora.objectives.lm import supervised_hidden

if TYPE_CHECKING:
    from mtlora.config import AlignConfig

__all__ = [
    "AlignObjective",
    "TaskStats",
    "capture_features",
    "inter_task_kl",
    "mmd_loss",
    "mmd_loss_per_position",
    "pair_reduce",
    "plot_align_history",
    "symmetric_kl",
    "task_statistics",
]


# --- statistics ---------------------------------------------------------------------------------
@dataclass
class TaskStats:
    """Additive per-task statistics of the adapter features of every layer (channels concatenated).

    ``sum``/``sumsq``: ``(K, C)`` pooled or ``(K, T, C)`` per position; ``count``: ``(K,)`` or
    ``(K, T)``. ``layer_of_channel[c]`` is the layer index of channel ``c`` (``C = sum_l r_l``).
    Summing the three tensors over processes gives the statistics of the union of their batches.
    """

    sum: torch.Tensor
    sumsq: torch.Tensor
    count: torch.Tensor
    layer_of_channel: torch.Tensor
    n_layers: int

    def gaussians(self, eps: float, unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Means and floored variances (``E[x^2] - E[x]^2``, times ``n/(n-1)`` when ``unbiased``, as
        the released code's ``torch.var``); empty groups give mean 0.

        Formed in fp64 (tensors of size K x C, so free): ``E[x^2] - E[x]^2`` cancels badly in fp32
        when the spread is small next to the mean, as with few rows per position.
        """
        n = self.count.clamp_min(1).unsqueeze(-1).double()
        mu = self.sum.double() / n
        var = (self.sumsq.double() / n - mu * mu).clamp_min(0.0)
        if unbiased:  # groups of one row count as absent (pairs need >= 2 rows), so n - 1 >= 1 where used
            var = var * n / (n - 1).clamp_min(1)
        return mu, var + eps


ReduceFn = Callable[[TaskStats], TaskStats]


def _identity(stats: TaskStats) -> TaskStats:
    return stats


def _as_list(features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return list(features.values()) if isinstance(features, Mapping) else list(features)


def _concat_channels(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers' ``(B, T, r_l)`` features as one fp32 ``(B, T, C)`` tensor, plus channel -> layer."""
    if not features:
        raise ValueError("no adapter features: does the model hold LoRA layers, and was capture set?")
    widths = [f.shape[-1] for f in features]
    layer_of_channel = torch.repeat_interleave(
        torch.arange(len(features), device=features[0].device),
        torch.tensor(widths, device=features[0].device),
    )
    return torch.cat([f.float() for f in features], dim=-1), layer_of_channel


def task_statistics(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    task_ids: torch.Tensor,
    mask: torch.Tensor | None,
    num_tasks: int | None = None,
    statistics: str = "pooled",
) -> TaskStats:
    """Per-task (sum, sum of squares, count) of every layer's features, in fp32.

    Rows are assigned to tasks by ``task_ids`` (never by position); tokens with ``mask == 0``
    (padding) contribute nothing. One matmul for all layers: the weights are a one-hot task matrix
    times the mask, so the cost is ``O(B T C K)`` whatever the number of layers.
    """
    feats = _as_list(features)
    x, layer_of_channel = _concat_channels(feats)  # (B, T, C)
    b, t, _ = x.shape
    if task_ids.shape != (b,):
        raise ValueError(f"task_ids must have shape ({b},), got {tuple(task_ids.shape)}")
    k = int(task_ids.max()) + 1 if num_tasks is None else num_tasks
    if int(task_ids.min()) < 0 or int(task_ids.max()) >= k:
        raise ValueError(f"task ids must lie in [0, {k}), got {task_ids.tolist()}")
    m = torch.ones(b, t, device=x.device) if mask is None else mask.to(device=x.device, dtype=torch.float32)
    onehot = F.one_hot(task_ids.to(x.device), k).to(torch.float32)  # (B, K)
    if statistics == "pooled":
        w = torch.einsum("bk,bt->kbt", onehot, m).reshape(k, b * t)
        flat = x.reshape(b * t, -1)
        return TaskStats(w @ flat, w @ (flat * flat), w.sum(1), layer_of_channel, len(feats))
    if statistics == "per_position":
        w = torch.einsum("bk,bt->kbt", onehot, m)
        return TaskStats(
            torch.einsum("kbt,btc->ktc", w, x),
            torch.einsum("kbt,btc->ktc", w, x * x),
            w.sum(1),
            layer_of_channel,
            len(feats),
        )
    raise ValueError(f"statistics must be 'pooled' or 'per_position', got {statistics!r}")


# --- distances ----------------------------------------------------------------------------------
def symmetric_kl(
    mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor
) -> torch.Tensor:
    """Per-channel terms of ``0.5 (KL(p||q) + KL(q||p))`` of diagonal Gaussians (sum them over d).

    The log-determinants cancel in the symmetric form, which keeps it cheap and stable.
    """
    diff2 = (mu_p - mu_q) ** 2
    return 0.25 * (var_p / var_q + var_q / var_p - 2.0 + diff2 * (1.0 / var_p + 1.0 / var_q))


def pair_reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce over task pairs (last dim): mean (default, lambda independent of k) or sum (paper)."""
    if reduction == "mean":
        return values.mean(-1)
    if reduction == "sum":
        return values.sum(-1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _present_pairs(count: torch.Tensor, min_count: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs i < j of tasks with at least ``min_count`` tokens (a 1-token Gaussian is degenerate)."""
    present = torch.nonzero(count >= min_count).flatten()
    if present.numel() < 2:
        empty = torch.empty(0, dtype=torch.long, device=count.device)
        return empty, empty
    i, j = torch.triu_indices(present.numel(), present.numel(), offset=1, device=count.device)
    return present[i], present[j]


def kl_from_stats(
    stats: TaskStats, reduction: str = "mean", eps: float = 1e-5, unbiased: bool = False
) -> torch.Tensor | None:
    """Mean over layers of the pair-reduced symmetric KL; ``None`` when fewer than two tasks."""
    mu, var = stats.gaussians(eps, unbiased)
    if stats.count.dim() == 1:  # pooled: (K, C)
        i, j = _present_pairs(stats.count)
        if i.numel() == 0:
            return None
        terms = symmetric_kl(mu[i], var[i], mu[j], var[j])  # (P, C)
        per_layer = terms.new_zeros(terms.shape[0], stats.n_layers).index_add_(
            1, stats.layer_of_channel, terms
        )
        return pair_reduce(per_layer.T, reduction).mean().float()
    # per position: (K, T, C); a pair counts at the positions where both tasks have >= 2 rows
    task_present = (stats.count >= 2).any(1)
    i, j = _present_pairs(task_present.long(), min_count=1)
    if i.numel() == 0:
        return None
    terms = symmetric_kl(mu[i], var[i], mu[j], var[j])  # (P, T, C)
    p, t, _ = terms.shape
    per_layer = terms.new_zeros(p, t, stats.n_layers).index_add_(2, stats.layer_of_channel, terms)
    valid = ((stats.count[i] >= 2) & (stats.count[j] >= 2)).to(per_layer.dtype)  # (P, T)
    n_valid = valid.sum(1)
    if not bool((n_valid > 0).any()):
        return None
    keep = n_valid > 0
    per_pair = (per_layer * valid.unsqueeze(-1)).sum(1)[keep] / n_valid[keep].unsqueeze(-1)  # (P', L)
    return pair_reduce(per_pair.T, reduction).mean().float()


def inter_task_kl(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    task_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    statistics: str = "pooled",
    reduction: str = "mean",
    eps: float = 1e-5,
    unbiased: bool = False,
    num_tasks: int | None = None,
    reduce_fn: ReduceFn | None = None,
) -> torch.Tensor:
    """Symmetric KL between per-task diagonal Gaussians, pair-reduced, averaged over layers.

    ``features``: one ``(B, T, r)`` tensor per adapted layer (e.g. from :func:`capture_features`);
    ``mask``: ``(B, T)``, 1 on real tokens. Differentiable. Used both as the A-LoRA-K loss and as
    the logged "mean inter-task distance". Raises ``ValueError`` with fewer than two tasks.
    """
    stats = task_statistics(features, task_ids, mask, num_tasks, statistics)
    kl = kl_from_stats((reduce_fn or _identity)(stats), reduction, eps, unbiased)
    if kl is None:
        raise ValueError(f"need at least two tasks with >= 2 tokens each; task ids {task_ids.tolist()}")
    return kl


def _subsample_indices(
    task_ids: torch.Tensor, mask: torch.Tensor, per_task: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Deterministic, evenly strided choice of at most ``per_task`` real tokens of each task.

    Deterministic on purpose: drawing from the torch RNG here would shift every later dropout mask,
    so the LM part of an Align-LoRA run would not match a LoRA run with the same seed. Returns flat
    token indices into ``(B*T)``, their group number, and the task id of each group.
    """
    b, t = mask.shape
    valid = mask.bool()
    tok_task = task_ids.view(b, 1).expand(b, t)
    flat_idx, groups, tasks = [], [], []
    for task in torch.unique(task_ids).tolist():
        idx = torch.nonzero(((tok_task == task) & valid).flatten()).flatten()
        if idx.numel() < 2:
            continue
        if idx.numel() > per_task:
            pick = torch.linspace(0, idx.numel() - 1, per_task, device=idx.device).round().long()
            idx = idx[pick]
        flat_idx.append(idx)
        groups.append(torch.full_like(idx, len(tasks)))
        tasks.append(task)
    if not flat_idx:
        empty = torch.empty(0, dtype=torch.long, device=task_ids.device)
        return empty, empty, []
    return torch.cat(flat_idx), torch.cat(groups), tasks


def mmd_loss(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    task_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    relative: bool = True,
    tokens_per_task: int = 32,
    reduction: str = "mean",
) -> torch.Tensor | None:
    """Multi-kernel Gaussian MMD^2 (biased) between every pair of tasks, averaged over layers, fp32.

    Per layer the tokens of each task are subsampled to ``tokens_per_task`` (deterministic stride)
    so the cost is ``O(L (k m)^2 r)`` whatever the sequence length. With ``relative`` the bandwidths
    multiply the layer's mean pairwise squared distance (detached), making the kernel scale-free
    as the features grow during training. Returns ``None`` with fewer than two tasks.
    """
    feats = _as_list(features)
    if not feats:
        raise ValueError("no adapter features")
    b, t = feats[0].shape[:2]
    m = torch.ones(b, t, device=feats[0].device) if mask is None else mask.to(feats[0].device)
    idx, groups, tasks = _subsample_indices(task_ids.to(m.device), m, tokens_per_task)
    if len(tasks) < 2:
        return None
    widths = {f.shape[-1] for f in feats}
    # (L, M, r): one batched kernel computation for all layers when ranks agree
    chunks = (
        [torch.stack([f.reshape(b * t, -1)[idx].float() for f in feats])]
        if len(widths) == 1
        else [f.reshape(b * t, -1)[idx].float().unsqueeze(0) for f in feats]
    )
    g = F.one_hot(groups, len(tasks)).to(torch.float32)
    g = g / g.sum(0, keepdim=True)  # (M, G): column j averages over group j
    i, j = torch.triu_indices(len(tasks), len(tasks), offset=1, device=g.device)
    bw = torch.tensor(list(bandwidths), dtype=torch.float32, device=g.device)
    per_layer = []
    for z in chunks:
        sq = (z * z).sum(-1)
        d2 = torch.baddbmm(sq.unsqueeze(-1) + sq.unsqueeze(-2), z, z.transpose(-1, -2), alpha=-2.0).clamp_min(
            0.0
        )  # (L, M, M)
        scale = d2.detach().mean((-1, -2), keepdim=True).clamp_min(1e-12) if relative else 1.0
        inv = 1.0 / (2.0 * bw.view(-1, 1, 1, 1) * scale)  # (S, L, 1, 1) or (S, 1, 1, 1)
        kern = sum(torch.exp(-d2 * inv[s_]) for s_ in range(inv.shape[0]))  # (L, M, M); no (S, L, M, M)
        kbar = g.T @ kern @ g  # (L, G, G): mean kernel value between groups
        diag = torch.diagonal(kbar, dim1=-2, dim2=-1)
        mmd2 = diag[:, i] + diag[:, j] - 2.0 * kbar[:, i, j]  # (L, P)
        per_layer.append(pair_reduce(mmd2, reduction))
    return torch.cat(per_layer).mean()


# The released A-LoRA-M kernel (Align-LoRA's custom.py, MMD_Trainer.sigmas); sigma enters as exp(-d2 / (2 sigma)).
REPO_MMD_BANDWIDTHS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6)


def mmd_loss_per_position(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    task_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bandwidths: Sequence[float] = REPO_MMD_BANDWIDTHS,
    reduction: str = "mean",
) -> torch.Tensor | None:
    """The released A-LoRA-M loss: MMD^2 between tasks' rows at the *same position*, averaged over positions.

    ``custom.py`` takes features ``(N, S, r)`` per task, a kernel ``sum_s exp(-||x_bt - y_ct||^2 / (2 sigma_s))``
    over row pairs at each position ``t`` with 19 fixed absolute bandwidths, and the biased
    ``mean k(X,X) + mean k(Y,Y) - 2 mean k(X,Y)`` over (rows, rows, positions). Kept here: the
    kernel, the bandwidths, the per-position pairing and the means. Changed: fp32 instead of bf16,
    rows grouped by ``task_ids`` (not by chunking the batch), padding masked (a position counts for
    a pair where both tasks have a real token there). Returns ``None`` with fewer than two tasks.
    """
    feats = _as_list(features)
    if not feats:
        raise ValueError("no adapter features")
    b, t = feats[0].shape[:2]
    device = feats[0].device
    m = torch.ones(b, t, device=device) if mask is None else mask.to(device=device, dtype=torch.float32)
    tasks = torch.unique(task_ids).tolist()
    if len(tasks) < 2:
        return None
    onehot = (task_ids.to(device).view(-1, 1) == torch.tensor(tasks, device=device)).float()  # (B, K)
    w = torch.einsum("bk,bt->tbk", onehot, m)  # (T, B, K): row b counts for task k at position t
    n = w.sum(1)  # (T, K)
    i, j = torch.triu_indices(len(tasks), len(tasks), offset=1, device=device)
    valid = ((n[:, i] > 0) & (n[:, j] > 0)).float()  # (T, P)
    n_valid = valid.sum(0)  # (P,)
    if not bool((n_valid > 0).any()):
        return None
    wn = w / n.clamp_min(1).unsqueeze(1)  # column k averages over task k's rows at t
    beta = 1.0 / (2.0 * torch.tensor(list(bandwidths), dtype=torch.float32, device=device))
    per_layer = []
    for f in feats:
        z = f.float().transpose(0, 1)  # (T, B, r)
        sq = (z * z).sum(-1)
        d2 = torch.baddbmm(sq.unsqueeze(-1) + sq.unsqueeze(-2), z, z.transpose(-1, -2), alpha=-2.0).clamp_min(0.0)
        kern = sum(torch.exp(-d2 * beta[s_]) for s_ in range(beta.numel()))  # (T, B, B)
        kbar = wn.transpose(1, 2) @ kern @ wn  # (T, K, K)
        diag = torch.diagonal(kbar, dim1=-2, dim2=-1)
        mmd2 = diag[:, i] + diag[:, j] - 2.0 * kbar[:, i, j]  # (T, P)
        per_pair = (mmd2 * valid).sum(0)[n_valid > 0] / n_valid[n_valid > 0]
        per_layer.append(pair_reduce(per_pair, reduction))
    return torch.stack(per_layer).mean()


# --- capture -------------------------------------------------------------------------------------
def capture_features(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the decoder once and return ``{layer name: A drop(x)}`` (for held-out measurements)."""
    captured: list = []
    supervised_hidden(model, dict(batch), capture=captured)
    return _check_capture(captured)


def _check_capture(captured: list) -> dict[str, torch.Tensor]:
    """One feature per adapted layer, or an error (a doubled capture means rows would be mixed)."""
    out: dict[str, torch.Tensor] = {}
    for name, phi in captured:
        if name in out:
            raise RuntimeError(
                f"adapter layer {name!r} was captured twice in one forward; features must be captured "
                "in the main forward only (is a forward hook or a reentrant checkpoint re-running it?)"
            )
        out[name] = phi
    if not out:
        raise RuntimeError("no adapter features were captured: inject LoRA layers before using Align-LoRA")
    return out


# --- objective ------------------------------------------------------------------------------------
class AlignObjective:
    """``(model, batch) -> (L_LM + lambda * L_align, logs)`` for the trainer, one micro-batch per call.

    Logs (scalars, averaged over micro-steps by the trainer): ``lm_loss``, ``align_loss`` (0 on a
    skipped micro-batch), ``inter_task_kl`` (mean inter-task symmetric KL, the "distance", always
    computed, detached; 0 when skipped), ``align_skipped`` (1 on a skipped micro-batch, so its
    step average is the skipped share) and ``align_tasks`` (tasks in the micro-batch).
    ``self.skipped`` / ``self.calls`` count skipped and total micro-batches over the run.
    """

    def __init__(
        self,
        config: AlignConfig | None = None,
        *,
        num_tasks: int | None = None,
        reduce_fn: ReduceFn | None = None,
    ):
        self.config = config or AlignConfig()
        self.num_tasks = num_tasks
        self.reduce_fn = reduce_fn or _identity
        self.skipped = 0
        self.calls = 0

    def __call__(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        self.calls += 1
        if batch.get("task_ids") is None:
            raise ValueError("Align-LoRA needs explicit task ids in the batch (TaskCollator provides them)")
        captured: list = []
        h, targets = supervised_hidden(model, dict(batch), capture=captured)
        if targets.numel() == 0:
            raise ValueError("batch has no supervised tokens (every label is -100)")
        lm_loss = F.cross_entropy(model.get_output_embeddings()(h).float(), targets)
        feats = _check_capture(captured)
        train_align = cfg.lam > 0 and torch.is_grad_enabled()
        if train_align and model.training:
            stale = [name for name, phi in feats.items() if not phi.requires_grad]
            if stale:
                raise RuntimeError(
                    f"captured adapter features have no gradient (e.g. {stale[0]!r}) while the model trains: "
                    "the alignment loss would be a constant. Reentrant gradient checkpointing does this; "
                    "enable it with gradient_checkpointing_kwargs={'use_reentrant': False} "
                    "(train.gradient_checkpointing does)"
                )
        if not train_align:
            feats = {name: phi.detach() for name, phi in feats.items()}
        task_ids, mask = batch["task_ids"], batch["attention_mask"]
        n_tasks = int(torch.unique(task_ids).numel())
        stats = self.reduce_fn(task_statistics(feats, task_ids, mask, self.num_tasks, cfg.statistics))
        kl = kl_from_stats(stats, cfg.reduction, cfg.eps, cfg.variance == "unbiased")
        if kl is None:
            return self._skip(lm_loss, n_tasks, task_ids)
        if cfg.loss == "kl":
            align = kl
        elif cfg.mmd_kernel == "repo":
            align = mmd_loss_per_position(feats, task_ids, mask, reduction=cfg.reduction)
            if align is None:
                return self._skip(lm_loss, n_tasks, task_ids)
        else:
            align = mmd_loss(
                feats,
                task_ids,
                mask,
                bandwidths=cfg.mmd_bandwidths,
                relative=cfg.mmd_relative,
                tokens_per_task=cfg.mmd_tokens_per_task,
                reduction=cfg.reduction,
            )
            if align is None:
                return self._skip(lm_loss, n_tasks, task_ids)
        loss = lm_loss + cfg.lam * align if train_align else lm_loss
        logs = {
            "lm_loss": lm_loss.detach(),
            "align_loss": align.detach(),
            "inter_task_kl": kl.detach(),
            "align_skipped": 0.0,
            "align_tasks": float(n_tasks),
        }
        return loss, logs

    def _skip(self, lm_loss: torch.Tensor, n_tasks: int, task_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if self.config.require_all_steps:
            raise UserError(
                "align.require_all_steps",
                f"a micro-batch holds fewer than two tasks with tokens (task ids {task_ids.tolist()}); use "
                "data.sampler: task_balanced with data.tasks_per_batch >= 2, or set require_all_steps: false",
            )
        self.skipped += 1
        logs = {
            "lm_loss": lm_loss.detach(),
            "align_loss": 0.0,
            "inter_task_kl": 0.0,
            "align_skipped": 1.0,
            "align_tasks": float(n_tasks),
        }
        return lm_loss, logs


# --- plot -----------------------------------------------------------------------------------------
def make_objective(config, *, num_tasks: int | None = None, reduce_fn=None) -> AlignObjective:
    """Align-LoRA's objective from a run config (the method registry's factory)."""
    return AlignObjective(config.align, num_tasks=num_tasks, reduce_fn=reduce_fn)


def plot_after_training(run, state, out) -> None:
    """Align-LoRA's after-training hook (``mtlora.methods``): the loss plot beside the adapter."""
    plot_align_history(state.history, out / "align_history.png")


def plot_align_history(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Plot lm_loss, align_loss and inter_task_kl per optimiser step into a PNG, written atomically.

    Uses a bare ``Figure`` on the Agg canvas (no pyplot global state, safe off the main thread) and
    writes a temporary file beside ``path`` that is renamed into place.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    keys = [("lm_loss", "LM loss"), ("align_loss", "alignment loss"), ("inter_task_kl", "inter-task sym. KL")]
    fig = Figure(figsize=(11, 3.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(keys))
    for ax, (key, title) in zip(axes, keys, strict=True):
        pts = [
            (row["step"], float(row[key])) for row in history if key in row and math.isfinite(float(row[key]))
        ]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, marker="." if len(pts) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    from mtlora.fileio import atomic_write_with

    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
