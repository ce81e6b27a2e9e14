"""Running the grid: one process per cell, resumable, seed-major, outputs rewritten after every cell.

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

- **One subprocess per cell** (default ``isolate: true``): ``ru_maxrss`` is process-wide and only
  grows, so the peak memory of a cell is only its own in a fresh process; a segfault or an OOM kill
  of one cell is recorded in its ``error.txt`` and the others still run. ``isolate: false`` runs
  cells in this process (tests); peak RSS then means "peak of the whole bench process so far" and
  the table says so.
- **Resumable at two levels**: a cell with ``cell.json`` (and the same config hash) is skipped; a
  cell interrupted mid-training resumes from its ``run/checkpoint`` via ``train(resume=True)``.
- **Seed-major order** (every method at seed 0, then seed 1, ...): a grid stopped early still
  gives a full table with fewer seeds, rather than some methods with no result at all.
- **Every cell keeps its per-example correctness** (``cell.json``'s ``examples``), so any two
  methods can be compared example by example and seed by seed (``statistics.py``).
"""

from __future__ import annotations

import json
import os
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

from mtlora.bench.budgets import budget_report, count_budgets, training_data_seen
from mtlora.bench.config import (
    CELL_CONFIG,
    CELL_ERROR,
    CELL_LOG,
    CELL_RESULT,
    CELL_SPEC,
    RUN_DIR,
    RUN_STAMP,
    BenchConfig,
    adapter_summary,
    load_bench_config,
    prepare_cells,
)
from mtlora.bench.report import code_version, machine_info, rereport_results, write_outputs
from mtlora.bench.statistics import finished, per_example_correctness
from mtlora.config import load_config
from mtlora.errors import UserError
from mtlora.fileio import atomic_write_json, atomic_write_text


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


def _examples_of(config, report: dict[str, Any]) -> dict[str, Any] | None:
    """Per-example correctness of the final evaluation, keyed by stable example ids.

    The eval examples are loaded as the run loaded them (same tasks, same cap, hash order), and
    checked against the predictions' tasks and gold answers before anything is kept.
    """
    from mtlora.data.tasks import load_tasks

    predictions = report.get("predictions") or []
    if not predictions:
        return None
    return per_example_correctness(predictions, load_tasks(config.tasks, "eval", config.data.max_eval_per_task))


def _training_data(config, eval_only: bool) -> dict[str, Any]:
    try:
        return training_data_seen(config, eval_only=eval_only)
    except (UserError, OSError, ValueError) as exc:  # never lose a trained cell over its bookkeeping
        return {"error": str(exc)}


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
        atomic_write_text(stamp, spec["config_hash"] + "\n")
        from mtlora.train import train

        summary = train(config, resume=resumed, overwrite=not resumed, progress=progress)
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
        "training_data": _training_data(config, spec["eval_only"]),
        "examples": _examples_of(config, report),
    }
    atomic_write_json(cell / CELL_RESULT, result)
    return result


PROTOCOL_RESULT = "eval_{protocol}.json"
"""A finished cell's evaluation under a second protocol (``mtlora bench CONFIG --protocol P``)."""


