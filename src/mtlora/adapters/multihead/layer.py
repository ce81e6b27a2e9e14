"""Multi-head LoRA: HydraLoRA, R-LoRA and M-LoRA as one layer class with options.

::

                         ┌────────────── router W_r (N x d_in), fp32 softmax ──► w(x) (..., N)
                         │                         (M-LoRA / head_weights: fixed w)
    x ──► W0 (frozen) ───┼──────────────────────────────────────────────────────────┐
    │                    │                                                          + ──► h
    └─► [drop] ─► A ─► phi (..., r)                                                 │
                       │   expand to (..., N, r), ONE dropout call = N independent masks
                       └─► [drop_i] ─► z_i = s * w_i * drop_i(phi)    (..., N, r)  ──┤
                                        one matmul of z (..., N*r) with B_flat (d_out, N*r)

    h = W0 x + s * sum_i w_i(x) * B_i drop_i(A x)  - s * offset_B offset_A x     B = stack(B_1..B_N)
        (offset: zero_init "offset" with random heads only; its r columns join the same matmul)

    hydralora: one dropout mask on x (before A), learned router, A kaiming, B_i = 0, W_r kaiming
    rlora:     A x computed once, an independent mask per head on the r-dim A x, learned router
               (sees the un-dropped x), multi-head random init + frozen offset, W_r = 0 (uniform start)
    mlora:     rlora without router: w_i = 1/N (combine="mean") or 1 (combine="sum")

Why the router weights are folded in *before* the B contraction: ``sum_i w_i B_i z_i`` equals
``B_flat @ concat_i(w_i z_i)``, so all heads are one GEMM of inner size ``N*r`` (the same FLOPs as
a single LoRA of rank ``N*r``) and the ``(..., N, d_out)`` per-head outputs are never materialised.

Multi-head random init (R-LoRA, arXiv:2502.15455, gamma = 64), ``c = m^(1/4) / sqrt(gamma)``
with ``m`` the rank as the released ``reinit.py`` computes it (``scale_dim: d_out`` gives LoRA-GA's
``d_out^(1/4)``). ``init_scale: paper`` draws ``A ~ c N(0, 1/d_in)`` and every ``B_i ~ c N(0, 1/d_out)``
with a zero router; ``init_scale: repo`` transcribes ``reinit.py``: the factor is multiplied in
inside the head loop (A ends at ``c^N``, head i at ``c^(N-i)``) and the router keeps its kaiming
init, so the router weights, and with them the initial update, depend on the input.

Random heads make ``sum_i w_i B_i A`` non-zero at step 0. Two ways to start from the base model
(``zero_init``):

- ``offset`` (default, as ``reinit.py``): keep the heads as drawn and subtract the frozen
  ``s * (sum_i w0_i B_i^0) A^0`` (``w0``: the fixed weights, or 1/N for a router, as the repo's
  mean). It is held as two low-rank buffers (``offset_B`` (d_out, r), ``offset_A`` (r, d_in)) on the
  un-dropped ``x``, saved with the adapter and folded in at merge, instead of being written into W0
  (the repo's shift is lost when only the adapter is saved). ``sum_i w_i B_i`` stays the mean head,
  so A's gradient is non-zero from the first step.
- ``center``: ``B_i -= mean_j B_j``. With uniform initial weights ``sum_i w_i B_i = 0``, so A's
  gradient at init is ~0 (its signal only arrives once B has moved): "B learns, A frozen" at the
  start, a different training dynamics from the authors' code. Kept as an ablation.

Either way the initial update is zero only up to fp32 rounding (logits ~1e-6 from the base's on tiny
models) and only for input-independent initial weights; zero-B inits (``lora``, ``hydra``) give an
exactly zero update. In training mode with per-head dropout the masks differ per head, so the update
at step 0 is zero only in expectation (``E drop_i(phi) = phi``).

Router modes (``router``): ``token`` (the papers' per-token ``w(x) = softmax(W_r x)``, HydraLoRA and
R-LoRA), ``task`` (a learned per-task softmax ``w_t = softmax(L[t])`` from the batch's explicit task
ids, read from the forward context, MTL-LoRA-like), ``task+token`` (``softmax(W_r x + L[t])``) and
``mean`` (fixed ``1/N``, M-LoRA's). ``L`` (num_tasks x N) starts at 0, so every mode starts uniform
and the frozen offset (which uses ``1/N``) keeps the initial update zero. The trainer sets
``num_tasks`` from the run's tasks; the task-name -> id map is saved with the adapter.

Dropout: ``input`` (R-LoRA's HydraLoRA baseline: one mask on x shared by the heads), ``per_head``
(R-LoRA: a mask per head on the r-dim A x), ``input_per_head`` (the original HydraLoRA code: its
head loop calls ``lora_dropout(x)``, a separate mask on x per head, so N projections of x).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtlora.adapters.backends import add_low_rank, project_kept
from mtlora.adapters.context import current_context
from mtlora.adapters.lora import LoraConfig, LoraLinear
from mtlora.errors import UserError

METHODS = ("hydralora", "rlora", "mlora")
INITS = ("lora", "hydra", "multihead")
INIT_SCALES = ("paper", "repo")
SCALE_DIMS = ("rank", "d_out")
ZERO_INITS = ("offset", "center")
DROPOUT_MODES = ("input", "per_head", "input_per_head")
COMBINES = ("mean", "sum")
ROUTERS = ("token", "task", "task+token", "mean")
TASK_ROUTERS = ("task", "task+token")


@dataclass
class MultiHeadLoraConfig(LoraConfig):
    """HydraLoRA / R-LoRA / M-LoRA. Options left ``None`` take the method's published default."""

    method: str = field(default="rlora", metadata={"help": "hydralora, rlora or mlora"})
    num_heads: int = field(default=5, metadata={"help": "number of B heads N sharing one A"})
    init: str | None = field(
        default=None,
        metadata={
            "help": "lora (A kaiming, B_i = 0, router 0), hydra (as lora, router kaiming), multihead "
            "(R-LoRA random heads, mean-centred). Default: hydra for hydralora, multihead otherwise"
        },
    )
    init_scale: str = field(
        default="paper",
        metadata={
            "help": "multihead init scale: paper (one factor c for A and every head, zero router) or repo "
            "(a transcription of R-LoRA's reinit.py: c compounds in the head loop, A at c^N, head i at "
            "c^(N-i), kaiming router)"
        },
    )
    scale_dim: str = field(
        default="rank",
        metadata={
            "help": "m of c = m^(1/4)/sqrt(gamma): rank (R-LoRA's reinit.py) or d_out (LoRA-GA's "
            "convention); init_scale: repo needs rank"
        },
    )
    gamma: float = field(default=64.0, metadata={"help": "gamma of the multihead init scale"})
    zero_init: str = field(
        default="offset",
        metadata={
            "help": "how random heads start from the base model: offset (subtract the frozen initial update, "
            "saved with the adapter, as reinit.py) or center (B_i -= mean B_j; A's gradient at init ~0)"
        },
    )
    dropout_mode: str | None = field(
        default=None,
        metadata={
            "help": "input (one mask on x, R-LoRA's HydraLoRA baseline), per_head (independent mask per head "
            "on A x, R-LoRA/M-LoRA) or input_per_head (a mask on x per head, HydraLoRA's code). "
            "Default: input for hydralora, per_head otherwise"
        },
    )
    combine: str = field(default="mean", metadata={"help": "M-LoRA head combination: mean or sum"})
    router: str | None = field(
        default=None,
        metadata={"help": "token (softmax(W_r x), the papers'), task (learned per-task softmax from the batch's "
                  "task ids), task+token (both logits summed) or mean (1/N). Default: token, mean for mlora"},
    )
    num_tasks: int | None = field(
        default=None, metadata={"help": "tasks a task router knows (set by the trainer from the run's tasks)"}
    )
    head_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "fixed per-head weights replacing the learned router (makes the adapter mergeable)"
        },
    )
    load_balance_coef: float = field(
        default=0.0,
        metadata={"help": "Switch-style router load-balancing loss weight (0 = off, as in both papers)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise UserError("adapter.method", f"expected one of {list(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise UserError("adapter.num_heads", f"expected a positive integer, got {self.num_heads!r}")
        if self.init is None:
            self.init = "hydra" if self.method == "hydralora" else "multihead"
        if self.dropout_mode is None:
            self.dropout_mode = "input" if self.method == "hydralora" else "per_head"
        if self.router is None:
            self.router = "mean" if self.method == "mlora" else "token"
        if self.router not in ROUTERS:
            raise UserError("adapter.router", f"expected one of {list(ROUTERS)}, got {self.router!r}")
        if self.method == "mlora" and self.router != "mean":
            raise UserError("adapter.router", "mlora has no router (its heads are mixed by combine); use rlora")
        if self.router in TASK_ROUTERS and self.head_weights is not None:
            raise UserError("adapter.router", f"{self.router} routing learns its weights; drop head_weights")
        if self.num_tasks is not None and (not isinstance(self.num_tasks, int) or self.num_tasks < 1):
            raise UserError("adapter.num_tasks", f"expected an integer >= 1, got {self.num_tasks!r}")
        for name, allowed in (
            ("init", INITS),
            ("init_scale", INIT_SCALES),
            ("scale_dim", SCALE_DIMS),
            ("zero_init", ZERO_INITS),
            ("dropout_mode", DROPOUT_MODES),
            ("combine", COMBINES),
        ):
            if getattr(self, name) not in allowed:
                raise UserError(
                    f"adapter.{name}", f"expected one of {list(allowed)}, got {getattr(self, name)!r}"
                )
        if not self.gamma > 0:
            raise UserError("adapter.gamma", f"expected a positive number, got {self.gamma!r}")
        if self.init_scale == "repo" and self.scale_dim != "rank":
            raise UserError("adapter.scale_dim", "expected rank with init_scale: repo (reinit.py uses the rank)")
        if self.head_weights is not None:
            if self.method == "mlora":
                raise UserError("adapter.head_weights", "expected none for mlora (set combine: mean or sum)")
            if len(self.head_weights) != self.num_heads:
                raise UserError(
                    "adapter.head_weights",
                    f"expected {self.num_heads} weights (one per head), got {len(self.head_weights)}",
                )
            self.head_weights = [float(v) for v in self.head_weights]
        if self.load_balance_coef < 0:
            raise UserError(
                "adapter.load_balance_coef", f"expected a number >= 0, got {self.load_balance_coef!r}"
            )
        if self.load_balance_coef > 0 and not self.has_router:
            raise UserError("adapter.load_balance_coef", "expected 0: this adapter has no learned router")

    @property
    def has_router(self) -> bool:
        """A learned token router (``token`` / ``task+token``), the one the load-balancing loss acts on."""
        return self.router in ("token", "task+token") and self.head_weights is None

    def fixed_weights(self) -> list[float] | None:
        """The fixed per-head weights when nothing is learned (mlora, ``mean``, head_weights), else None."""
        if self.method == "mlora":
            return [1.0 / self.num_heads if self.combine == "mean" else 1.0] * self.num_heads
        if self.router == "mean" and self.head_weights is None:
            return [1.0 / self.num_heads] * self.num_heads
        return self.head_weights


class MultiHeadLoraLinear(LoraLinear):
    """``h = W0 x + s * sum_i w_i(x) B_i drop_i(A x)`` with all heads in one batched op."""

    config_class: ClassVar[type[LoraConfig]] = MultiHeadLoraConfig

    # --- parameters -----------------------------------------------------------------------------
    def _init_adapter(self, config: MultiHeadLoraConfig) -> None:  # type: ignore[override]
        w = self.base_layer.weight
        n, r, d_in, d_out = config.num_heads, self.r, self.in_features, self.out_features
        self.method = config.method
        self.num_heads = n
        self.dropout_mode = config.dropout_mode
        self.per_head_dropout = config.dropout_mode == "per_head"
        self.dropout_p = config.dropout
        self.load_balance_coef = config.load_balance_coef
        self.lora_A = nn.Linear(d_in, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Parameter(torch.zeros(n, d_out, r, device=w.device, dtype=w.dtype))
        fixed = config.fixed_weights()
        self.router_mode = config.router
        self.task_router = None
        if config.router in TASK_ROUTERS:
            if config.num_tasks is None:
                raise UserError("adapter.num_tasks", f"router: {config.router} needs the number of tasks (the "
                                "trainer sets it from the run's tasks)")
            self.task_router = nn.Parameter(torch.zeros(config.num_tasks, n, device=w.device, dtype=w.dtype))
        if fixed is None:
            has_token = config.router in ("token", "task+token")
            self.router = nn.Linear(d_in, n, bias=False, device=w.device, dtype=w.dtype) if has_token else None
            self.register_buffer("head_weights", None)
        else:
            self.router = None
            self.register_buffer(
                "head_weights", torch.tensor(fixed, dtype=torch.float32, device=w.device), persistent=False
            )
        # frozen initial update s * offset_B offset_A, subtracted on the un-dropped x (zero_init: offset)
        has_offset = config.init == "multihead" and config.zero_init == "offset"
        self.register_buffer("offset_A", torch.zeros(r, d_in, device=w.device, dtype=w.dtype) if has_offset else None)
        self.register_buffer("offset_B", torch.zeros(d_out, r, device=w.device, dtype=w.dtype) if has_offset else None)
        # not parameters: the last load-balancing loss (training only) and an optional analysis probe
        self.last_aux_loss: torch.Tensor | None = None
        self.router_probe: list[torch.Tensor] | None = None
        self._reset_heads(config)

    @torch.no_grad()
    def _reset_heads(self, config: MultiHeadLoraConfig) -> None:
        if config.init != "multihead":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            self.lora_B.zero_()
            if self.router is not None:
                if config.init == "hydra":
                    nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))
                else:
                    nn.init.zeros_(self.router.weight)
            return
        if config.init_scale == "repo":
            self._reinit_repo(config.gamma)
        else:
            m = self.r if config.scale_dim == "rank" else self.out_features
            c = m**0.25 / math.sqrt(config.gamma)
            nn.init.normal_(self.lora_A.weight, std=c / math.sqrt(self.in_features))
            heads = torch.randn(self.lora_B.shape, dtype=torch.float64) * (c / math.sqrt(self.out_features))
            self.lora_B.copy_(heads)
            if self.router is not None:
                nn.init.zeros_(self.router.weight)  # uniform 1/N at the start
        if self.lora_B.is_meta:  # a shape-only model (parameter counting): there are no values to shift
            return
        heads = self.lora_B.double()
        if config.zero_init == "center":
            self.lora_B.copy_(heads - heads.mean(0, keepdim=True))  # centred in fp64, rounded once
        else:
            fixed = self.head_weights
            w0 = torch.full((self.num_heads,), 1.0 / self.num_heads, dtype=torch.float64) if fixed is None else fixed
            self.offset_A.copy_(self.lora_A.weight)
            self.offset_B.copy_(torch.einsum("n,nor->or", w0.to(heads), heads))

    def _reinit_repo(self, gamma: float) -> None:
        """R-LoRA's ``reinit_lora_modules`` (``lora_A_init = lora_B_init = "unit"``, ``init_scale =
        "stable"``), statement for statement, so the RNG draws and the compounding match: the scale
        block sits inside the head loop, multiplying A and every head once per head. The router
        keeps R-LoRA's layer init (kaiming-uniform, drawn here after the heads)."""
        m_b, n_b = self.out_features, self.r  # lora_B{i}.weight.shape
        m_a, n_a = self.lora_A.weight.shape
        nn.init.normal_(self.lora_A.weight, mean=0.0, std=1.0 / (max(m_a, n_a) ** 0.5))
        for i in range(self.num_heads):
            nn.init.normal_(self.lora_B[i], mean=0.0, std=1.0 / (max(m_b, n_b) ** 0.5))
            self.lora_A.weight.mul_((m_a**0.25) / gamma**0.5)
            for j in range(self.num_heads):
                self.lora_B[j].mul_((n_b**0.25) / gamma**0.5)
        if self.router is not None:
            nn.init.kaiming_uniform_(self.router.weight, a=math.sqrt(5))

    # --- router ---------------------------------------------------------------------------------
    def router_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Head weights in fp32: (..., N) per token, (batch, 1.., N) per task, or fixed (N,)."""
        if self.router is None and self.task_router is None:
            return self.head_weights
        with torch.autocast(x.device.type, enabled=False):  # fp32 under a bf16/fp16 autocast too
            logits = 0.0 if self.router is None else F.linear(x.float(), self.router.weight.float())
            if self.task_router is not None:
                per_task = self.task_router.float()[self._task_ids(x)]  # (batch, N)
                logits = logits + per_task.view(x.shape[0], *([1] * (x.dim() - 2)), self.num_heads)
        return torch.softmax(logits, dim=-1)

    def _task_ids(self, x: torch.Tensor) -> torch.Tensor:
        ids = current_context().task_ids
        if ids is None:
            raise UserError(self.name, f"router: {self.router_mode} needs the batch's task ids; run the model inside "
                                       "mtlora.adapters.forward_context(task_ids=...) (the trainer and evaluator do)")
        ids = ids.to(self.task_router.device).long().view(-1)
        if ids.numel() != x.shape[0]:
            raise UserError(self.name, f"expected one task id per row ({x.shape[0]}), got {ids.numel()}")
        n = self.task_router.shape[0]
        if torch.compiler.is_compiling():  # a value check is a graph break there: checked on the device
            torch._assert_async(((ids >= 0) & (ids < n)).all(), f"{self.name}: task id out of range 0..{n - 1}")
        elif ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
            raise UserError(self.name, f"task id out of range: expected 0..{n - 1}, got {ids.tolist()}")
        return ids

    def _load_balance_loss(self, probs: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's ``N * sum_i f_i P_i`` (f_i: share of tokens whose top head is i)."""
        p = probs.reshape(-1, self.num_heads)
        f = F.one_hot(p.argmax(-1), self.num_heads).float().mean(0)
        return self.num_heads * (f * p.mean(0)).sum()

    # --- forward --------------------------------------------------------------------------------
    def adapter_delta(self, x: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """The multi-head update (plain ops), or ``base`` plus it on the fast ops when ``base`` is given.
        No fused route: the update mixes N heads per token (``fused_route`` is False)."""
        ctx = current_context()
        if ctx.stacked is not None and self.name in ctx.stacked:
            raise UserError(
                self.name, "stacked per-example adapters are plain-LoRA only; got a multi-head layer"
            )
        dropping = self.training and self.dropout_p > 0
        per_head = self.per_head_dropout and dropping
        per_head_x = self.dropout_mode == "input_per_head" and dropping
        w = self.router_weights(x)
        if self.router is not None:
            if self.router_probe is not None:
                self.router_probe.append(w.detach())
            if self.load_balance_coef > 0 and self.training:
                self.last_aux_loss = self._load_balance_loss(w)
        if per_head_x:  # HydraLoRA's code: every head projects its own dropped copy of x
            xs = F.dropout(x.unsqueeze(-2).expand(*x.shape[:-1], self.num_heads, x.shape[-1]), self.dropout_p)
            z = xs @ self.lora_A.weight.T  # (..., N, r)
            phi = z.mean(-2)  # what capture sees: the heads' mean input to B
        else:
            # input: one mask on x. per_head: A sees x, masks come per head below.
            keep, rescale = (None, 1.0) if self.dropout_mode != "input" else self.lora_dropout.keep_mask(x)
            if base is None:  # the reference: plain ops
                phi = F.linear(x if keep is None else x * keep, self.lora_A.weight)  # (..., r), computed once
            else:  # the fast route: the same product, keeping the 1-byte mask instead of x * keep
                phi = project_kept(x, keep, self.lora_A.weight)
            if rescale != 1.0:
                phi = phi * rescale
        if ctx.capture is not None:
            ctx.capture.append((self.name, phi))
        w = (w * self.scaling).to(phi.dtype)
        if per_head_x:
            z = (z * w.unsqueeze(-1)).flatten(-2)
            b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_heads * self.r)
        elif self.router is None and self.task_router is None and not per_head:  # fixed weights: one (d_out, r)
            z, b = phi, torch.einsum("n,nor->or", w, self.lora_B)
        else:
            z = phi.unsqueeze(-2).expand(*phi.shape[:-1], self.num_heads, self.r)
            if per_head:  # one call on the (..., N, r) tensor: an independent mask for every head
                z = F.dropout(z, self.dropout_p, training=True)
            z = (z * w.unsqueeze(-1)).flatten(-2)  # fold the router weights in before the B contraction
            b = self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_heads * self.r)
        if self.offset_A is not None:  # minus the frozen initial update, in the same GEMM
            z = torch.cat([z, (x @ self.offset_A.T.to(x.dtype)) * -self.scaling], dim=-1)
            b = torch.cat([b, self.offset_B.to(b.dtype)], dim=-1)
        if base is None:
            return F.linear(z, b)
        return add_low_rank(base, z, b, 1.0)

    # --- merge ----------------------------------------------------------------------------------
    def can_merge(self) -> str | None:
        if self.router is not None:
            return (
                f"{self.method} has a learned token router, so its update depends on the input "
                "(only mlora or a fixed head_weights router can be merged)"
            )
        if self.task_router is not None:
            return f"{self.method} routes by task, so its update depends on the task (one merge per task)"
        return None

    def delta_weight(self) -> torch.Tensor:
        """``s * ((sum_i w_i B_i) A - offset_B offset_A)`` for fixed head weights (exact: no dropout at inference)."""
        if self.can_merge() is not None:
            raise UserError(self.name, f"cannot form a dense update: {self.can_merge()}")
        b = torch.einsum("n,nor->or", self.head_weights.to(self.lora_B.dtype), self.lora_B)
        delta = b @ self.lora_A.weight
        if self.offset_A is not None:
            delta = delta - self.offset_B @ self.offset_A
        return delta * self.scaling

    def extra_repr(self) -> str:
        router = "learned" if self.router is not None else "fixed"
        offset = ", offset" if self.offset_A is not None else ""
        return (
            f"{self.method}, heads={self.num_heads}, r={self.r}, scaling={self.scaling:g}, router={router}, "
            f"dropout={self.dropout_mode}{offset}"
        )


def router_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Weighted load-balancing loss of the last training forward, averaged over router layers.

    Call right after the forward pass and add it to the loss: ``loss = loss + aux`` when not None.
    Returns None when no layer has ``load_balance_coef > 0`` or none ran in training mode since the
    last call (stored losses are consumed, so an eval pass never leaks into a later step). With
    *reentrant* gradient checkpointing the forward runs without a graph, so the loss would carry no
    gradient: that is refused here rather than silently logged as a constant.
    """
    losses = []
    for module in model.modules():
        if isinstance(module, MultiHeadLoraLinear) and module.last_aux_loss is not None:
            losses.append(module.load_balance_coef * module.last_aux_loss)
            module.last_aux_loss = None
    if not losses:
        return None
    total = torch.stack(losses).mean()
    if torch.is_grad_enabled() and not total.requires_grad:
        raise RuntimeError(
            "router load-balancing loss has no gradient (reentrant gradient checkpointing?); "
            "use gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    return total
