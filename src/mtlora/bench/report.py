"""The bench's outputs: ``results.json``, ``table.md`` (accuracy, paired orderings, the papers'
numbers) and ``chart.png`` (each method's interval, and every comparison's paired interval)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from mtlora.bench.budgets import training_data_seen
from mtlora.bench.config import DEFAULT_PAPERS, ROLES, BenchConfig
from mtlora.bench.statistics import (
    _by_role,
    _mean_std,
    aggregate,
    check_orderings,
    load_papers,
    minimum_detectable_difference,
    summarize_training_data,
)
from mtlora.config import deep_merge, load_config
from mtlora.errors import UserError
from mtlora.fileio import atomic_write_json, atomic_write_text, atomic_write_with


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return "0" if n == 0 else f"{n / 1e6:.2f}M"


def render_markdown(results: dict[str, Any]) -> str:
    """``table.md``: how it was made, per-task and macro accuracy, paired orderings, the papers' numbers."""
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
    lines += [f"- statistics: {_mdd_text(agg)}"]
    lines += ["", "## Accuracy (%, mean ± sample std over seeds; eval split of each task)", ""]
    n_row = {t: next((e["per_task"][t]["n"] for e in methods.values() if t in e.get("per_task", {})), None)
             for t in tasks}
    head = ["method", "adapter", "trainable params", "seeds"] + [f"{t} (n={n_row[t]})" for t in tasks] + [
        "macro", "macro 95 % CI", "eval SE", "steps", "train s", "wall s", "peak RSS MB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in methods.values():
        seeds = f"{len(entry['seeds_done'])}/{len(entry['seeds_planned'])}"
        params = entry.get("trainable_parameters", entry["budget_parameters"])
        if "macro" not in entry:
            row = [entry["label"], entry["adapter"], _params(params), seeds] + ["-"] * len(tasks) + [
                "not run / failed", "-", "-", "-", "-", "-", "-"]
        else:
            pt = entry["per_task"]
            row = [entry["label"], entry["adapter"], _params(params), seeds]
            row += [_pm(pt[t]["mean"], pt[t]["std"]) if t in pt else "-" for t in tasks]
            mark = "†" if entry.get("resumed") else ""
            se = entry["macro"].get("eval_se")
            ci = entry["macro"].get("ci95")
            row += [f"**{_pm(entry['macro']['mean'], entry['macro']['std'])}**",
                    "-" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]", "-" if se is None else f"{se:.1f}",
                    str(entry["steps"]),
                    f"{entry['train_seconds']:.0f}{mark}", f"{entry['wall_seconds']:.0f}{mark}",
                    f"{entry['peak_rss_mb']:.0f}" + ("" if entry["isolated"] else "*")]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Trainable parameters are counted by injecting each adapter into the model (A, B heads and "
              "router included); 'eval SE' is the binomial standard error of the macro accuracy from the "
              "number of eval examples (the eval set's sampling noise, apart from the seed spread); 'macro 95 % CI' "
              "is the bootstrap interval of the macro accuracy with seeds and eval examples redrawn ('-' where the "
              "cells kept no per-example results); 'train s' is the optimisation loop only, 'wall s' the whole cell (model "
              "load, training, evaluation), both means over seeds; 'peak RSS MB' is the largest peak resident "
              "memory of a cell's own process (one process per cell)"
              + ("; * = cells run inside the bench process, so the figure is that process's peak so far."
                 if any(not e.get("isolated", True) for e in methods.values() if "macro" in e) else ".")
              + (" † = a cell resumed from a checkpoint of an interrupted attempt: its times are the last "
                 "attempt's only." if any(e.get("resumed") for e in methods.values()) else "")]
    lines += training_data_section(methods)
    lines += orderings_section(agg)
    for name, protocol_agg in (results.get("protocols") or {}).items():
        lines += protocol_section(name, protocol_agg, agg)
    lines += references_section(results, _by_role(methods))
    if agg["failed"] or agg["missing"]:
        lines += ["", "## Cells without a result", ""]
        lines += [f"- {f['cell']}: failed: `{f['error'][:200]}`" for f in agg["failed"]]
        lines += [f"- {c}: not run yet" for c in agg["missing"]]
    return "\n".join(lines) + "\n"


