"""``mtlora bench``: a grid of runs (methods x seeds) -> ``results.json``, ``table.md``, ``chart.png``.

One module per idea:

- ``config``: the bench YAML -> one validated run config per cell (``cells/<method>/seed<k>/cell.yaml``);
- ``budgets``: what each cell gets: trainable parameters counted on a meta-device model, the
  distinct training examples its sampler hands out;
- ``runner``: one process per cell, resumable, seed-major; every cell keeps its per-example results;
- ``statistics``: means over seeds, paired bootstrap intervals, the papers' claims checked on them
  (the papers' numbers and claims are data: ``configs/bench/papers.yaml``);
- ``report``: ``results.json``, ``table.md`` and ``chart.png``.
"""

from mtlora.bench.budgets import (
    budget_report,
    count_budgets,
    lora_parameter_count,
    matched_lora_rank,
    multihead_parameter_count,
    training_data_seen,
)
from mtlora.bench.config import BenchConfig, MethodSpec, bench_from_dict, load_bench_config, prepare_cells
from mtlora.bench.report import render_markdown, write_outputs
from mtlora.bench.runner import BenchOutcome, bench_command, run_bench, run_cell
from mtlora.bench.statistics import (
    aggregate,
    check_orderings,
    interval_verdict,
    load_papers,
    paired_difference,
)

__all__ = [
    "BenchConfig", "BenchOutcome", "MethodSpec", "aggregate", "bench_command", "bench_from_dict", "budget_report",
    "check_orderings", "count_budgets", "interval_verdict", "load_bench_config", "load_papers",
    "lora_parameter_count", "matched_lora_rank", "multihead_parameter_count", "paired_difference",
    "prepare_cells", "render_markdown", "run_bench", "run_cell", "training_data_seen", "write_outputs",
]
