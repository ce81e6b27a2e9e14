"""The method registry: the one place that says what each ``method:`` of a run config is.

A method names its adapter type (registered in ``mtlora.adapters``), its training objective, its
training procedure (a plain gradient step, or MeTA-LoRA's meta-iteration), the config section only
it reads, the keys it does not read (with what replaces each, so a config that sets one is refused
instead of silently ignored), and what runs after training. Nothing outside this module branches on
the run's method; adding a method is one entry here (docs/adding_a_method.md shows a worked example).

Objectives, procedures and hooks are named as ``"module:attribute"`` strings and imported when used,
so this module sits low in the import graph (it imports nothing of the project but its errors).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mtlora.errors import UserError

LM_OBJECTIVE = "mtlora.objectives:supervised_lm_loss"
GRADIENT_STEPS = "mtlora.train:GradientSteps"


@dataclass(frozen=True)
class Method:
    name: str
    adapter_type: str
    help: str
    # the LM loss on answer tokens, or "module:factory" with factory(run_config, num_tasks=, reduce_fn=)
    # returning an objective (model, batch) -> (loss, logs)
    objective: str = LM_OBJECTIVE
    procedure: str = GRADIENT_STEPS
    section: str | None = None  # the config section only this method reads
    not_read: dict[str, str] = field(default_factory=dict)  # dotted key -> what replaces it
    single_process: bool = False
    k_shot: bool = False  # trains on a k-shot pool per task (meta.k)
    after_training: tuple[str, ...] = ()  # "module:function(run, state, out)" hooks, main rank only
    describe: Callable[[Any], str] | None = None  # a table's short text of the method's own settings

    def adapter_config(self, keys: dict[str, Any]):
        """The validated adapter config of this method from a run config's ``adapter:`` keys."""
        from mtlora.adapters import make_adapter_config

        return make_adapter_config(self.adapter_type, **keys)

    def load(self, what: str) -> Any:
        module, _, attr = getattr(self, what).partition(":")
        return getattr(importlib.import_module(module), attr)

    def hooks(self) -> list[Callable]:
        out = []
        for path in self.after_training:
            module, _, attr = path.partition(":")
            out.append(getattr(importlib.import_module(module), attr))
        return out


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError("method", f"unknown method {name!r}; expected one of {list(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


for _name, _help in (
    ("lora", "s * B A drop(x) on the chosen linear layers; a PEFT-compatible adapter"),
    ("hydralora", "shared A, N heads B_i mixed by a token router (HydraLoRA)"),
    ("rlora", "HydraLoRA with multi-head dropout and multi-head random init (R-LoRA, arXiv 2502.15455)"),
    ("mlora", "R-LoRA's heads mixed by their mean, no router (M-LoRA)"),
):
    register_method(Method(_name, adapter_type=_name, help=_help))

register_method(Method(
    "align_lora", adapter_type="lora",
    help="plain LoRA + alignment of the tasks' adapter-space Gaussians (Align-LoRA, arXiv 2508.05078)",
    objective="mtlora.objectives.align:make_objective", section="align",
    after_training=("mtlora.objectives.align:plot_after_training",),
    describe=lambda c: f" + {c.align.loss} align, lambda {c.align.lam:g}",
))
register_method(Method(
    "meta_lora", adapter_type="lora",
    help="plain LoRA meta-learned from k examples per task (MeTA-LoRA, arXiv 2510.11598)",
    procedure="mtlora.meta:MetaSteps", section="meta", single_process=True, k_shot=True,
    not_read={
        "train.lr": "meta.outer_lr",
        "train.batch_size": "meta.support_size and meta.query_size",
        "train.grad_accum": "meta.tasks_per_iter",
        "train.epochs": "meta.iterations",
        "train.max_steps": "meta.iterations",
        "train.gradient_checkpointing": "nothing yet (MeTA-LoRA runs without it)",
        "data.sampler": "meta.tasks_per_iter (tasks are drawn per meta-iteration)",
        "data.tasks_per_batch": "meta.tasks_per_iter",
        "data.train_k_shot": "meta.k",
    },
    describe=lambda c: f", meta-trained on k={c.meta.k}/task",
))