def _mdd_text(agg: dict[str, Any]) -> str:
    mdd = agg.get("minimum_detectable_difference")
    margin = agg.get("equivalence_margin_pp")
    margin_text = f"; margin of 'close'/'matches' claims ±{margin:g} pp" if margin else ""
    if mdd is not None:
        return (f"every comparison is paired (same eval examples, same seeds); minimum detectable difference "
                f"~{mdd:.1f} pp (2.8 x the median standard error of the paired differences: a 5 % two-sided "
                f"test detects it 80 % of the time){margin_text}")
    ses = sorted(e["macro"]["eval_se"] for e in agg["methods"].values() if e.get("macro", {}).get("eval_se"))
    rough = "" if not ses else (f"; from the eval-set size alone (unpaired binomial, no seed noise) it would be "
                                f"~{2.8 * 2 ** 0.5 * ses[len(ses) // 2]:.1f} pp")
    return ("paired intervals unavailable: these cells kept no per-example results, so no minimum detectable "
            f"difference is measured{rough}{margin_text}")


def _span(values: list[int]) -> str:
    return "-" if not values else f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


def training_data_section(methods: dict[str, Any]) -> list[str]:
    """What each method was trained on: example passes and the distinct examples per task it saw."""
    rows = [(e, e.get("training_data")) for e in methods.values() if not e.get("eval_only") and "macro" in e]
    if not any(td for _, td in rows):
        return []
    lines = ["", "## Training data seen (replayed from each cell's sampler and seed)", "",
             "| method | example passes | distinct examples per task (fewest over seeds: min-max over tasks) | "
             "training pool per task (min-max) | k-shot |", "|---|---|---|---|---|"]
    for entry, td in rows:
        if not td:
            lines.append(f"| {entry['label']} | - | not recorded | - | - |")
            continue
        seen, pool = list(td["distinct_per_task"].values()), list((td.get("pool_per_task") or {}).values())
        lines.append(f"| {entry['label']} | {td.get('example_passes', '-')} | {_span(seen)} | {_span(pool)} | "
                     f"{td.get('k_shot') or '-'} |")
    if any(td and td.get("replayed") for _, td in rows):
        lines += ["", "Replayed by `--report` with the sampler code of the regenerating commit (these cells "
                  "predate the record)."]
    return lines


def _interval(o: dict[str, Any]) -> str:
    p = o.get("paired")
    return "unavailable" if p is None else f"{p['diff']:+.1f} [{p['low']:+.1f}, {p['high']:+.1f}]"


