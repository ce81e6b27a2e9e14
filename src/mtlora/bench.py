"""``mtlora bench``: a grid of runs (methods x seeds) -> ``results.json``, ``table.md``, ``chart.png``.

::

    bench YAML                              <output_dir>/
      base:    {RunConfig dict}               cells/<method>/seed<k>/
      methods: {name: overrides + role}          cell.yaml   the cell's full run config (mtlora train-able)
      seeds:   [0, 1, 2]                          cell.json   written atomically when the cell is done
      output_dir: runs/bench/...                  error.txt   why the cell failed (the grid goes on)
                                                  log.txt     the cell's stdout/stderr (subprocess mode)
                                                  run/        train()'s output folder (checkpoints)
                                              results.json, table.md, chart.png   (rewritten after every cell)

Why the grid looks like this:

- **One subprocess per cell** (``python -m mtlora.bench --cell DIR``, default ``isolate: true``):
  ``ru_maxrss`` is process-wide and only grows, so the peak memory of a cell is only its own in a
  fresh process; a segfault or an OOM kill of one cell is recorded in its ``error.txt`` and the
  others still run. ``isolate: false`` runs cells in this process (tests); peak RSS then means
  "peak of the whole bench process so far" and the table says so.
- **Resumable at two levels**: a cell with ``cell.json`` (and the same config hash) is skipped; a
  cell interrupted mid-training resumes from its ``run/checkpoint`` via ``train(resume=True)``.
- **Seed-major order** (every method at seed 0, then seed 1, ...): a grid stopped early still
  gives a full table with fewer seeds, rather than some methods with no result at all.
- **Matched budgets are counted, not assumed**: each method's adapter is injected into the model
  (on the meta device, no weights loaded) and its trainable parameters counted before any training;
  ``matched_lora_rank`` gives the LoRA rank closest to a multi-head budget.

Methods keys beside the run-config overrides: ``role`` (which of the papers' methods this is:
used by the orderings check and the "theirs" column), ``label`` (table name) and ``eval_only``
(evaluate the base model with adapters disabled; run once, since it does not depend on the seed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mtlora.config import RunConfig, deep_merge, load_config, parse_overrides
from mtlora.errors import UserError

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
)
METHOD_KEYS = ("role", "label", "eval_only")  # bench-level keys of a method; the rest overrides RunConfig

ROLES = (
    "zero_shot", "lora", "lora_matched", "hydralora", "rlora", "mlora", "align_kl", "align_mmd",
    "meta_k50", "meta_k100",
)

# DESIGN.md section 7. Theirs, not ours: other models, full data, 1 epoch at lr 2e-4.
PAPER_REFERENCE: dict[str, dict[str, float]] = {
    "theirs: Qwen2.5-3B, 8-task commonsense in-domain avg (Align-LoRA Table 5)": {
        "lora": 76.48, "hydralora": 76.80, "rlora": 77.99, "mlora": 78.51, "align_mmd": 78.35, "align_kl": 80.06,
    },
    "theirs: Qwen2.5-7B, 8-task commonsense in-domain avg (Align-LoRA Table 5)": {
        "lora": 80.48, "hydralora": 80.86, "rlora": 81.74, "mlora": 82.46, "align_mmd": 82.31, "align_kl": 83.95,
    },
    "theirs: Qwen2.5-0.5B, 8 tasks (R-LoRA ablation)": {"hydralora": 64.13, "rlora": 67.31},
}

# The papers' claims, as (left role, relation, right role(s)). "~" = close; ">=~" = not worse.
CLAIMS: list[tuple[str, str, tuple[str, ...], str]] = [
    ("align_kl", ">", ("mlora",), "A-LoRA-K > M-LoRA"),
    ("mlora", ">", ("rlora",), "M-LoRA > R-LoRA"),
    ("rlora", ">", ("hydralora",), "R-LoRA > HydraLoRA"),
    ("hydralora", ">=", ("lora_matched",), "HydraLoRA >= LoRA (equal parameters: rank raised)"),
    ("hydralora", ">=", ("lora",), "HydraLoRA >= LoRA r=8 (the papers' LoRA baseline)"),
    ("align_mmd", ">", ("mlora",), "A-LoRA-M > M-LoRA (Align-LoRA Table 5: it did not, 78.35 < 78.51)"),
    ("lora_matched", "~", ("hydralora", "rlora", "mlora"), "LoRA at the multi-head budget ~ multi-head methods"),
    ("meta_k50", ">=~", ("lora",), "MeTA-LoRA k=50/task matches LoRA on all data"),
    ("meta_k100", ">=~", ("lora",), "MeTA-LoRA k=100/task matches LoRA on all data"),
]


# ------------------------------------------------------------------------------------------ config
@dataclass
class MethodSpec:
    name: str
    overrides: dict[str, Any]
    role: str | None = None
    label: str | None = None
    eval_only: bool = False

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

    def seeds_of(self, method: MethodSpec) -> list[int]:
        return self.seeds[:1] if method.eval_only else list(self.seeds)

    def cells(self) -> list[tuple[MethodSpec, int]]:
        """Seed-major order, so a grid stopped early has every method at the first seeds."""
        return [(m, s) for s in self.seeds for m in self.methods.values() if s in self.seeds_of(m)]

    def cell_dir(self, method: MethodSpec, seed: int) -> Path:
        return self.output_dir / CELLS_DIR / method.name / f"seed{seed}"


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
    if not path.is_file():
        raise UserError(path, "bench config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise UserError(path, "invalid YAML", line=mark.line + 1 if mark else None) from None
    if not isinstance(raw, dict):
        raise UserError(path, "expected a mapping with base, methods, seeds, output_dir")
    raw = deep_merge(raw, parse_overrides(list(overrides)))
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
        methods[name] = MethodSpec(name, overrides, role, bench_keys.get("label"), bool(bench_keys.get("eval_only")))
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
    )


def _positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(source, f"{key}: expected an integer >= 1, got {value!r}")
    return value


def cell_config_dict(bench: BenchConfig, method: MethodSpec, seed: int) -> dict[str, Any]:
    """The full run config of one cell: base, then the method's overrides, then seed and output folder."""
    merged = deep_merge(bench.base, method.overrides)
    merged = deep_merge(merged, {"train": {"seed": seed}})
    merged["output_dir"] = str(bench.cell_dir(method, seed) / RUN_DIR)
    return merged


