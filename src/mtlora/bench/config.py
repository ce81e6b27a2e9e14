"""The bench grid: a YAML of ``base`` + ``methods`` + ``seeds`` -> one validated run config per cell.

Methods keys beside the run-config overrides: ``role`` (which of the papers' methods this is: used
by the orderings check and the "theirs" column), ``label`` (table name), ``eval_only`` (evaluate
the base model with adapters disabled; run once, since it does not depend on the seed) and
``cell_timeout_s`` (this method's own limit, e.g. for a cell trained on all the data).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mtlora.config import RunConfig, deep_merge, load_config, parse_overrides
from mtlora.errors import UserError
from mtlora.fileio import atomic_write_json, atomic_write_text
from mtlora.methods import get_method

CELLS_DIR = "cells"
CELL_CONFIG = "cell.yaml"
CELL_SPEC = "cell_spec.json"
CELL_RESULT = "cell.json"
CELL_ERROR = "error.txt"
CELL_LOG = "log.txt"
RUN_DIR = "run"
RUN_STAMP = "run_config_hash.txt"

BENCH_KEYS = (
    "title", "base", "methods", "seeds", "output_dir", "isolate", "jobs", "threads", "cell_timeout_s", "notes",
    "papers",
)
METHOD_KEYS = ("role", "label", "eval_only", "cell_timeout_s")  # bench-level keys; the rest overrides RunConfig

ROLES = (
    "zero_shot", "lora", "lora_matched", "hydralora", "rlora", "mlora", "align_kl", "align_mmd",
    "meta_k50", "meta_k100", "lora_full", "lora_k50", "lora_k100",
)

DEFAULT_PAPERS = Path(__file__).resolve().parents[3] / "configs" / "bench" / "papers.yaml"
"""The papers' numbers and claims shipped with the repository (a bench YAML may name its own)."""


@dataclass
class MethodSpec:
    name: str
    overrides: dict[str, Any]
    role: str | None = None
    label: str | None = None
    eval_only: bool = False
    cell_timeout_s: float | None = None

    @property
    def display(self) -> str:
        return self.label or self.name


@dataclass
class BenchConfig:
    """A grid: every method in ``methods`` at every seed, each a RunConfig = ``base`` + overrides."""

    base: dict[str, Any]
    methods: dict[str, MethodSpec]
    seeds: list[int]
    output_dir: Path
    title: str = "mtlora bench"
    isolate: bool = True
    jobs: int = 1
    threads: int | None = None
    cell_timeout_s: float | None = None
    notes: str = ""
    source: str = "<bench>"
    papers: Path = DEFAULT_PAPERS

    def seeds_of(self, method: MethodSpec) -> list[int]:
        return self.seeds[:1] if method.eval_only else list(self.seeds)

    def cells(self) -> list[tuple[MethodSpec, int]]:
        """Seed-major order, so a grid stopped early has every method at the first seeds."""
        return [(m, s) for s in self.seeds for m in self.methods.values() if s in self.seeds_of(m)]

    def cell_dir(self, method: MethodSpec, seed: int) -> Path:
        return self.output_dir / CELLS_DIR / method.name / f"seed{seed}"


def read_yaml(path: Path, missing: str) -> Any:
    """A YAML file's content; a missing file or a syntax error is a one-line user error."""
    if not path.is_file():
        raise UserError(path, missing)
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(path, "invalid YAML", line=mark.line + 1 if mark else None) from None


def _as_overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return parse_overrides(value)
    raise UserError(where, "expected a mapping of overrides or a list of key=value strings")