def orderings_section(agg: dict[str, Any], title: str = "The papers' orderings, checked with paired intervals",
                      ) -> list[str]:
    """The papers' claims: paired difference and 95 % interval, the verdict, the unpaired reading."""
    lines = ["", f"## {title}", "",
             "| claim | ours: left | ours: right | diff (pp) | paired diff [95 % CI] (pp) | verdict | "
             "seed spread (pp) | eval SE (pp) | unpaired reading (seed spread) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for o in agg["orderings"]:
        claim = o["claim"] + (f" ({o['paper']})" if o.get("paper") else "")
        if o["verdict"] == "not run":
            lines.append(f"| {claim} | - | - | - | - | not run | - | - | - |")
            continue
        spread = "-" if o["spread"] is None else f"{o['spread']:.1f}"
        eval_se = "-" if o.get("eval_se") is None else f"{o['eval_se']:.1f}"
        note = f" ({o['reference_note']})" if o.get("reference_note") else ""
        lines.append(f"| {claim} | {o['left_mean']:.1f} | {o['right_mean']:.1f} | {o['diff']:+.1f} | "
                     f"{_interval(o)} | {o['verdict']}{note} | {spread} | {eval_se} | {o['unpaired_verdict']} |")
    margin = agg.get("equivalence_margin_pp") or 2.0
    lines += ["", "Paired diff = left minus right (a right side of several methods: their mean), computed per eval "
              "example and per seed on the examples and seeds both sides share; its 95 % interval is a paired "
              "bootstrap that redraws the seeds and, within each task, the eval examples (the same draws for "
              "both sides), so seed noise and eval-set noise both enter (with one seed, only the eval-set noise). "
              "Verdicts: '>' holds only when the interval excludes 0 (above it), and did not hold when it "
              "excludes 0 below; '>=' did not hold when the interval lies below 0, and holds when it lies above "
              f"0 or above -{margin:g} pp; 'matches' holds when the interval lies above -{margin:g} pp; 'close' "
              f"holds when it lies within ±{margin:g} pp; anything else is 'not resolved'. A 'matches'/'close' "
              "verdict is marked vacuous when the reference is itself not above zero-shot (paired interval). A "
              "'matches LoRA on all data' claim is 'untested' unless the all-data cell saw more distinct "
              "training examples of every task than the k-shot cell's k. The unpaired reading (the older rule, "
              "kept for comparison) uses the macro means and the seed spread sqrt(std_left² + std_right²) only; "
              "eval SE is the binomial standard error of the difference from the number of eval examples."]
    return lines


def references_section(results: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    """The papers' own numbers beside ours, each column citing its paper and table."""
    reference = results.get("paper_reference") or {}
    lines = ["", "## Reference: the papers' numbers (theirs, not ours: larger models, full training sets)", ""]
    sources = list(reference)
    lines += ["| role | ours (this table) | " + " | ".join(sources) + " |", "|" + "---|" * (len(sources) + 2)]
    for role in ROLES:
        ref = [reference[s].get(role) for s in sources]
        if all(v is None for v in ref) and role not in roles:
            continue
        ours = roles.get(role)
        ours_text = f"{ours['label']}: {_pm(ours['macro']['mean'], ours['macro']['std'])}" if ours else "-"
        lines.append(f"| {role} | {ours_text} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in ref) + " |")
    cites = [f"{r['label']}: arXiv {r['arxiv']}, {r['table']}" for r in results.get("paper_sources", [])
             if r.get("arxiv")]
    if cites:
        lines += ["", "Sources: " + "; ".join(cites) + "."]
    lines += ["", "The MeTA-LoRA paper's claim is relative (k = 50..100 examples per task match LoRA on all "
              "data); no absolute numbers of it are set beside ours."]
    return lines


def plot_macro(results: dict[str, Any], path: Path) -> None:
    """Left: macro accuracy per method with its 95 % interval (seeds + eval examples redrawn; the seed
    std where no per-example results exist) and the seeds as dots. Right: each claim's paired
    difference with its 95 % interval, against 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = [e for e in results["aggregate"]["methods"].values() if "macro" in e]
    paired = [o for o in results["aggregate"]["orderings"] if o.get("paired")]
    # bars above, the paired intervals below them with their claims written out in full
    width = max(8.0, 0.75 * len(entries) + 2.5)
    low_h = 0.42 * len(paired) + 1.2
    fig, axes = plt.subplots(2 if paired else 1, 1, figsize=(width, 5.2 + (low_h if paired else 0.0)),
                             gridspec_kw={"height_ratios": [5.2, low_h]} if paired else None, squeeze=False)
    ax = axes[0][0]
    if entries:
        xs = list(range(len(entries)))
        means = [e["macro"]["mean"] for e in entries]
        low = [m - (e["macro"]["ci95"][0] if e["macro"].get("ci95") else m - (e["macro"]["std"] or 0.0))
               for m, e in zip(means, entries, strict=True)]
        high = [(e["macro"]["ci95"][1] if e["macro"].get("ci95") else m + (e["macro"]["std"] or 0.0)) - m
                for m, e in zip(means, entries, strict=True)]
        colors = ["#9aa5b1" if e["eval_only"] else "#2f6fde" for e in entries]
        ax.bar(xs, means, yerr=[low, high], capsize=4, color=colors)
        for x, e in zip(xs, entries, strict=True):
            ax.scatter([x] * len(e["macro"]["values"]), e["macro"]["values"], color="black", s=10, zorder=3)
        ax.set_xticks(xs, [e["label"] for e in entries], rotation=30, ha="right")
        # bars start at 0: a cut axis would make differences of a point or two look like effects
        top = max(max(e["macro"]["values"]) for e in entries)
        top = max([top] + [e["macro"]["ci95"][1] for e in entries if e["macro"].get("ci95")])
        ax.set_ylim(0.0, min(100.0, top + 10))
    ax.set_ylabel("macro accuracy (%)")
    bars = ("95 % interval (seeds and eval examples)" if any(e["macro"].get("ci95") for e in entries)
            else "std over seeds (no per-example results)")
    ax.set_title(results["meta"]["title"] + f"\n(bars: mean over the seeds run; error bars: {bars}; dots: seeds)",
                 fontsize=9)
    if paired:
        ax2 = axes[1][0]
        ys = list(range(len(paired)))[::-1]
        for y, o in zip(ys, paired, strict=True):
            p = o["paired"]
            color = "#1a7f37" if o.get("held") else "#cf222e" if o.get("held") is False else "#6e7781"
            ax2.errorbar([p["diff"]], [y], xerr=[[p["diff"] - p["low"]], [p["high"] - p["diff"]]], fmt="o",
                         color=color, markersize=4, capsize=3)
        ax2.axvline(0.0, color="black", linewidth=0.8)
        ax2.set_ylim(-0.5, len(paired) - 0.5)
        ax2.set_yticks(ys, [textwrap.fill(o["claim"], 70) for o in paired], fontsize=7)
        ax2.grid(axis="x", alpha=0.3)
        ax2.set_xlabel("left - right, macro accuracy (pp)")
        ax2.set_title("paired difference, 95 % interval\n(green: held, red: did not hold, grey: not resolved)",
                      fontsize=9)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def second_protocols(bench) -> list[str]:
    """The protocols some finished cell was also evaluated under (``eval_<protocol>.json``)."""
    found = {f.stem.removeprefix("eval_") for f in bench.output_dir.glob("cells/*/seed*/eval_*.json")}
    return sorted(found)


def protocol_section(name: str, agg: dict[str, Any], main: dict[str, Any]) -> list[str]:
    """The macro accuracy of every method under a second protocol, beside the grid's own, and the
    papers' orderings under it (paired over the same examples and seeds)."""
    lines = ["", f"## The papers' protocol: {name} (a second evaluation of the same trained cells)", ""]
    some = next((r for e in agg["methods"].values() for r in e.get("cells", [])), None)
    n = "" if some is None else " (n=" + ", ".join(f"{t} {v.get('n')}" for t, v in some["eval"]["per_task"].items()) + ")"
    lines += [f"Instruction prompts with an 'Answer format:' line, greedy generation, answer extraction, "
              f"transcribed from the authors' scripts (`mtlora/eval_protocols.py`){n}.", ""]
    head = ["method", "seeds", f"macro, {name}", "95 % CI", "macro, log-likelihood (same seeds, all eval examples)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, entry in agg["methods"].items():
        other = main["methods"].get(key, {})
        if "macro" not in entry:
            lines.append(f"| {entry['label']} | 0/{len(entry['seeds_planned'])} | - | - | - |")
            continue
        ci = entry["macro"].get("ci95")
        ll = [v for r, v in zip(other.get("cells", []), other.get("macro", {}).get("values", []), strict=False)
              if r["seed"] in entry["seeds_done"]]
        lines.append(f"| {entry['label']} | {len(entry['seeds_done'])}/{len(entry['seeds_planned'])} | "
                     f"**{_pm(entry['macro']['mean'], entry['macro']['std'])}** | "
                     + ("-" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]") + " | "
                     + (_pm(*_mean_std(ll)) if ll else "-") + " |")
    return lines + orderings_section(agg, title=f"Orderings under {name}")


def write_outputs(
    bench: BenchConfig, cells, budgets, meta, chart: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """Rewrite results.json, table.md (and chart.png) from whatever cells have finished."""
    papers = load_papers(bench.papers)
    results = {
        "meta": meta,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "base": bench.base,
        "seeds": bench.seeds,
        "methods": {m.name: {"overrides": m.overrides, "role": m.role, "eval_only": m.eval_only}
                    for m in bench.methods.values()},
        "budgets": list(budgets.values()),
        "aggregate": aggregate(bench, cells, budgets, papers),
        "protocols": {p: aggregate(bench, cells, budgets, papers, protocol=p) for p in second_protocols(bench)},
        "paper_reference": papers.reference_table(),
        "paper_sources": papers.sources(),
    }
    out = bench.output_dir
    paths = {"results": str(out / "results.json"), "table": str(out / "table.md"), "chart": str(out / "chart.png")}
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", render_markdown(results))
    if chart:
        plot_macro(results, out / "chart.png")
    return results, paths


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
    package = Path(__file__).resolve().parents[1]  # the mtlora package
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


def _run_config(results: dict[str, Any], method: str, seed: int):
    """A finished grid's cell config rebuilt from its results.json (base + the method's overrides)."""
    raw = deep_merge(deep_merge(results["base"], results["methods"][method]["overrides"]), {"train": {"seed": seed}})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cell.yaml"
        path.write_text(yaml.safe_dump({**raw, "output_dir": str(Path(tmp) / "run")}, sort_keys=False))
        return load_config(path)


def rereport_results(path: Path, command: str | None = None, papers_path: Path = DEFAULT_PAPERS) -> dict[str, str]:
    """Rewrite ``table.md``, ``chart.png`` and the derived parts of a ``results.json`` from that file alone.

    For grids whose cell folders are gone (e.g. the committed copies under ``docs/results``): the
    orderings are re-checked under the current rules and papers file, and the training data each
    method saw is replayed from its config where the cells did not record it. Per-example results
    cannot be recovered: where they were not saved, the table says the paired interval is unavailable.
    """
    try:
        results = json.loads(path.read_text())
        methods = results["aggregate"]["methods"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise UserError(path, "expected a results.json written by mtlora bench") from None
    papers = load_papers(papers_path)
    for name, entry in methods.items():
        if entry.get("training_data") or "macro" not in entry or name not in results.get("methods", {}):
            continue
        try:
            seen = [{"training_data": training_data_seen(_run_config(results, name, seed), entry.get("eval_only"))}
                    for seed in entry["seeds_done"]]
        except (UserError, OSError, ValueError):
            continue  # the data or config of then cannot be rebuilt: the table says "not recorded"
        entry["training_data"] = summarize_training_data(seen)
        if entry["training_data"]:
            entry["training_data"]["replayed"] = True
    agg = results["aggregate"]
    agg["orderings"] = check_orderings(methods, papers)
    agg["minimum_detectable_difference"] = minimum_detectable_difference(agg["orderings"])
    agg["equivalence_margin_pp"] = papers.margin
    results["paper_reference"] = papers.reference_table()
    results["paper_sources"] = papers.sources()
    results["meta"]["regenerated"] = {"command": command or f"mtlora bench {path} --report", "code": code_version(),
                                      "at": datetime.now(UTC).isoformat(timespec="seconds")}
    results["written_at"] = results["meta"]["regenerated"]["at"]
    out = path.parent
    atomic_write_json(path, results)
    atomic_write_text(out / "table.md", render_markdown(results))
    plot_macro(results, out / "chart.png")
    return {"results": str(path), "table": str(out / "table.md"), "chart": str(out / "chart.png")}