def config_hash(config: dict[str, Any]) -> str:
    """Identity of a cell's config, so a finished cell is reused only for the same config."""
    text = json.dumps({k: v for k, v in config.items() if k != "output_dir"}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


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
            _atomic_write(cell / CELL_CONFIG, text)
        spec = {"method": method.name, "seed": seed, "role": method.role, "label": method.display,
                "eval_only": method.eval_only, "config_hash": config_hash(raw)}
        _atomic_write(cell / CELL_SPEC, json.dumps(spec, indent=2) + "\n")
        config = load_config(cell / CELL_CONFIG)
        if config.method == "meta_lora" and method.eval_only:
            raise UserError(bench.source, f"methods.{method.name}: eval_only needs a plain method")
        out.append((method, seed, config))
    return out


# ----------------------------------------------------------------------------------- budgets
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
        adapter = config.adapter_config()
        key = json.dumps({"model": config.model, **adapter.to_dict()}, sort_keys=True, default=str)
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


def budget_key(config: RunConfig) -> str:
    return json.dumps({"model": config.model, **config.adapter_config().to_dict()}, sort_keys=True, default=str)


def adapter_summary(config: RunConfig) -> str:
    """Short text of a cell's adapter for the table: e.g. ``lora r=8`` or ``rlora 5x r=4``."""
    if config.method == "base":
        return "-"
    a = config.adapter_config()
    targets = a.target_modules if isinstance(a.target_modules, str) else "/".join(
        t.replace("_proj", "") for t in a.target_modules)
    heads = f"{a.num_heads}x " if hasattr(a, "num_heads") else ""
    extra = {"align_lora": f" + {config.align.loss} align, lambda {config.align.lam:g}",
             "meta_lora": f", meta-trained on k={config.meta.k}/task"}.get(config.method, "")
    return f"{a.method} {heads}r={a.r} ({targets}){extra}"


# -------------------------------------------------------------------------------------- one cell
def _peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _strip_eval(report: dict[str, Any]) -> dict[str, Any]:
    return {k: report[k] for k in ("step", "per_task", "macro", "micro") if k in report}


def run_cell(cell: Path, progress: bool = False) -> dict[str, Any]:
    """Train + evaluate one cell (or evaluate the base for ``eval_only``) and write ``cell.json``."""
    cell = Path(cell)
    spec = json.loads((cell / CELL_SPEC).read_text())
    config = load_config(cell / CELL_CONFIG)
    start = time.perf_counter()
    resumed = False
    if spec["eval_only"]:
        from mtlora.adapters import set_adapters_enabled
        from mtlora.train import evaluate_run, prepare_run

        run = prepare_run(config)
        set_adapters_enabled(run.model, False)
        report = evaluate_run(run, step=0, progress=progress)
        summary: dict[str, Any] = {"trainable_parameters": 0, "train_seconds": 0.0, "steps": 0, "history": []}
    else:
        from mtlora.train import CHECKPOINT_DIR, STATE_FILE

        run_dir = Path(config.output_dir)
        stamp = cell / RUN_STAMP  # which config the checkpoint in run/ belongs to
        resumed = (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file() and (
            stamp.is_file() and stamp.read_text().strip() == spec["config_hash"])
        _atomic_write(stamp, spec["config_hash"] + "\n")
        if config.method == "meta_lora":
            from mtlora.meta import train_meta as trainer
        else:
            from mtlora.train import train as trainer
        summary = trainer(config, resume=resumed, overwrite=not resumed, progress=progress)
        if not summary.get("evals"):
            raise RuntimeError("training finished without an evaluation (no eval examples?)")
        report = summary["evals"][-1]
    history = summary.get("history") or []
    result = {
        **{k: spec[k] for k in ("method", "seed", "role", "label", "eval_only", "config_hash")},
        "config_method": config.method,
        "adapter": "base model, adapters off" if spec["eval_only"] else adapter_summary(config),
        "eval": _strip_eval(report),
        "trainable_parameters": int(summary["trainable_parameters"]),
        "steps": int(summary.get("steps", 0)),
        "final_train_loss": history[-1].get("loss") if history else None,
        "train_seconds": float(summary["train_seconds"]),
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_mb": _peak_rss_mb(),
        "resumed": resumed,
        "isolated": os.environ.get("MTLORA_BENCH_ISOLATED") == "1",  # its own process: peak RSS is its own
        "torch_threads": _torch_threads(),
        "pid": os.getpid(),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _atomic_write(cell / CELL_RESULT, json.dumps(result, indent=2, default=float) + "\n")
    return result


def _record_error(cell: Path, text: str) -> None:
    _atomic_write(cell / CELL_ERROR, text if text.endswith("\n") else text + "\n")


def _run_cell_in_process(cell: Path, progress: bool) -> dict[str, Any] | None:
    try:
        result = run_cell(cell, progress=progress)
    except Exception:  # noqa: BLE001  one broken cell must not lose the grid (KeyboardInterrupt still stops it)
        _record_error(cell, traceback.format_exc())
        return None
    result["isolated"] = False
    return result


def _run_cell_subprocess(cell: Path, timeout: float | None, threads: int | None = None) -> dict[str, Any] | None:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "MTLORA_BENCH_ISOLATED": "1"}
    if threads is not None:  # on an oversubscribed machine 1 thread beats 2 spinning ones by far
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MTLORA_BENCH_THREADS=str(threads))
    with (cell / CELL_LOG).open("w") as log:
        try:
            proc = subprocess.run([sys.executable, "-m", "mtlora.bench", "--cell", str(cell)],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False)
            code: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timeout after {timeout:g} s (the run folder keeps its last checkpoint: a rerun resumes)"
    if (cell / CELL_RESULT).is_file() and code == 0:
        result = json.loads((cell / CELL_RESULT).read_text())
        result["isolated"] = True
        return result
    if not (cell / CELL_ERROR).is_file():  # killed (OOM, signal, timeout) before it could write one
        tail = (cell / CELL_LOG).read_text()[-4000:]
        how = f"exit code {code}" + (f" (signal {-code})" if isinstance(code, int) and code < 0 else "")
        _record_error(cell, f"cell process ended with {how}\n--- last lines of {CELL_LOG} ---\n{tail}")
    return None


# ------------------------------------------------------------------------------------------- grid
@dataclass
class BenchOutcome:
    results: dict[str, Any]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)


