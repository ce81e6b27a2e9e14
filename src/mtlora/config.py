"""Run configuration: YAML files plus ``key=value`` overrides, validated into dataclasses.

A config file names the command that runs it in its header, e.g. ``# mtlora train configs/demo.yaml``.
Every key is checked: an unknown key, a wrong type or a bad value is a ``UserError`` naming the
file, the line (when the key is in the file) and the dotted key, never a silent default.

Sections: top level (model, method, tasks, output_dir, device, precision), ``adapter`` (the method's adapter
config, validated by ``mtlora.adapters.make_adapter_config``), ``data``, ``train``, ``eval``, and the
method-specific ``align`` (Align-LoRA) and ``meta`` (MeTA-LoRA).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtlora.errors import UserError
from mtlora.methods import get_method, method_names

METHODS = method_names()  # mtlora.methods is the registry


def _at_least(obj: Any, section: str, **minimum: float) -> None:
    """Range checks of a section's numeric keys (``None`` passes: it means "no limit" / "unset")."""
    for name, low in minimum.items():
        value = getattr(obj, name)
        if value is not None and not value >= low:  # also rejects NaN
            kind = "an integer" if isinstance(low, int) else "a number"
            raise UserError(f"{section}.{name}", f"expected {kind} >= {low}, got {value!r}")


def _positive(obj: Any, section: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:  # also rejects NaN
            hint = " (or null: none)" if name in _NULLABLE.get(section, ()) else ""
            raise UserError(f"{section}.{name}", f"expected a positive number{hint}, got {value!r}")


_NULLABLE = {"train": ("max_grad_norm",)}


def _choices(obj: Any, section: str) -> None:
    """Every ``Literal`` field of a section holds one of its choices. YAML values are checked on
    loading (``_coerce``); this covers sections built in Python, with the same message."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        value, allowed = vars(obj)[name], typing.get_args(hint)
        if typing.get_origin(hint) is Literal and value not in allowed:
            raise UserError(f"{section}.{name}" if section else name, f"expected one of {list(allowed)}, got {value!r}")


@dataclass
class DataConfig:
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt cut from the left)"})
    max_train_per_task: int | None = field(default=None, metadata={"help": "cap on training examples per task"})
    train_k_shot: int | None = field(
        default=None, metadata={"help": "train on k examples per task drawn per train.seed (MeTA-LoRA's k-shot draw)"}
    )
    max_eval_per_task: int | None = field(
        default=200, metadata={"help": "cap on evaluation examples per task (0: no evaluation, null: all)"}
    )
    sampler: Literal["proportional", "uniform", "task_balanced"] = field(
        default="proportional", metadata={"help": "how batches mix tasks"}
    )
    tasks_per_batch: int | None = field(default=None, metadata={"help": "k tasks per batch (task_balanced)"})

    def __post_init__(self) -> None:
        _choices(self, "data")
        _at_least(self, "data", max_length=1, max_train_per_task=1, train_k_shot=1, max_eval_per_task=0,
                  tasks_per_batch=1)
        if self.tasks_per_batch is not None and self.sampler != "task_balanced":
            raise UserError("data.tasks_per_batch", f"applies to data.sampler=task_balanced only, not {self.sampler!r}")


@dataclass
class TrainConfig:
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch (per process)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps with linear warm-up"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data (if max_steps unset)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimiser steps; overrides epochs"})
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 5
    eval_every: int = field(default=0, metadata={"help": "evaluate every N steps (0: only at the end)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (and at the end)"})
    gradient_checkpointing: bool = False
    retain_freed_memory: bool = field(
        default=True,
        metadata={"help": "keep freed memory in the process (glibc mallopt): no page faults on "
                  "re-allocated activations, at the cost of holding the peak working set"},
    )

    def __post_init__(self) -> None:
        _at_least(self, "train", batch_size=1, grad_accum=1, max_steps=1, seed=0, log_every=1, eval_every=0,
                  save_every=1, weight_decay=0.0)
        _positive(self, "train", "lr", "epochs", "max_grad_norm")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError("train.warmup_ratio", f"expected a number in [0, 1), got {self.warmup_ratio!r}")


@dataclass
class EvalConfig:
    batch_size: int = field(default=16, metadata={"help": "examples per forward pass"})
    max_new_tokens: int = field(default=16, metadata={"help": "generation budget of open-answer tasks"})
    protocol: Literal["loglik", "generate_extract"] = field(
        default="loglik",
        metadata={"help": "loglik (lm-eval's choice log-likelihood) or generate_extract (the papers' scripts: "
                  "instruction prompt, greedy generation, answer extraction; released with max_new_tokens 128)"},
    )

    def __post_init__(self) -> None:
        _choices(self, "eval")
        _at_least(self, "eval", batch_size=1, max_new_tokens=1)


@dataclass
class AlignConfig:
    """Align-LoRA's alignment term (arXiv 2508.05078; docs/align_lora.md)."""

    loss: Literal["kl", "mmd"] = field(default="kl", metadata={"help": "A-LoRA-K (sym. KL) or A-LoRA-M (MMD)"})
    lam: float = field(default=0.2, metadata={"help": "weight lambda of the alignment loss (YAML key: lambda)"})
    reduction: Literal["mean", "sum"] = field(default="mean", metadata={"help": "over task pairs"})
    statistics: Literal["pooled", "per_position"] = field(
        default="pooled", metadata={"help": "Gaussian over all non-pad tokens, or per position"}
    )
    require_all_steps: bool = field(
        default=False, metadata={"help": "error (instead of skip+count) on a batch with fewer than 2 tasks"}
    )
    variance: Literal["biased", "unbiased"] = field(
        default="biased", metadata={"help": "per-task variance: biased (1/n) or unbiased (1/(n-1), the released code)"}
    )
    eps: float = field(default=1e-5, metadata={"help": "variance floor (the released code: 1e-8)"})
    mmd_bandwidths: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0],
        metadata={"help": "log-spaced Gaussian bandwidths sigma of the MMD kernel sum"},
    )
    mmd_relative: bool = field(
        default=True, metadata={"help": "bandwidths multiply the mean pairwise squared distance (detached)"}
    )
    mmd_tokens_per_task: int = field(default=32, metadata={"help": "tokens per task per layer kept for MMD"})
    mmd_kernel: Literal["pooled", "repo"] = field(
        default="pooled",
        metadata={"help": "pooled: token-pooled, subsampled, mmd_bandwidths; repo: the released A-LoRA-M kernel, "
                  "19 absolute bandwidths 1e-6..1e6 between rows at the same position"},
    )

    def __post_init__(self) -> None:
        _choices(self, "align")
        if self.lam < 0:
            raise UserError("align.lambda", f"expected a number >= 0, got {self.lam!r}")
        if self.eps <= 0:
            raise UserError("align.eps", f"expected a positive number, got {self.eps!r}")
        if not self.mmd_bandwidths or any(b <= 0 for b in self.mmd_bandwidths):
            raise UserError("align.mmd_bandwidths", "expected a non-empty list of positive numbers")
        if self.mmd_tokens_per_task < 2:
            raise UserError("align.mmd_tokens_per_task", "expected an integer >= 2")


