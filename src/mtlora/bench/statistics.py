"""Aggregates over seeds, and the paired statistics behind every verdict of ``table.md``.

Why paired: two methods of a grid are scored on the same eval examples at the same seeds, so most
of the eval-set noise (which example happens to be easy) and of the seed noise (which data order a
seed draws) is shared. The difference is therefore estimated per example and per seed, and its
95 % interval comes from a paired, two-level bootstrap: each replicate redraws the seeds (with
replacement, the same seeds for both sides) and, within every task, the eval examples (the same
examples for both sides), then recomputes the difference in macro accuracy. Seed noise and
eval-set noise both enter; with one seed only the eval-set noise does, and the table says so.

A verdict "A > B" is given only when that interval excludes 0. "Close" and "matches" claims need
the interval inside a stated margin (``equivalence_margin_pp`` of the papers file). Results saved
before cells kept their per-example correctness have no paired interval: their verdict says so,
and the older seed-spread reading is kept beside it, labelled unpaired.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlora.bench.budgets import budget_key, training_data_seen
from mtlora.bench.config import (
    CELL_ERROR,
    CELL_LOG,
    CELL_RESULT,
    CELL_SPEC,
    DEFAULT_PAPERS,
    ROLES,
    BenchConfig,
    adapter_summary,
    read_yaml,
)
from mtlora.errors import UserError

RELATIONS = (">", ">=", "~", ">=~")
BOOTSTRAP_REPS = 4000
BOOTSTRAP_SEED = 0  # fixed: a table regenerated from the same cells gives the same intervals
Z_POWER = 1.96 + 0.84  # two-sided 5 % test at 80 % power: MDD = 2.8 x the standard error of the difference


# ------------------------------------------------------------------------------------------ papers
@dataclass(frozen=True)
class Claim:
    left: str
    relation: str
    right: tuple[str, ...]
    text: str
    paper: str | None = None
    full_data: bool = False
    fallback: tuple[str, ...] = ()


@dataclass
class Papers:
    """The papers' reference numbers and claims (``configs/bench/papers.yaml``)."""

    claims: list[Claim]
    references: list[dict[str, Any]] = field(default_factory=list)
    papers: dict[str, dict[str, Any]] = field(default_factory=dict)
    margin: float = 2.0
    source: str = "<papers>"

    def reference_table(self) -> dict[str, dict[str, float]]:
        """``{column label: {role: number}}``, the shape of results.json's ``paper_reference``."""
        return {ref["label"]: dict(ref["values"]) for ref in self.references}

    def sources(self) -> list[dict[str, Any]]:
        """Each reference column's paper (arXiv id), table and model, for the table's citations."""
        return [{"label": r["label"], "table": r.get("table"), "model": r.get("model"),
                 "arxiv": self.papers.get(r.get("paper") or "", {}).get("arxiv")} for r in self.references]

    def cite(self, key: str | None) -> str:
        paper = self.papers.get(key or "")
        return f"arXiv {paper['arxiv']}" if paper and paper.get("arxiv") else ""