def _finished(cell: Path, spec_hash: str) -> bool:
    if not (cell / CELL_RESULT).is_file():
        return False
    try:
        return json.loads((cell / CELL_RESULT).read_text()).get("config_hash") == spec_hash
    except json.JSONDecodeError:
        return False


def machine_info() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": [round(v, 2) for v in load] if load else None,
    }


def code_version() -> dict[str, Any]:
    """Which code ran the grid: the package folder and its git commit (and whether src/ had local edits).

    A snapshot outside git (e.g. ``git archive HEAD src | tar -x -C DIR`` + ``PYTHONPATH=DIR/src``, so
    that colleagues' uncommitted edits cannot reach a running grid) names its commit in
    ``MTLORA_CODE_COMMIT``.
    """
    package = Path(__file__).resolve().parent
    info: dict[str, Any] = {"package": str(package), "git_commit": os.environ.get("MTLORA_CODE_COMMIT")}
    try:
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        info.update(git_commit=head, uncommitted_changes=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def run_bench(
    bench: BenchConfig,
    *,
    command: str | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    only: Sequence[str] | None = None,
    execute: bool = True,
) -> BenchOutcome:
    """Run every unfinished cell, re-aggregating the outputs after each, and return the outcome.

    ``execute=False`` runs nothing: it rewrites the outputs from the finished cells, keeping the
    original run's command, machine and code in the header (and saying what regenerated them).
    """
    cells = prepare_cells(bench)
    if only:
        unknown = sorted(set(only) - set(bench.methods))
        if unknown:
            raise UserError("--only", f"unknown method {unknown[0]!r}; expected some of {list(bench.methods)}")
    budgets = count_budgets([c for m, _, c in cells if not m.eval_only])
    meta = {"command": command, "source": bench.source, "title": bench.title, "machine": machine_info(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "notes": bench.notes,
            "jobs": bench.jobs if bench.isolate else 1, "threads_per_cell": bench.threads, "code": code_version()}
    previous = bench.output_dir / "results.json"
    if not execute and previous.is_file():
        meta = {**json.loads(previous.read_text())["meta"], "title": bench.title,
                "regenerated": {"command": command, "code": meta["code"],
                                "at": datetime.now(UTC).isoformat(timespec="seconds")}}
    outcome = BenchOutcome(results={})
    total = len(cells)
    pending = []
    for index, (method, seed, config) in enumerate(cells, 1):
        cell = bench.cell_dir(method, seed)
        name = f"{method.name}/seed{seed}"
        spec_hash = json.loads((cell / CELL_SPEC).read_text())["config_hash"]
        if _finished(cell, spec_hash):
            outcome.skipped.append(name)
            continue
        if (only and method.name not in only) or not execute:
            continue
        if (cell / CELL_RESULT).is_file():  # finished under another config: stale, run again
            echo(f"[{index}/{total}] {name}: config changed since it finished; running it again")
            (cell / CELL_RESULT).unlink()
            shutil.rmtree(cell / RUN_DIR, ignore_errors=True)
        (cell / CELL_ERROR).unlink(missing_ok=True)
        pending.append((index, name, cell, method, config))

    def execute(item) -> tuple[Any, dict[str, Any] | None, float]:
        index, name, cell, method, config = item
        echo(f"[{index}/{total}] {name}: running ({'eval only' if method.eval_only else adapter_summary(config)})")
        t0 = time.perf_counter()
        if bench.isolate:
            result = _run_cell_subprocess(cell, bench.cell_timeout_s, bench.threads)
        else:
            result = _run_cell_in_process(cell, progress)
            if result is not None:  # persist the mode so the table can say what peak RSS means
                _atomic_write(cell / CELL_RESULT, json.dumps(result, indent=2, default=float) + "\n")
        return item, result, time.perf_counter() - t0

    def record(item, result, seconds: float) -> None:
        index, name, cell = item[:3]
        if result is None:
            outcome.failed.append(name)
            lines = (cell / CELL_ERROR).read_text().strip().splitlines()
            echo(f"[{index}/{total}] {name}: FAILED after {seconds:.0f} s: {lines[-1] if lines else '?'} "
                 f"(see {cell / CELL_ERROR})")
        else:
            outcome.ran.append(name)
            echo(f"[{index}/{total}] {name}: macro acc {100 * result['eval']['macro']['primary']:.1f} "
                 f"in {result['wall_seconds']:.0f} s")
        # results.json + table.md after every cell (a stopped grid keeps its table); the chart at the end
        outcome.results, outcome.paths = write_outputs(bench, cells, budgets, meta, chart=False)

    if bench.jobs > 1 and bench.isolate:
        from concurrent.futures import ThreadPoolExecutor, as_completed

        with ThreadPoolExecutor(max_workers=bench.jobs) as pool:
            for future in as_completed([pool.submit(execute, item) for item in pending]):
                record(*future.result())
    else:
        for item in pending:
            record(*execute(item))
    outcome.results, outcome.paths = write_outputs(bench, cells, budgets, meta, chart=True)
    return outcome


# ------------------------------------------------------------------------------------- aggregate
def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(bench: BenchConfig, cells, budgets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean/std over seeds (accuracy in points), parameters, time, memory; plus failures."""
    methods: dict[str, Any] = {}
    failed, missing = [], []
    for method in bench.methods.values():
        rows, config = [], None
        for m, seed, c in cells:
            if m.name != method.name:
                continue
            config = c
            cell = bench.cell_dir(m, seed)
            spec_hash = json.loads((cell / CELL_SPEC).read_text())["config_hash"]
            if _finished(cell, spec_hash):
                row = json.loads((cell / CELL_RESULT).read_text())
                if row.get("isolated") is None:  # cells written before the flag: only subprocesses keep a log
                    row["isolated"] = (cell / CELL_LOG).is_file()
                rows.append(row)
            elif (cell / CELL_ERROR).is_file():
                lines = (cell / CELL_ERROR).read_text().strip().splitlines()
                failed.append({"cell": f"{m.name}/seed{seed}", "error": lines[-1] if lines else "?"})
            else:
                missing.append(f"{m.name}/seed{seed}")
        assert config is not None
        entry: dict[str, Any] = {
            "label": method.display, "role": method.role, "eval_only": method.eval_only,
            "adapter": "base model, adapters off" if method.eval_only else adapter_summary(config),
            "budget_parameters": 0 if method.eval_only else budgets[budget_key(config)]["trainable_parameters"],
            "seeds_planned": bench.seeds_of(method), "seeds_done": [r["seed"] for r in rows],
            "cells": rows,
        }
        if rows:
            tasks = sorted({t for r in rows for t in r["eval"]["per_task"]})
            entry["per_task"] = {}
            for t in tasks:
                vals = [100 * r["eval"]["per_task"][t].get("acc", r["eval"]["per_task"][t].get("exact_match", 0.0))
                        for r in rows if t in r["eval"]["per_task"]]
                mean, std = _mean_std(vals)
                entry["per_task"][t] = {"mean": mean, "std": std, "values": vals,
                                        "n": rows[0]["eval"]["per_task"].get(t, {}).get("n")}
            macro = [100 * r["eval"]["macro"]["primary"] for r in rows]
            mean, std = _mean_std(macro)
            entry["macro"] = {"mean": mean, "std": std, "values": macro, "eval_se": _macro_se(entry["per_task"])}
            entry["trainable_parameters"] = rows[0]["trainable_parameters"]
            entry["train_seconds"] = _mean_std([r["train_seconds"] for r in rows])[0]
            entry["wall_seconds"] = _mean_std([r["wall_seconds"] for r in rows])[0]
            entry["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
            entry["isolated"] = all(r.get("isolated", False) for r in rows)
            entry["steps"] = rows[0]["steps"]
            entry["resumed"] = any(r.get("resumed") for r in rows)
        methods[method.name] = entry
    return {"methods": methods, "failed": failed, "missing": missing, "orderings": check_orderings(methods)}


def _macro_se(per_task: dict[str, dict[str, Any]]) -> float | None:
    """Binomial standard error (points) of a macro average from n eval examples per task.

    The seed spread says how much training noise moves a score; this says how much the choice of
    eval examples does, which dominates when each task has only a few dozen examples.
    """
    terms = []
    for stats in per_task.values():
        p, n = stats["mean"] / 100, stats.get("n")
        if not n:
            return None
        terms.append(p * (1 - p) / n)
    return 100 * math.sqrt(sum(terms)) / len(terms) if terms else None


def _by_role(methods: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for entry in methods.values():
        if entry.get("role") and "macro" in entry and entry["role"] not in out:
            out[entry["role"]] = entry
    return out


def check_orderings(methods: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claimed relation on the macro means, with the seed spread ``sqrt(std_a^2 + std_b^2)``.

    ``>``: held if the difference is positive; "beyond the seed spread" if it also exceeds the
    spread. ``>=``: held unless the left one is lower by more than the spread. ``~`` and ``>=~``
    (close / not worse): held if the gap is within the spread; with one seed there is no spread, so
    these are reported as undetermined, with the raw difference.
    """
    roles = _by_role(methods)
    out = []
    for left, rel, rights, text in CLAIMS:
        row: dict[str, Any] = {"claim": text, "relation": rel, "left": left, "right": list(rights)}
        if left not in roles or any(r not in roles for r in rights):
            row["verdict"] = "not run"
            out.append(row)
            continue
        a = roles[left]["macro"]
        right_means = [roles[r]["macro"]["mean"] for r in rights]
        b_mean = sum(right_means) / len(right_means)
        b_stds = [roles[r]["macro"]["std"] for r in rights]
        diff = a["mean"] - b_mean
        if a["std"] is None or any(s is None for s in b_stds):
            spread = None
        else:
            b_std = math.sqrt(sum(s * s for s in b_stds)) / len(b_stds)  # std of the mean of the right side
            spread = math.sqrt(a["std"] ** 2 + b_std**2)
        beyond = spread is not None and abs(diff) > spread
        if rel == ">":
            held = diff > 0
        elif rel == ">=":
            held = diff >= 0 or (spread is not None and -diff <= spread)
        else:  # "~" / ">=~"
            held = None if spread is None else (abs(diff) <= spread if rel == "~" else -diff <= spread)
        if held is None:
            verdict = "undetermined (one seed: no spread)"
        elif held:
            verdict = "held" + (" (beyond the seed spread)" if beyond and rel in (">", ">=") else
                                "" if rel not in (">", ">=") else " (within the seed spread)" if spread is not None
                                else " (one seed: spread unknown)")
        else:
            verdict = "did not hold" + (" (beyond the seed spread)" if beyond else
                                        " (within the seed spread)" if spread is not None else
                                        " (one seed: spread unknown)")
        ses = [a.get("eval_se")] + [roles[r]["macro"].get("eval_se") for r in rights]
        eval_se = None if any(v is None for v in ses) else math.sqrt(ses[0] ** 2 + (
            math.sqrt(sum(v * v for v in ses[1:])) / len(rights)) ** 2)
        if held and rel in (">", ">=") and beyond and eval_se is not None and abs(diff) <= eval_se:
            verdict += ", but within the eval-set SE"
        # "matches" / "close" claims are empty when the reference itself did not move off the base model
        base = roles.get("zero_shot")
        if held and rel in ("~", ">=~") and base is not None:
            gain = b_mean - base["macro"]["mean"]
            noise = max(v for v in (spread, eval_se, 0.0) if v is not None)
            if gain <= noise:
                verdict += f" (vacuous: the reference is {gain:+.1f} pp from zero-shot, within the noise)"
        row.update({"left_mean": a["mean"], "right_mean": b_mean, "diff": diff, "spread": spread,
                    "eval_se": eval_se, "held": held, "beyond_spread": beyond, "verdict": verdict})
        out.append(row)
    return out


# -------------------------------------------------------------------------------------- outputs
def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return "0" if n == 0 else f"{n / 1e6:.2f}M"


def render_markdown(results: dict[str, Any]) -> str:
    """``table.md``: how it was made, per-task and macro accuracy, orderings, the papers' numbers."""
    meta, agg = results["meta"], results["aggregate"]
    methods = agg["methods"]
    tasks = sorted({t for e in methods.values() for t in e.get("per_task", {})})
    machine = meta["machine"]
    lines = [f"# {meta['title']}", ""]
    lines += [f"- command: `{meta['command'] or 'mtlora bench ' + meta['source']}`",
              f"- config: `{meta['source']}`; written {results['written_at']} (UTC); code: commit "
              f"{(meta.get('code') or {}).get('git_commit') or 'unknown'}"
              + (" with uncommitted changes" if (meta.get("code") or {}).get("uncommitted_changes") else ""),
              f"- machine: {machine['platform']}, {machine['cpu_count']} CPU cores visible, torch "
              f"{machine['torch']} with {machine['torch_threads']} threads"
              + (f", GPU {machine['cuda']}" if machine.get("cuda") else "")
              + (f"; {meta['jobs']} cells at a time" + (f", {meta['threads_per_cell']} torch thread(s) each"
                 if meta.get("threads_per_cell") else "") if meta.get("jobs") else "")
              + (f"; load average at start {machine['load_average_at_start']}" if machine.get(
                  "load_average_at_start") else ""),
              f"- model `{results['base'].get('model')}`, tasks {', '.join(results['base'].get('tasks', []))}; "
              f"seeds {results['seeds']}"]
    if meta.get("regenerated"):
        regen = meta["regenerated"]
        lines += [f"- table regenerated from the finished cells at {regen['at']} by `{regen['command']}` "
                  f"(code {regen['code'].get('git_commit') or 'unknown'})"]
    if meta.get("notes"):
        lines += [f"- notes: {meta['notes']}"]
    lines += ["", "## Accuracy (%, mean ± sample std over seeds; eval split of each task)", ""]
    n_row = {t: next((e["per_task"][t]["n"] for e in methods.values() if t in e.get("per_task", {})), None)
             for t in tasks}
    head = ["method", "adapter", "trainable params", "seeds"] + [f"{t} (n={n_row[t]})" for t in tasks] + [
        "macro", "eval SE", "steps", "train s", "wall s", "peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in methods.values():
        seeds = f"{len(entry['seeds_done'])}/{len(entry['seeds_planned'])}"
        params = entry.get("trainable_parameters", entry["budget_parameters"])
        if "macro" not in entry:
            row = [entry["label"], entry["adapter"], _params(params), seeds] + ["-"] * len(tasks) + [
                "not run / failed", "-", "-", "-", "-", "-"]
        else:
            pt = entry["per_task"]
            row = [entry["label"], entry["adapter"], _params(params), seeds]
            row += [_pm(pt[t]["mean"], pt[t]["std"]) if t in pt else "-" for t in tasks]
            mark = "†" if entry.get("resumed") else ""
            se = entry["macro"].get("eval_se")
            row += [f"**{_pm(entry['macro']['mean'], entry['macro']['std'])}**", "-" if se is None else f"{se:.1f}",
                    str(entry["steps"]),
                    f"{entry['train_seconds']:.0f}{mark}", f"{entry['wall_seconds']:.0f}{mark}",
                    f"{entry['peak_rss_mb']:.0f}" + ("" if entry["isolated"] else "*")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Trainable parameters are counted by injecting each adapter into the model (A, B heads and "
              "router included); 'eval SE' is the binomial standard error of the macro accuracy from the "
              "number of eval examples (the eval set's sampling noise, apart from the seed spread); 'train s' is the optimisation loop only, 'wall s' the whole cell (model "
              "load, training, evaluation), both means over seeds; 'peak RSS MB' is the largest peak resident "
              "memory of a cell's own process (one process per cell)"
              + ("; * = cells run inside the bench process, so the figure is that process's peak so far."
                 if any(not e.get("isolated", True) for e in methods.values() if "macro" in e) else ".")
              + (" † = a cell resumed from a checkpoint of an interrupted attempt: its times are the last "
                 "attempt's only." if any(e.get("resumed") for e in methods.values()) else "")]
    lines += ["", "## The papers' orderings, checked on our macro means", "",
              "| claim | ours: left | ours: right | diff (pp) | seed spread (pp) | eval SE (pp) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for o in agg["orderings"]:
        if o["verdict"] == "not run":
            lines.append(f"| {o['claim']} | - | - | - | - | - | not run |")
            continue
        spread = "-" if o["spread"] is None else f"{o['spread']:.1f}"
        eval_se = "-" if o.get("eval_se") is None else f"{o['eval_se']:.1f}"
        lines.append(f"| {o['claim']} | {o['left_mean']:.1f} | {o['right_mean']:.1f} | {o['diff']:+.1f} | "
                     f"{spread} | {eval_se} | {o['verdict']} |")
    lines += ["", "Seed spread = sqrt(std_left² + std_right²) of the macro accuracy over seeds (a right side of "
              "several methods uses their mean). '>' holds if the difference is positive, and is called "
              "beyond the seed spread only if it exceeds it; '>=' and 'matches' hold unless the left side is "
              "lower by more than the spread; 'close' holds if the gap is within it. Eval SE = the binomial "
              "standard error of the difference from the number of eval examples (unpaired, so conservative): "
              "a difference beyond the seed spread but within it may not carry over to other eval examples. "
              "A 'matches'/'close' verdict is marked vacuous when the reference method is itself not above "
              "zero-shot by more than the noise (then nothing was learned that could be matched)."]
    lines += ["", "## Reference: the papers' numbers (theirs, not ours: larger models, full training sets)", ""]
    sources = list(PAPER_REFERENCE)
    lines += ["| role | ours (this table) | " + " | ".join(sources) + " |", "|" + "---|" * (len(sources) + 2)]
    roles = _by_role(methods)
    for role in ROLES:
        ref = [PAPER_REFERENCE[s].get(role) for s in sources]
        if all(v is None for v in ref) and role not in roles:
            continue
        ours = roles.get(role)
        ours_text = f"{ours['label']}: {_pm(ours['macro']['mean'], ours['macro']['std'])}" if ours else "-"
        lines.append(f"| {role} | {ours_text} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in ref) + " |")
    lines += ["", "The MeTA-LoRA paper's claim is relative (k = 50..100 examples per task match LoRA on all "
              "data); DESIGN.md gives no absolute numbers for it."]
    if agg["failed"] or agg["missing"]:
        lines += ["", "## Cells without a result", ""]
        lines += [f"- {f['cell']}: failed: `{f['error'][:200]}`" for f in agg["failed"]]
        lines += [f"- {c}: not run yet" for c in agg["missing"]]
    return "\n".join(lines) + "\n"


def plot_macro(results: dict[str, Any], path: Path) -> None:
    """Macro accuracy per method with error bars (sample std over seeds) and the seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["aggregate"]["methods"].values() if "macro" in e]
    fig, ax = plt.subplots(figsize=(1.0 * max(len(entries), 3) + 2.5, 4.0))
    if entries:
        xs = list(range(len(entries)))
        means = [e["macro"]["mean"] for e in entries]
        errs = [e["macro"]["std"] or 0.0 for e in entries]
        colors = ["#9aa5b1" if e["eval_only"] else "#2f6fde" for e in entries]
        ax.bar(xs, means, yerr=errs, capsize=4, color=colors)
        for x, e in zip(xs, entries, strict=True):
            ax.scatter([x] * len(e["macro"]["values"]), e["macro"]["values"], color="black", s=10, zorder=3)
        ax.set_xticks(xs, [e["label"] for e in entries], rotation=30, ha="right")
        # bars start at 0: a cut axis would make differences of a point or two look like effects
        ax.set_ylim(0.0, min(100.0, max(max(e["macro"]["values"]) for e in entries) + 10))
    ax.set_ylabel("macro accuracy (%)")
    ax.set_title(results["meta"]["title"] + "\n(bars: mean over the seeds run; error bars: std; dots: single seeds)",
                 fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_outputs(
    bench: BenchConfig, cells, budgets, meta, chart: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """Rewrite results.json, table.md (and chart.png) from whatever cells have finished."""
    results = {
        "meta": meta,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": bench.base,
        "seeds": bench.seeds,
        "methods": {m.name: {"overrides": m.overrides, "role": m.role, "eval_only": m.eval_only}
                    for m in bench.methods.values()},
        "budgets": list(budgets.values()),
        "aggregate": aggregate(bench, cells, budgets),
        "paper_reference": PAPER_REFERENCE,
    }
    out = bench.output_dir
    paths = {"results": str(out / "results.json"), "table": str(out / "table.md"), "chart": str(out / "chart.png")}
    _atomic_write(out / "results.json", json.dumps(results, indent=2, default=float) + "\n")
    _atomic_write(out / "table.md", render_markdown(results))
    if chart:
        plot_macro(results, out / "chart.png")
    return results, paths


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


def bench_command(
    config: Path,
    overrides: Sequence[str] = (),
    *,
    budgets_only: bool = False,
    report_only: bool = False,
    only: Sequence[str] | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
    command: str | None = None,
) -> int:
    """The ``mtlora bench`` command; returns the exit code (1 if any cell failed)."""
    bench = load_bench_config(config, overrides)
    if budgets_only:
        for row in budget_report(bench):
            rank = "" if row["matched_lora_rank"] is None else f"   closest LoRA rank: r={row['matched_lora_rank']}"
            count = "?" if row["trainable_parameters"] is None else f"{row['trainable_parameters']:,d}"
            echo(f"{row['method']:<16} {row['adapter']:<40} {count:>12}{rank}")
        return 0
    outcome = run_bench(bench, command=command, progress=progress, echo=echo, only=only, execute=not report_only)
    echo(f"ran {len(outcome.ran)}, skipped {len(outcome.skipped)} finished, failed {len(outcome.failed)}")
    for key, value in outcome.paths.items():
        echo(f"{key}: {value}")
    if outcome.failed:
        echo("failed cells (see error.txt in each): " + ", ".join(outcome.failed))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mtlora.bench --cell DIR``: run one cell in this (fresh) process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", type=Path, required=True, help="a cell folder written by the bench")
    args = parser.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if os.environ.get("MTLORA_BENCH_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["MTLORA_BENCH_THREADS"]))
        run_cell(args.cell, progress=False)
    except Exception:  # noqa: BLE001  recorded for the parent, which carries on with the grid
        _record_error(args.cell, traceback.format_exc())
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