@dataclass
class MetaConfig:
    """MeTA-LoRA's two-stage meta-learning (arXiv 2510.11598; docs/meta_lora.md).

    The paper gives no values; the defaults are ours: k=50 is the paper's smaller k-shot setting,
    split half support / half query (disjoint, so the query loss measures adaptation). 4+4 examples
    per task and n=4 tasks give a 32-example meta-batch, like an 8-example LoRA step per stage. S=1
    inner step with first order is the cheap standard of first-order MAML/Reptile-style LLM work;
    alpha=1e-2 is a plain SGD step large enough for LoRA's small gradients to move theta_i (untuned:
    no sweep was run); beta=1e-3 is the AdamW lr our plain-LoRA demo uses. ``mean`` aggregation keeps the
    outer step size independent of n.
    """

    k: int = field(default=50, metadata={"help": "examples per task (k-shot), drawn from the train split per seed"})
    pool_seed: int | None = field(
        default=None, metadata={"help": "seed of the k-shot draw (default: train.seed, so seeds vary the data)"}
    )
    support_fraction: float = field(default=0.5, metadata={"help": "share of the k shots in the support pool"})
    support_size: int = field(default=4, metadata={"help": "support examples per task per meta-iteration"})
    query_size: int = field(default=4, metadata={"help": "query examples per task per meta-iteration"})
    tasks_per_iter: int = field(default=4, metadata={"help": "n tasks per meta-iteration"})
    inner_steps: int = field(default=1, metadata={"help": "S inner SGD steps (stage 1)"})
    inner_lr: float = field(default=1e-2, metadata={"help": "alpha, inner (SGD) learning rate"})
    outer_lr: float = field(default=1e-3, metadata={"help": "beta, outer (AdamW) learning rate"})
    aggregation: Literal["mean", "sum", "weighted"] = field(
        default="mean", metadata={"help": "of the n query losses: mean, sum, or weighted by answer tokens"}
    )
    second_order: bool = field(default=False, metadata={"help": "differentiate through the inner steps"})
    iterations: int = field(default=100, metadata={"help": "meta-iterations (outer optimiser steps)"})

    def __post_init__(self) -> None:
        _choices(self, "meta")
        for name in ("k", "support_size", "query_size", "tasks_per_iter", "inner_steps", "iterations"):
            if getattr(self, name) < 1:
                raise UserError(f"meta.{name}", "expected an integer >= 1")
        if not 0 < self.support_fraction < 1:
            raise UserError("meta.support_fraction", "expected a number in (0, 1)")
        if self.pool_seed is not None and self.pool_seed < 0:
            raise UserError("meta.pool_seed", "expected an integer >= 0")
        if self.inner_lr <= 0 or self.outer_lr <= 0:
            raise UserError("meta.inner_lr" if self.inner_lr <= 0 else "meta.outer_lr", "expected a positive number")


