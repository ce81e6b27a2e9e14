"""A line-by-line port of the released Align-LoRA losses, the oracle for the ``repo`` options.

Source: github.com/jinda-liu/Align-LoRA, ``custom.py``: ``MMD_Trainer`` (``sigmas``, ``beta``,
``pairwise_distance_3d``, ``gaussian_kernel_matrix``, ``maximum_mean_discrepancy``) and
``KL_Trainer`` (``_kl_divergence_diag_gaussian``, ``kl_loss``), plus the pair/layer averaging of
``compute_representation_loss``. Features are ``(N, S, r)`` per task group. The sigmas are fp32
here (the original builds them in bf16); everything else is the original's statements.
"""

from __future__ import annotations

from itertools import combinations

import torch

SIGMAS = torch.tensor(
    [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1, 5, 10, 15, 20, 25, 30, 35, 100, 1e3, 1e4, 1e5, 1e6], dtype=torch.float32
)
BETA = 1.0 / (2 * SIGMAS.view(-1, 1, 1, 1))


def pairwise_distance_3d(x, y):
    return torch.sum((x.unsqueeze(1) - y.unsqueeze(0)) ** 2, dim=-1)


def gaussian_kernel_matrix(x, y):
    dist = pairwise_distance_3d(x, y)
    expanded_dist = dist.unsqueeze(0)
    s = -BETA * expanded_dist
    return torch.exp(s).sum(0)


def maximum_mean_discrepancy(x, y):
    xx = gaussian_kernel_matrix(x, x).mean()
    yy = gaussian_kernel_matrix(y, y).mean()
    xy = gaussian_kernel_matrix(x, y).mean()
    return xx + yy - 2 * xy


def _kl_divergence_diag_gaussian(mu1, var1, mu2, var2, epsilon=1e-8):
    var1_eps = var1 + epsilon
    var2_eps = var2 + epsilon
    log_var_ratio = torch.log(var2_eps) - torch.log(var1_eps)
    trace_term = var1_eps / var2_eps
    mu_diff_term = (mu2 - mu1) ** 2 / var2_eps
    kl_div = 0.5 * (log_var_ratio + trace_term + mu_diff_term - 1)
    return torch.mean(torch.sum(kl_div, dim=-1))


def kl_loss(source_features, target_features):
    mu_source = torch.mean(source_features, dim=0)
    var_source = torch.var(source_features, dim=0)
    mu_target = torch.mean(target_features, dim=0)
    var_target = torch.var(target_features, dim=0)
    kl_source_target = _kl_divergence_diag_gaussian(mu_source, var_source, mu_target, var_target)
    kl_target_source = _kl_divergence_diag_gaussian(mu_target, var_target, mu_source, var_source)
    return (kl_source_target + kl_target_source) / 2.0


def representation_loss(layers: list[list[torch.Tensor]], pair_loss) -> torch.Tensor:
    """``compute_representation_loss``: per layer the mean over task pairs, then the mean over layers."""
    total = torch.tensor(0.0)
    for groups in layers:
        layer_total, count = torch.tensor(0.0), 0
        for group1, group2 in combinations(groups, 2):
            layer_total += pair_loss(group1, group2)
            count += 1
        total += layer_total / count
    return total / len(layers)