def load_bench_config(path: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read a bench YAML; ``overrides`` (``key=value``) apply to it, e.g. ``seeds=[0]`` or
    ``base.train.max_steps=2`` or ``output_dir=runs/x``. Every cell's run config is validated later by
    ``prepare_cells`` (with the cell's file and line in the error)."""
    path = Path(path)
    raw = read_yaml(path, "bench config file not found")
    if not isinstance(raw, dict):
        raise UserError(path, "expected a mapping with base, methods, seeds, output_dir")
    raw = deep_merge(raw, parse_overrides(list(overrides)))
    if raw.get("papers") is not None and not Path(str(raw["papers"])).is_absolute():
        raw["papers"] = str(path.parent / str(raw["papers"]))  # relative to the bench file, like an include
    return bench_from_dict(raw, source=str(path))


def bench_from_dict(raw: dict[str, Any], source: str = "<bench>") -> BenchConfig:
    unknown = sorted(set(raw) - set(BENCH_KEYS))
    if unknown:
        raise UserError(source, f"unknown key {unknown[0]!r}; expected one of {list(BENCH_KEYS)}")
    for key in ("base", "methods", "output_dir"):
        if key not in raw:
            raise UserError(source, f"missing key {key!r}")
    if not isinstance(raw["base"], dict):
        raise UserError(source, "base: expected a mapping (a run config)")
    if not isinstance(raw["methods"], dict) or not raw["methods"]:
        raise UserError(source, "methods: expected a non-empty mapping name -> overrides")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(source, f"seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise UserError(source, "seeds: a seed is listed twice")
    methods: dict[str, MethodSpec] = {}
    for name, value in raw["methods"].items():
        name = str(name)
        if not name.replace("_", "").replace("-", "").isalnum():
            raise UserError(source, f"methods.{name}: expected a name of letters, digits, _ and - (it is a folder)")
        overrides = _as_overrides(value, f"{source}: methods.{name}")
        bench_keys = {k: overrides.pop(k) for k in METHOD_KEYS if k in overrides}
        role = bench_keys.get("role")
        if role is not None and role not in ROLES:
            raise UserError(source, f"methods.{name}.role: expected one of {list(ROLES)}, got {role!r}")
        if "output_dir" in overrides or ("train" in overrides and "seed" in (overrides["train"] or {})):
            raise UserError(source, f"methods.{name}: output_dir and train.seed are set by the bench")
        timeout = bench_keys.get("cell_timeout_s")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
            raise UserError(source, f"methods.{name}.cell_timeout_s: expected a positive number, got {timeout!r}")
        methods[name] = MethodSpec(name, overrides, role, bench_keys.get("label"), bool(bench_keys.get("eval_only")),
                                   None if timeout is None else float(timeout))
    timeout = raw.get("cell_timeout_s")
    return BenchConfig(
        base=raw["base"],
        methods=methods,
        seeds=seeds,
        output_dir=Path(str(raw["output_dir"])),
        title=str(raw.get("title", "mtlora bench")),
        isolate=bool(raw.get("isolate", True)),
        jobs=_positive_int(raw.get("jobs", 1), "jobs", source),
        threads=None if raw.get("threads") is None else _positive_int(raw["threads"], "threads", source),
        cell_timeout_s=float(timeout) if timeout is not None else None,
        notes=str(raw.get("notes", "")),
        source=source,
        papers=DEFAULT_PAPERS if raw.get("papers") is None else Path(str(raw["papers"])),
    )


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(source, f"{key}: expected an integer >= 1, got {value!r}")
    return value


def _base_for(base: dict[str, Any], method: str | None) -> dict[str, Any]:
    """The shared base without the keys this cell's method does not read (the run config refuses them)."""
    from mtlora.config import NOT_READ_BY_METHOD

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for dotted in NOT_READ_BY_METHOD.get(method or "", {}):
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def cell_config_dict(bench: BenchConfig, method: MethodSpec, seed: int) -> dict[str, Any]:
    """The full run config of one cell: base, then the method's overrides, then seed and output folder."""
    merged = deep_merge(_base_for(bench.base, method.overrides.get("method", bench.base.get("method"))),
                        method.overrides)
    merged = deep_merge(merged, {"train": {"seed": seed}})
    merged["output_dir"] = str(bench.cell_dir(method, seed) / RUN_DIR)
    return merged


def config_hash(config: dict[str, Any]) -> str:
    """Identity of a cell's config, so a finished cell is reused only for the same config."""
    text = json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_cells(bench: BenchConfig) -> list[tuple[MethodSpec, int, RunConfig]]:
    """Write every cell's ``cell.yaml`` + spec and validate it now, before any model loads.

    Writing the config file first means an error names that file and line, and anyone can re-run a
    single cell by hand with ``mtlora train <cell>/cell.yaml``.
    """
    out = []
    for method, seed in bench.cells():
        cell = bench.cell_dir(method, seed)
        raw = cell_config_dict(bench, method, seed)
        header = f"# mtlora train {cell / CELL_CONFIG}   (cell {method.name} / seed {seed} of {bench.source})\n"
        text = header + yaml.safe_dump(raw, sort_keys=False)
        if not (cell / CELL_CONFIG).is_file() or (cell / CELL_CONFIG).read_text() != text:
            atomic_write_text(cell / CELL_CONFIG, text)
        spec = {"method": method.name, "seed": seed, "role": method.role, "label": method.display,
                "eval_only": method.eval_only, "config_hash": config_hash(raw)}
        atomic_write_json(cell / CELL_SPEC, spec)
        config = load_config(cell / CELL_CONFIG)
        if get_method(config.method).k_shot and method.eval_only:
            raise UserError(bench.source, f"methods.{method.name}: eval_only needs a plain method")
        out.append((method, seed, config))
    return out


def adapter_summary(config: RunConfig) -> str:
    """Short text of a cell's adapter for the table: e.g. ``lora r=8`` or ``rlora 5x r=4``."""
    a = config.adapter_config()
    targets = a.target_modules if isinstance(a.target_modules, str) else "/".join(
        t.replace("_proj", "") for t in a.target_modules)
    heads = f"{a.num_heads}x " if hasattr(a, "num_heads") else ""
    describe = get_method(config.method).describe
    extra = describe(config) if describe else ""
    return f"{a.method} {heads}r={a.r} ({targets}){extra}"