def load_papers(path: str | Path) -> Papers:
    """Read and check a papers file; a mistake is a one-line user error naming the file."""
    path = Path(path)
    raw = read_yaml(path, "papers file not found (set `papers:` in the bench YAML)")
    if not isinstance(raw, dict) or not isinstance(raw.get("claims", []), list):
        raise UserError(path, "expected a mapping with references and claims (lists)")
    papers = raw.get("papers") or {}
    references = []
    for i, ref in enumerate(raw.get("references") or []):
        if not isinstance(ref, dict) or not isinstance(ref.get("label"), str) or not isinstance(ref.get("values"), dict):
            raise UserError(path, f"references[{i}]: expected label (text) and values (role: number)")
        bad = sorted(set(ref["values"]) - set(ROLES))
        if bad:
            raise UserError(path, f"references[{i}].values: unknown role {bad[0]!r}; expected some of {list(ROLES)}")
        if ref.get("paper") is not None and ref["paper"] not in papers:
            raise UserError(path, f"references[{i}].paper: {ref['paper']!r} is not under papers")
        references.append({**ref, "values": {k: float(v) for k, v in ref["values"].items()}})
    claims = []
    for i, c in enumerate(raw.get("claims") or []):
        where = f"claims[{i}]"
        if not isinstance(c, dict) or c.get("relation") not in RELATIONS:
            raise UserError(path, f"{where}.relation: expected one of {list(RELATIONS)}")
        right = c.get("right")
        right = [right] if isinstance(right, str) else right
        fallback = c.get("fallback") or []
        roles = [c.get("left"), *(right or []), *fallback]
        if not right or not isinstance(c.get("text"), str) or any(r not in ROLES for r in roles):
            raise UserError(path, f"{where}: expected left and right roles of {list(ROLES)} and a text")
        claims.append(Claim(c["left"], c["relation"], tuple(right), c["text"], c.get("paper"),
                            bool(c.get("full_data", False)), tuple(fallback)))
    margin = raw.get("equivalence_margin_pp", 2.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0:
        raise UserError(path, f"equivalence_margin_pp: expected a positive number, got {margin!r}")
    return Papers(claims, references, papers, float(margin), str(path))


# ------------------------------------------------------------------------------- per-example data
def example_id(ex) -> str:
    """A short stable id of an eval example (task, prompt, answer, choices), to pair two cells' scores."""
    key = "\x1f".join((ex.task, ex.prompt, ex.answer, *(ex.choices or ())))
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def per_example_correctness(predictions: Sequence[dict[str, Any]], examples: Sequence[Any]) -> dict[str, Any] | None:
    """``{task: {"ids": [...], "correct": "0110..."}}`` from an evaluation's predictions (input order).

    The correct bit is the task's primary metric (``acc`` / exact match), the one macro accuracy
    averages. ``None`` if the predictions do not line up with the examples (then nothing is paired).
    """
    if len(predictions) != len(examples) or any(
            p.get("task") != ex.task
            or ("gold" in p and ex.choices is not None and p.get("kind") != "generation" and p["gold"] != ex.gold)
            for p, ex in zip(predictions, examples, strict=True)):
        return None
    out: dict[str, dict[str, Any]] = {}
    for p, ex in zip(predictions, examples, strict=True):
        task = out.setdefault(ex.task, {"ids": [], "correct": []})
        task["ids"].append(example_id(ex))
        task["correct"].append("1" if p["correct"] else "0")
    return {t: {"ids": v["ids"], "correct": "".join(v["correct"])} for t, v in sorted(out.items())}


# ---------------------------------------------------------------------------------------- aggregate
def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


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


def collect_examples(entry: dict[str, Any], rows: list[dict[str, Any]], eval_ids: dict[str, list[str]]) -> None:
    """Move each cell's per-example bits into ``entry["correct"][seed][task]`` (ids kept once per grid).

    A task whose ids differ from the grid's (another eval set) is left out of the pairing and listed
    in ``entry["unpaired_tasks"]``; cells without per-example data are listed in ``entry["no_examples"]``.
    """
    correct: dict[str, dict[str, str]] = {}
    unpaired: set[str] = set()
    missing = []
    for row in rows:
        examples = row.pop("examples", None)
        if not examples:
            missing.append(row["seed"])
            continue
        bits = {}
        for task, data in examples.items():
            ids = eval_ids.setdefault(task, list(data["ids"]))
            if ids == list(data["ids"]):
                bits[task] = data["correct"]
            else:
                unpaired.add(task)
        correct[str(row["seed"])] = bits
    entry["correct"] = correct
    if unpaired:
        entry["unpaired_tasks"] = sorted(unpaired)
    if missing:
        entry["no_examples"] = missing


def summarize_training_data(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per task, the fewest distinct training examples any seed's cell saw (None if not recorded)."""
    seen = [r.get("training_data") for r in rows]
    if not seen or any(not s or "distinct_per_task" not in s for s in seen):
        return None
    tasks = sorted({t for s in seen for t in s["distinct_per_task"]})
    return {"distinct_per_task": {t: min(s["distinct_per_task"].get(t, 0) for s in seen) for t in tasks},
            "pool_per_task": seen[0].get("pool_per_task", {}), "example_passes": seen[0].get("example_passes"),
            "k_shot": seen[0].get("k_shot")}


def _by_role(methods: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for entry in methods.values():
        if entry.get("role") and "macro" in entry and entry["role"] not in out:
            out[entry["role"]] = entry
    return out


# -------------------------------------------------------------------------------- paired bootstrap
def _bits(text: str):
    import numpy as np

    return np.frombuffer(text.encode(), dtype=np.uint8) - ord("0")


def _side(entry: dict[str, Any], seeds: list[str], task: str):
    """(seeds, examples) 0/1 matrix of one method; an eval-only method is the same at every seed."""
    import numpy as np

    correct = entry.get("correct") or {}
    if entry.get("eval_only"):
        only = next(iter(correct.values()), {})
        return np.stack([_bits(only[task])] * len(seeds)).astype(float)
    return np.stack([_bits(correct[s][task]) for s in seeds]).astype(float)


def paired_difference(
    left: dict[str, Any], rights: Sequence[dict[str, Any]], *, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED,
) -> tuple[dict[str, Any] | None, str]:
    """Macro accuracy of ``left`` minus the mean of ``rights`` (points), paired by seed and example.

    Returns ``(result, "")`` with ``diff``, ``low``/``high`` (95 % percentile interval), ``se`` (the
    replicates' std), the seeds and per-task example counts; or ``(None, reason)``. With ``rights``
    empty it is the interval of ``left``'s own macro accuracy.
    """
    import numpy as np

    entries = [left, *rights]
    if any(not e.get("correct") for e in entries):
        return None, "per-example results not saved (paired interval unavailable)"
    trained = [e for e in entries if not e.get("eval_only")]
    seed_sets = [set(e["correct"]) for e in trained] or [set(entries[0]["correct"])]
    seeds = sorted(set.intersection(*seed_sets), key=int)
    if not seeds:
        return None, "no seed finished for both sides"
    tasks = sorted(set.intersection(*(set(e["correct"][s]) for e in trained for s in seeds))
                   if trained else set(next(iter(left["correct"].values()))))
    for e in entries:
        if e.get("eval_only"):
            tasks = [t for t in tasks if t in next(iter(e["correct"].values()), {})]
    if not tasks:
        return None, "no eval task scored on the same examples by both sides"
    rng = np.random.default_rng(seed)
    n_seeds = len(seeds)
    diffs = []
    for task in tasks:
        d = _side(left, seeds, task)
        if rights:
            d = d - sum(_side(r, seeds, task) for r in rights) / len(rights)
        diffs.append(d)
    point = 100 * float(np.mean([d.mean() for d in diffs]))
    total = np.zeros(reps)
    seed_w = rng.multinomial(n_seeds, [1 / n_seeds] * n_seeds, size=reps) / n_seeds  # (reps, seeds)
    for d in diffs:
        n = d.shape[1]
        for start in range(0, reps, 1000):  # (1000, n) example weights at a time: bounded memory
            stop = min(reps, start + 1000)
            w = rng.multinomial(n, [1 / n] * n, size=stop - start) / n
            total[start:stop] += ((w @ d.T) * seed_w[start:stop]).sum(1)
    total *= 100 / len(diffs)
    low, high = np.percentile(total, [2.5, 97.5])
    return {"diff": point, "low": float(low), "high": float(high), "se": float(total.std(ddof=1)),
            "seeds": [int(s) for s in seeds], "n_examples": {t: int(d.shape[1]) for t, d in zip(tasks, diffs,
                                                                                                 strict=True)},
            "reps": reps}, ""


def interval_verdict(relation: str, low: float, high: float, margin: float) -> tuple[bool | None, str]:
    """The claim's verdict from the paired 95 % interval of (left - right), in points."""
    if relation == ">":
        if low > 0:
            return True, "held: the 95 % interval excludes 0"
        if high < 0:
            return False, "did not hold: reversed, the 95 % interval excludes 0"
        return None, "not resolved: the 95 % interval includes 0"
    if relation == ">=":
        if high < 0:
            return False, "did not hold: lower, the 95 % interval excludes 0"
        if low > 0:
            return True, "held: higher, the 95 % interval excludes 0"
        if low > -margin:
            return True, f"held: not lower by more than {margin:g} pp (95 % interval)"
        return None, "not resolved: the 95 % interval includes 0 and reaches below the margin"
    if relation == ">=~":
        if low > -margin:
            note = " (though lower: the interval excludes 0)" if high < 0 else ""
            return True, f"held: not lower by more than {margin:g} pp (95 % interval){note}"
        if high < 0:
            return False, "did not hold: lower, the 95 % interval excludes 0"
        return None, f"not resolved: the 95 % interval reaches below -{margin:g} pp and includes 0"
    if -margin < low and high < margin:  # "~"
        return True, f"held: the 95 % interval lies within ±{margin:g} pp"
    if low >= margin or high <= -margin:
        return False, f"did not hold: the 95 % interval lies beyond {margin:g} pp"
    return None, f"not resolved: the 95 % interval reaches beyond ±{margin:g} pp"


def _spread_verdict(rel: str, a: dict[str, Any], rights: list[dict[str, Any]], roles: dict[str, Any]) -> dict[str, Any]:
    """The unpaired reading on the macro means and the seed spread ``sqrt(std_a^2 + std_b^2)``.

    ``>``: held if the difference is positive; "beyond the seed spread" if it also exceeds the
    spread. ``>=``: held unless the left one is lower by more than the spread. ``~`` and ``>=~``
    (close / not worse): held if the gap is within the spread; with one seed there is no spread, so
    these are reported as undetermined, with the raw difference.
    """
    right_means = [r["mean"] for r in rights]
    b_mean = sum(right_means) / len(right_means)
    b_stds = [r["std"] for r in rights]
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
    ses = [a.get("eval_se")] + [r.get("eval_se") for r in rights]
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
    return {"left_mean": a["mean"], "right_mean": b_mean, "diff": diff, "spread": spread, "eval_se": eval_se,
            "held": held, "beyond_spread": beyond, "verdict": verdict}


def _full_data_untested(left: dict[str, Any], rights: list[dict[str, Any]]) -> str | None:
    """Why a "k per task matches all the data" claim is untested, or None when it is tested.

    Tested only when the full-data cell saw more than k distinct examples of every task: otherwise
    both sides saw the same amount of data and nothing about data efficiency was compared.
    """
    k = (left.get("training_data") or {}).get("k_shot")
    if k is None:
        return "untested: the k-shot cell does not record its k"
    for right in rights:
        name = right.get("label", right.get("role"))
        seen = (right.get("training_data") or {}).get("distinct_per_task")
        if not seen:
            return f"untested: {name} does not record how many distinct examples it saw"
        task, fewest = min(seen.items(), key=lambda kv: kv[1])
        if fewest <= k:
            return (f"untested: {name} saw at most {fewest} distinct examples of {task} "
                    f"(k = {k} per task): no more data than the k-shot cell")
    return None


def check_orderings(methods: dict[str, Any], papers: Papers | None = None) -> list[dict[str, Any]]:
    """Each of the papers' claims on our results: the paired interval, its verdict, the unpaired reading."""
    if papers is None:
        papers = load_papers(DEFAULT_PAPERS)
    roles = _by_role(methods)
    out = []
    for claim in papers.claims:
        rights = list(claim.right)
        row: dict[str, Any] = {"claim": claim.text, "relation": claim.relation, "left": claim.left,
                               "right": rights, "paper": papers.cite(claim.paper)}
        if claim.fallback and any(r not in roles for r in rights) and all(r in roles for r in claim.fallback):
            rights = list(claim.fallback)
            row.update(right=rights, reference_note=f"no {'/'.join(claim.right)} cell: compared with "
                       + ", ".join(roles[r].get("label", r) for r in rights))
        if claim.left not in roles or any(r not in roles for r in rights):
            row["verdict"] = "not run"
            out.append(row)
            continue
        left, right_entries = roles[claim.left], [roles[r] for r in rights]
        unpaired = _spread_verdict(claim.relation, left["macro"], [r["macro"] for r in right_entries], roles)
        row.update(unpaired)
        row["unpaired_verdict"] = unpaired["verdict"]
        paired, reason = paired_difference(left, right_entries)
        row["paired"] = paired
        if paired is None:
            row.update(held=None, verdict=f"not resolvable: {reason}")
        else:
            held, verdict = interval_verdict(claim.relation, paired["low"], paired["high"], papers.margin)
            if held and claim.relation in ("~", ">=~") and "zero_shot" in roles:
                # "matches" is empty when the reference did not itself move off the base model
                gains = [paired_difference(r, [roles["zero_shot"]])[0] for r in right_entries]
                if all(g is not None and g["low"] <= 0 for g in gains):
                    verdict += " (vacuous: the reference is not above zero-shot: " + ", ".join(
                        f"{g['diff']:+.1f} pp [{g['low']:+.1f}, {g['high']:+.1f}]" for g in gains if g) + ")"
            done = [set(e.get("seeds_done", paired["seeds"])) for e in (left, *right_entries) if not e.get("eval_only")]
            common = set.intersection(*done) if done else set(paired["seeds"])
            if set(paired["seeds"]) != common:
                verdict += f" (paired on seeds {paired['seeds']} only: the others kept no per-example results)"
            elif done and set.union(*done) != common:  # the means beside it cover more seeds than the pairing
                verdict += f" (paired on seeds {paired['seeds']} only: the seeds every side has run)"
            row.update(held=held, verdict=verdict)
        if claim.full_data:
            untested = _full_data_untested(left, right_entries)
            if untested:
                row.update(held=None, untested=True, verdict=f"{untested}; measured: {row['verdict']}")
        out.append(row)
    return out


def minimum_detectable_difference(orderings: list[dict[str, Any]]) -> float | None:
    """2.8 x the median standard error of the paired differences: the gap a 5 % test finds 80 % of the time."""
    ses = sorted(o["paired"]["se"] for o in orderings if o.get("paired"))
    if not ses:
        return None
    mid = len(ses) // 2
    median = ses[mid] if len(ses) % 2 else (ses[mid - 1] + ses[mid]) / 2
    return Z_POWER * median


def aggregate(bench: BenchConfig, cells, budgets: dict[str, dict[str, Any]], papers: Papers | None = None,
              protocol: str | None = None) -> dict[str, Any]:
    """Per method: mean/std over seeds (accuracy in points), parameters, time, memory, per-example
    bits for the paired statistics; plus failures and the papers' orderings.

    ``protocol``: the same from each cell's second evaluation under that protocol
    (``eval_<protocol>.json``, ``mtlora bench --protocol``) instead of its own; a cell without one
    counts as missing."""
    methods: dict[str, Any] = {}
    failed, missing = [], []
    eval_ids: dict[str, list[str]] = {}
    for method in bench.methods.values():
        rows, config = [], None
        for m, seed, c in cells:
            if m.name != method.name:
                continue
            config = c
            cell = bench.cell_dir(m, seed)
            spec_hash = json.loads((cell / CELL_SPEC).read_text())["config_hash"]
            extra = cell / f"eval_{protocol}.json" if protocol else None
            if finished(cell, spec_hash) and (extra is None or extra.is_file()):
                row = json.loads((cell / CELL_RESULT).read_text())
                if extra is not None:  # the same cell, scored under the other protocol
                    row.update({k: v for k, v in json.loads(extra.read_text()).items() if k in ("eval", "examples")})
                if row.get("isolated") is None:  # cells written before the flag: only subprocesses keep a log
                    row["isolated"] = (cell / CELL_LOG).is_file()
                if "training_data" not in row:  # cells written before it was recorded: replay it now
                    try:
                        row["training_data"] = training_data_seen(c, eval_only=method.eval_only)
                    except (UserError, OSError, ValueError) as exc:
                        row["training_data"] = {"error": str(exc)}
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
        collect_examples(entry, rows, eval_ids)
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
            own, _ = paired_difference(entry, [])
            if own is not None:  # the method's own 95 % interval: seeds and eval examples redrawn
                entry["macro"]["ci95"] = [own["low"], own["high"]]
            entry["trainable_parameters"] = rows[0]["trainable_parameters"]
            entry["train_seconds"] = _mean_std([r["train_seconds"] for r in rows])[0]
            entry["wall_seconds"] = _mean_std([r["wall_seconds"] for r in rows])[0]
            entry["peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
            entry["isolated"] = all(r.get("isolated", False) for r in rows)
            entry["steps"] = rows[0]["steps"]
            entry["resumed"] = any(r.get("resumed") for r in rows)
            entry["training_data"] = summarize_training_data(rows)
        methods[method.name] = entry
    orderings = check_orderings(methods, papers)
    return {"methods": methods, "failed": failed, "missing": missing, "orderings": orderings,
            "eval_examples": eval_ids, "minimum_detectable_difference": minimum_detectable_difference(orderings),
            "equivalence_margin_pp": (papers.margin if papers else None)}


def finished(cell: Path, spec_hash: str) -> bool:
    """A cell is done when its result exists and belongs to the cell's current config."""
    if not (cell / CELL_RESULT).is_file():
        return False
    try:
        return json.loads((cell / CELL_RESULT).read_text()).get("config_hash") == spec_hash
    except json.JSONDecodeError:
        return False