def evaluate_cell_protocol(cell: Path, protocol: str, max_per_task: int | None, max_new_tokens: int,
                           progress: bool = False) -> dict[str, Any]:
    """Evaluate a finished cell's trained adapter (or the base, for an eval-only cell) again under
    ``protocol`` on the first ``max_per_task`` eval examples of each task, and write
    ``eval_<protocol>.json`` beside ``cell.json`` (same keys: ``eval``, ``examples``)."""
    from mtlora.adapters import set_adapters_enabled
    from mtlora.adapters.io import load_adapter_weights
    from mtlora.data.tasks import load_tasks
    from mtlora.evaluate import evaluate
    from mtlora.train import prepare_run

    cell = Path(cell)
    spec = json.loads((cell / CELL_SPEC).read_text())
    config = load_config(cell / CELL_CONFIG)
    start = time.perf_counter()
    run = prepare_run(config)  # the cell's model with freshly injected adapters of the cell's type
    if spec["eval_only"]:
        set_adapters_enabled(run.model, False)
    else:
        from mtlora.train import ADAPTER_DIR

        load_adapter_weights(run.model, Path(config.output_dir) / ADAPTER_DIR)  # the adapter train() saved last
    examples = load_tasks(config.tasks, "eval", max_per_task)
    report = evaluate(run.model, run.tokenizer, examples, batch_size=config.eval.batch_size,
                      max_new_tokens=max_new_tokens, progress=progress, task_names=run.task_names,
                      protocol=protocol).to_dict()
    result = {
        **{k: spec[k] for k in ("method", "seed", "config_hash")},
        "protocol": protocol, "max_per_task": max_per_task, "max_new_tokens": max_new_tokens,
        "eval": _strip_eval(report), "wall_seconds": time.perf_counter() - start,
        "examples": per_example_correctness(report.get("predictions") or [], examples),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(cell / PROTOCOL_RESULT.format(protocol=protocol), result)
    return result


def run_protocol(bench: BenchConfig, protocol: str, *, max_per_task: int | None, max_new_tokens: int,
                 echo: Callable[[str], None] = print, only: Sequence[str] | None = None) -> list[str]:
    """``evaluate_cell_protocol`` for every finished cell that lacks it (resumable: done cells are
    skipped); returns the cells that failed. Seed-major, like the grid."""
    failed = []
    cells = prepare_cells(bench)
    for index, (method, seed, _config) in enumerate(cells, 1):
        cell, name = bench.cell_dir(method, seed), f"{method.name}/seed{seed}"
        spec_hash = json.loads((cell / CELL_SPEC).read_text())["config_hash"]
        target = cell / PROTOCOL_RESULT.format(protocol=protocol)
        if (only and method.name not in only) or not finished(cell, spec_hash):
            continue
        if target.is_file():
            done = json.loads(target.read_text())
            if (done.get("config_hash"), done.get("max_per_task"), done.get("max_new_tokens")) == (
                    spec_hash, max_per_task, max_new_tokens):
                continue
        echo(f"[{index}/{len(cells)}] {name}: evaluating under {protocol}")
        try:
            result = evaluate_cell_protocol(cell, protocol, max_per_task, max_new_tokens)
        except UserError as exc:  # e.g. the trained adapter is gone: run/ folders are not committed
            echo(f"[{index}/{len(cells)}] {name}: not scored under {protocol}: {exc.format()}")
            failed.append(name)
            continue
        except Exception:  # noqa: BLE001  one broken cell must not lose the others
            _record_error(cell, traceback.format_exc())
            echo(f"[{index}/{len(cells)}] {name}: FAILED under {protocol} (see {cell / CELL_ERROR})")
            failed.append(name)
            continue
        echo(f"[{index}/{len(cells)}] {name}: {protocol} macro {100 * result['eval']['macro']['primary']:.1f} "
             f"in {result['wall_seconds']:.0f} s")
    return failed


def _record_error(cell: Path, text: str) -> None:
    atomic_write_text(cell / CELL_ERROR, text if text.endswith("\n") else text + "\n")


def _run_cell_in_process(cell: Path, progress: bool) -> dict[str, Any] | None:
    try:
        result = run_cell(cell, progress=progress)
    except Exception:  # noqa: BLE001  one broken cell must not lose the grid (KeyboardInterrupt still stops it)
        _record_error(cell, traceback.format_exc())
        return None
    result["isolated"] = False
    return result


CELL_ENTRY = "import sys; from mtlora.bench.runner import cell_main; sys.exit(cell_main(sys.argv[1]))"
"""What a cell's own process runs: an internal entry point, not a command (``mtlora bench`` is the CLI)."""


def cell_main(cell: str | Path) -> int:
    """Run one cell in this (fresh) process; a failure is recorded for the parent, which carries on."""
    cell = Path(cell)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
        if os.environ.get("MTLORA_BENCH_THREADS"):
            import torch

            torch.set_num_threads(int(os.environ["MTLORA_BENCH_THREADS"]))
        run_cell(cell, progress=False)
    except Exception:  # noqa: BLE001  recorded for the parent, which carries on with the grid
        _record_error(cell, traceback.format_exc())
        traceback.print_exc()
        return 1
    return 0


def _run_cell_subprocess(cell: Path, timeout: float | None, threads: int | None = None) -> dict[str, Any] | None:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "MTLORA_BENCH_ISOLATED": "1"}
    if threads is not None:  # on an oversubscribed machine 1 thread beats 2 spinning ones by far
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MTLORA_BENCH_THREADS=str(threads))
    with (cell / CELL_LOG).open("w") as log:
        try:
            proc = subprocess.run([sys.executable, "-c", CELL_ENTRY, str(cell)],
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
        if finished(cell, spec_hash):
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
            result = _run_cell_subprocess(cell, method.cell_timeout_s or bench.cell_timeout_s, bench.threads)
        else:
            result = _run_cell_in_process(cell, progress)
            if result is not None:  # persist the mode so the table can say what peak RSS means
                atomic_write_json(cell / CELL_RESULT, result)
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
    protocol: str | None = None,
    max_per_task: int | None = None,
    max_new_tokens: int = 16,
) -> int:
    """The ``mtlora bench`` command; returns the exit code (1 if any cell failed).

    ``protocol``: evaluate the finished cells again under it (``run_protocol``), then rewrite the
    outputs; nothing trains.

    ``config`` may also be a grid's ``results.json`` with ``report_only``: the outputs beside it are
    rewritten from that file alone (for grids whose cell folders are gone).
    """
    if Path(config).suffix == ".json":
        if not report_only or budgets_only or only or overrides:
            raise UserError(config, "a results.json can only be re-reported: pass --report and nothing else")
        for key, value in rereport_results(Path(config), command=command).items():
            echo(f"{key}: {value}")
        return 0
    bench = load_bench_config(config, overrides)
    if budgets_only:
        for row in budget_report(bench):
            rank = "" if row["matched_lora_rank"] is None else f"   closest LoRA rank: r={row['matched_lora_rank']}"
            count = "?" if row["trainable_parameters"] is None else f"{row['trainable_parameters']:,d}"
            echo(f"{row['method']:<16} {row['adapter']:<40} {count:>12}{rank}")
        return 0
    if protocol is not None:
        if protocol not in ("generate_extract", "loglik") or budgets_only or report_only:
            raise UserError("--protocol", f"expected generate_extract or loglik (and neither --report nor --budgets), "
                            f"got {protocol!r}")
        if max_per_task is not None and max_per_task < 1 or max_new_tokens < 1:
            raise UserError("--protocol", "expected --max-per-task >= 1 and --max-new-tokens >= 1")
        failed = run_protocol(bench, protocol, max_per_task=max_per_task, max_new_tokens=max_new_tokens,
                              echo=echo, only=only)
        outcome = run_bench(bench, command=command, progress=progress, echo=echo, only=only, execute=False)
        for key, value in outcome.paths.items():
            echo(f"{key}: {value}")
        if failed:
            echo(f"cells not scored under {protocol} (why: the line of each above; error.txt in the cell for a crash): " + ", ".join(failed))
        return 1 if failed else 0
    outcome = run_bench(bench, command=command, progress=progress, echo=echo, only=only, execute=not report_only)
    echo(f"ran {len(outcome.ran)}, skipped {len(outcome.skipped)} finished, failed {len(outcome.failed)}")
    for key, value in outcome.paths.items():
        echo(f"{key}: {value}")
    if outcome.failed:
        echo("failed cells (see error.txt in each): " + ", ".join(outcome.failed))
        return 1
    return 0