@dataclass
class RunConfig:
    model: str = field(default="smollm2-135m", metadata={"help": "alias or local Hugging Face folder"})
    method: str = field(default="lora", metadata={"help": f"one of {METHODS}"})
    tasks: list[str | dict[str, str]] = field(
        default_factory=lambda: ["sst2", "boolq", "copa", "arc_easy"],
        metadata={"help": "built-in names, .jsonl files (hash-split into train/eval) or {name, train, eval} pairs"},
    )
    output_dir: str = "runs/default"
    device: str = field(default="auto", metadata={"help": "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps"})
    precision: Literal["fp32", "bf16", "fp16"] = field(
        default="fp32", metadata={"help": "frozen base dtype (autocast); adapters and optimiser state stay fp32"}
    )
    adapter: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)

    def __post_init__(self) -> None:
        _choices(self, "")
        get_method(self.method)  # an unknown method is a UserError listing the registered ones
        if not self.tasks:
            raise UserError("tasks", "expected at least one task")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(self.device).strip().lower()):
            raise UserError("device", f"expected auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        from mtlora.data.tasks import check_task_source

        for source in self.tasks:
            check_task_source(source)
        self.adapter_config()  # validate now, not after the model has loaded
        check_keys_apply(self)

    @property
    def adapter_type(self) -> str:
        return get_method(self.method).adapter_type

    def adapter_config(self):
        return get_method(self.method).adapter_config(self.adapter)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["align"]["lambda"] = out["align"].pop("lam")
        return out


_YAML_RENAMES = {("align", "lambda"): "lam"}

# Keys a method does not read, and what replaces each: setting one is an error, never a silent no-op;
# sections read by one method only. Both come from the method registry.
NOT_READ_BY_METHOD: dict[str, dict[str, str]] = {m: get_method(m).not_read for m in METHODS}
SECTION_METHOD = {get_method(m).section: m for m in METHODS if get_method(m).section}
# Keys read only under another key's value: (section, key) -> (key it depends on, that value, why).
KEY_CONDITIONS = {
    ("align", "mmd_bandwidths"): ("loss", "mmd", "applies to align.loss=mmd only"),
    ("align", "mmd_relative"): ("loss", "mmd", "applies to align.loss=mmd only"),
    ("align", "mmd_tokens_per_task"): ("loss", "mmd", "applies to align.loss=mmd only"),
    ("align", "mmd_kernel"): ("loss", "mmd", "applies to align.loss=mmd only"),
    ("train", "epochs"): ("max_steps", None, "is not read when train.max_steps is set (it overrides epochs); "
                                           "set one of them"),
}


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def changed_keys(section: Any) -> list[str]:
    """Fields of a section dataclass whose value differs from the default."""
    return [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != _default_of(f)]


def _yaml_name(section: str, name: str) -> str:
    return "lambda" if (section, name) == ("align", "lam") else name


def check_keys_apply(config: RunConfig) -> None:
    """Every key the user set must act in this run (see ``NOT_READ_BY_METHOD`` and friends)."""
    for section, method in SECTION_METHOD.items():
        if config.method != method:
            changed = changed_keys(getattr(config, section))
            if changed:
                key = f"{section}.{_yaml_name(section, changed[0])}"
                raise UserError(key, f"applies to method={method} only; this run is method={config.method}")
    for dotted, replacement in NOT_READ_BY_METHOD.get(config.method, {}).items():
        section, name = dotted.split(".")
        if name in changed_keys(getattr(config, section)):
            raise UserError(dotted, f"is not read by method={config.method}; use {replacement}")
    for (section, name), (depends, value, why) in KEY_CONDITIONS.items():
        obj = getattr(config, section)
        if getattr(obj, depends) != value and name in changed_keys(obj):
            raise UserError(f"{section}.{name}", why)


def _line_of(text: str | None, key: str) -> int | None:
    if not text:
        return None
    pattern = re.compile(rf"^\s*{re.escape(key)}\s*:")
    for number, line in enumerate(text.splitlines(), 1):
        if pattern.match(line):
            return number
    return None


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise UserError(where, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(where, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise UserError(where, f"expected a mapping, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise UserError(where, f"expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(where, f"expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(where, f"expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(where, f"expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str, source: str, text: str | None,
           overridden: frozenset[str] = frozenset()):
    """Build a section dataclass; errors name the YAML file and line, or the command line for an override."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}

    def where(dotted: str, key: str) -> tuple[str, int | None]:
        if dotted in overridden:
            return "<command line>", None
        return source, _line_of(text, key)

    kwargs = {}
    for key, value in raw.items():
        name = _YAML_RENAMES.get((prefix.rstrip("."), key), key)
        dotted = f"{prefix}{key}"
        if name not in known:
            yaml_names = sorted(_yaml_name(prefix.rstrip("."), n) for n in known)
            src, line = where(dotted, key)
            raise UserError(src, f"unknown key {dotted!r}; expected one of {yaml_names}", line=line)
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                src, line = where(dotted, key)
                raise UserError(src, f"{dotted}: expected a mapping", line=line)
            kwargs[name] = _build(annotation, value, f"{dotted}.", source, text, overridden)
        else:
            try:
                kwargs[name] = _coerce(value, annotation, dotted)
            except UserError as exc:
                src, line = where(dotted, key)
                raise UserError(src, f"{dotted}: {exc.message}", line=line) from None
    try:
        return cls(**kwargs)
    except UserError as exc:
        if not exc.where:
            raise UserError(source, exc.message) from None
        src, line = where(exc.where, exc.where.rsplit(".", 1)[-1])
        raise UserError(src, f"{exc.where}: {exc.message}", line=line) from None


def _flatten(nested: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in nested.items():
        keys.add(f"{prefix}{key}")
        if isinstance(value, dict):
            keys |= _flatten(value, f"{prefix}{key}.")
    return keys


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "tasks=[sst2,rte]"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(item, "expected an override of the form key=value (e.g. train.lr=1e-4)")
        key, _, value = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError("<command line>", f"{item}: expected a dotted key such as train.lr")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError("<command line>", f"{item}: {part} is set to a value and used as a section")
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or "cannot parse"
            raise UserError("<command line>", f"{item}: invalid value ({problem})") from None
    return nested


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursively for mappings (``adapter: {r: 4}`` keeps the other keys)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    text = None
    source = "<command line>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(path, "config file not found")
        text = path.read_text()
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or "cannot parse"
            column = f" at column {mark.column + 1}" if mark else ""
            raise UserError(path, f"invalid YAML: {problem}{column}", line=mark.line + 1 if mark else None) from None
        if not isinstance(raw, dict):
            raise UserError(path, "expected a mapping of config keys at the top level")
    overridden: frozenset[str] = frozenset()
    if overrides:
        extra = parse_overrides(overrides)
        overridden = frozenset(_flatten(extra))
        raw = deep_merge(raw, extra)
    return _build(RunConfig, raw, "", source, text, overridden)


def save_config(config: RunConfig, path: str | Path) -> None:
    from mtlora.fileio import atomic_write_text

    atomic_write_text(path, config_yaml(config))


def config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def flat_items(config: RunConfig) -> dict[str, Any]:
    """``{"train.lr": 2e-4, "adapter.r": 8, ...}``: every key of a config, dotted."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(config.to_dict(), "")
    return out


def config_differences(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` for every key that differs (adapter keys compared as
    validated, so an omitted default equals the default written out)."""
    a, b = flat_items(old), flat_items(new)
    diffs = [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if not k.startswith("adapter.") and a.get(k) != b.get(k)]
    ad_a, ad_b = old.adapter_config().to_dict(), new.adapter_config().to_dict()
    diffs += [(f"adapter.{k}", ad_a.get(k), ad_b.get(k)) for k in sorted(set(ad_a) | set(ad_b)) if ad_a.get(k) != ad_b.get(k)]
    return diffs
