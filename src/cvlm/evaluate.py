"""Evaluation on held-out phantoms: edits (cycle, collateral, transfer to a second generator),
localisation against true masks, the shortcut test with its negative control, and intervals.

Every function returns per-case rows (plain lists of numbers and booleans), so that one summary
(``summarise``) turns the rows of one seed or of several into figures with bootstrap intervals.
Maps and images of a few cases are returned beside the rows for the HTML page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .devices import device_of
from .explain import BASELINES, baseline_maps, cvlm_map
from .metrics import auroc, collateral_changes, cycle_success, pointing_game, topk_iou
from .phantoms import FINDINGS, MARKER_NAME, Phantom, render
from .report_text import EDIT_KINDS, Edit, edit_text, label_report, random_edit, state
from .train import images_tensor

SHORTCUT_FINDING = "cardiomegaly"
# every map scored: CVLM as configured (by default M's change refined on each image), the amortised
# manipulator M alone (one forward pass), the CVLM objective optimised per image from zero (M
# unused), and the baselines
CVLM_VARIANTS = ("cvlm", "cvlm_m_alone", "cvlm_from_zero")
METHODS = (*CVLM_VARIANTS, *BASELINES)


def _labels(reports: list[str]) -> list[dict]:
    return [label_report(r) for r in reports]


def _np(t: torch.Tensor) -> np.ndarray:
    """A map or image for the rows and the page: numpy, so on the CPU whatever device made it."""
    return t.detach().cpu().numpy()


def _variant(manip, x, t_new, t, gen, variant: str) -> torch.Tensor:
    """x' of one CVLM variant."""
    if variant == "cvlm_m_alone":
        return cvlm_map(manip, x, t_new, t)[0]
    return cvlm_map(manip, x, t_new, t, gen=gen, init="zero" if variant == "cvlm_from_zero" else None)[0]


# ----------------------------------------------------------------------------------------------
# edits


def evaluate_edits(gen, manip, test: list[Phantom], seed: int, gen2=None,
                   variants: Sequence[str] = CVLM_VARIANTS) -> tuple[dict[str, list[dict]], dict]:  # fmt: skip
    """One random edit per held-out phantom (edit kinds uniform), applied to G's own report text.

    Per variant and edit: cycle success and collateral under G, and - with a second, independently
    trained generator ``gen2`` that neither M nor the refinement saw - transfer: does G2 also
    state the edit at x'? Transfer is scored where G2 agreed with G on the edited finding at x
    (elsewhere the edit is no change for G2); G2's collateral is counted on every case.
    Returns the rows per variant and, per edit kind, one example for the page."""
    rng = np.random.default_rng(seed)
    x = images_tensor(test, device_of(gen))
    t_old = gen.generate(x)
    before = _labels(t_old)
    edits: list[Edit] = []
    for f in before:
        e = random_edit(f, rng)
        assert e is not None  # "add" always applies to some absent finding
        edits.append(e)
    t_new = [edit_text(t, e) for t, e in zip(t_old, edits, strict=True)]
    b2 = _labels(gen2.generate(x)) if gen2 is not None else None
    rows: dict[str, list[dict]] = {}
    examples: dict = {}
    for v in variants:
        x_new = _variant(manip, x, t_new, t_old, gen, v)
        r_new = gen.generate(x_new)
        after = _labels(r_new)
        r2 = gen2.generate(x_new) if gen2 is not None else None
        a2 = _labels(r2) if r2 is not None else None
        rows[v] = []
        for i, (e, b, a) in enumerate(zip(edits, before, after, strict=True)):
            changed, n_other = collateral_changes(e, b, a)
            row = {"kind": e.kind, "finding": e.name, "success": cycle_success(e, b, a), "collateral": changed,
                   "others": n_other, "l1": float((x_new[i] - x[i]).abs().mean())}  # fmt: skip
            if b2 is not None and a2 is not None:
                agree = state(b2[i], e.name) == state(b, e.name)
                row["transfer"] = bool(state(a2[i], e.name) == state(e.apply(b), e.name)) if agree else None
                row["g2_collateral"], _ = collateral_changes(e, b2[i], a2[i])
            rows[v].append(row)
        if v == "cvlm":
            for kind in EDIT_KINDS:
                i = next((k for k, e in enumerate(edits) if e.kind == kind and rows[v][k]["success"]), None)
                i = i if i is not None else next((k for k, e in enumerate(edits) if e.kind == kind), None)
                if i is None:
                    continue
                p = test[i]
                mask = None if kind == "add" else p.masks.get(edits[i].name)  # an added finding has no mask
                maps = {"cvlm": _np((x_new[i] - x[i]).abs()[0])}
                for name, bm in baseline_maps(gen, x[i : i + 1], [t_old[i]], [t_new[i]]).items():
                    maps[name] = _np(bm[0])
                examples[kind] = {"edit": edits[i].describe(), "image": p.image, "x_new": _np(x_new[i, 0]),
                                  "mask": mask, "maps": maps, "t": t_old[i], "t_new": t_new[i], "g": r_new[i],
                                  "g2": r2[i] if r2 is not None else None, "success": rows[v][i]["success"],
                                  "transfer": rows[v][i].get("transfer")}  # fmt: skip
    return rows, examples


# ----------------------------------------------------------------------------------------------
# localisation


def localisation_cases(gen, test: list[Phantom], n_per_finding: int) -> list[tuple[int, str]]:
    """(phantom index, finding) where the finding is truly present AND the generator reports it,
    so that "remove it" is an edit of the generator's own report with a known mask."""
    reports = gen.generate(images_tensor(test, device_of(gen)))
    cases: list[tuple[int, str]] = []
    for name in FINDINGS:
        sel = [i for i, (p, r) in enumerate(zip(test, reports, strict=True))
               if name in p.findings and name in label_report(r) and p.masks[name].any()]  # fmt: skip
        cases += [(i, name) for i in sel[:n_per_finding]]
    return cases


def explain_cases(gen, manip, phantoms: list[Phantom], cases: list[tuple[int, str]], batch: int = 32,
                  methods: Sequence[str] = METHODS) -> dict:  # fmt: skip
    """Maps of every method for the 'remove finding' edit of each case, as numpy (N, H, W)."""
    maps: dict[str, list[np.ndarray]] = {m: [] for m in methods}
    x_news, t_olds, t_news = [], [], []
    for k in range(0, len(cases), batch):
        chunk = cases[k : k + batch]
        x = images_tensor([phantoms[i] for i, _ in chunk], device_of(gen))
        t = gen.generate(x)
        t_new = [edit_text(r, Edit("remove", label_report(r)[n], n)) for r, (_, n) in zip(t, chunk, strict=True)]
        for v in (m for m in methods if m in CVLM_VARIANTS):
            x_new = _variant(manip, x, t_new, t, gen, v)
            maps[v].append(_np((x_new - x).abs()[:, 0]))
            if v == "cvlm":
                x_news.append(_np(x_new[:, 0]))
        if any(m in BASELINES for m in methods):
            for name, bm in baseline_maps(gen, x, t, t_new).items():
                if name in maps:
                    maps[name].append(_np(bm))
        t_olds += t
        t_news += t_new
    if not cases:  # e.g. a generator that never reports the finding: nothing to explain
        empty = np.zeros((0, phantoms[0].image.shape[0], phantoms[0].image.shape[1]), np.float32)
        return {**{k: empty for k in maps}, "x_new": empty, "t": [], "t_new": []}
    out = {k: np.concatenate(v) for k, v in maps.items()}
    out["x_new"] = np.concatenate(x_news) if x_news else out[next(iter(maps))]
    out["t"] = t_olds
    out["t_new"] = t_news
    return out


def score_cases(maps: dict, masks: list[np.ndarray], methods: Sequence[str] = METHODS) -> dict[str, dict[str, list]]:
    """Per method, per case: pointing hit, top-k IoU and pixel AUROC."""
    return {m: {"pointing": [pointing_game(a, k) for a, k in zip(maps[m], masks, strict=True)],
                "iou": [topk_iou(a, k) for a, k in zip(maps[m], masks, strict=True)],
                "auroc": [auroc(a, k) for a, k in zip(maps[m], masks, strict=True)]} for m in methods}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# shortcut test and its negative control


def shortcut_candidates(gen_s, s_test: list[Phantom]) -> list[int]:
    """Held-out phantoms with the finding and the marker whose report by ``gen_s`` states the finding."""
    rep = _labels(gen_s.generate(images_tensor(s_test, device_of(gen_s))))
    return [i for i, p in enumerate(s_test)
            if MARKER_NAME in p.masks and SHORTCUT_FINDING in p.findings and SHORTCUT_FINDING in rep[i]]  # fmt: skip


def evaluate_shortcut(gen_s, manip_s, s_test: list[Phantom], seed: int, size: int, n_short: int,
                      methods: Sequence[str] = METHODS) -> dict:  # fmt: skip
    """The shortcut experiment on held-out phantoms that have the finding and the marker and whose
    report by the shortcut generator states the finding; the edit is "remove the finding".

    Reliance is measured per case on counterfactuals rendered with the same seed (same anatomy,
    same marker position): the case is *reliant* when G_s no longer reports the finding once the
    marker is taken away. Only there is the marker the evidence G_s uses, so only there must a
    faithful map point at it; where G_s reads the finding from the heart, pointing at the heart
    is what is right. ``seed`` is the dataset seed ``s_test`` was made with (``make_dataset``).

    Run with the *clean* generator and its manipulator on the same marker images, this is the
    negative control: that generator never saw the marker, so no case is reliant and a method
    that points at the marker there is finding the marker, not the generator's evidence."""
    cand = shortcut_candidates(gen_s, s_test)
    base_seed = seed * 1_000_003  # make_dataset's seed stream
    no_marker = [render(s_test[i].findings, base_seed + i, size=size, marker=False) for i in cand]
    no_finding = [render({k: v for k, v in s_test[i].findings.items() if k != SHORTCUT_FINDING}, base_seed + i,
                         size=size, marker=True) for i in cand]  # fmt: skip
    dev = device_of(gen_s)
    nm = _labels(gen_s.generate(images_tensor(no_marker, dev))) if cand else []
    nf = _labels(gen_s.generate(images_tensor(no_finding, dev))) if cand else []
    reliant_all = [SHORTCUT_FINDING not in r for r in nm]
    s_cases = [(i, SHORTCUT_FINDING) for i in cand[:n_short]]
    reliant = reliant_all[:n_short]
    s_maps = explain_cases(gen_s, manip_s, s_test, s_cases, methods=methods)
    on_marker = {m: [pointing_game(a, s_test[i].masks[MARKER_NAME]) for a, (i, _) in zip(s_maps[m], s_cases, strict=True)]
                 for m in methods}  # fmt: skip
    on_finding = {m: [pointing_game(a, s_test[i].masks[SHORTCUT_FINDING]) for a, (i, _) in zip(s_maps[m], s_cases, strict=True)]
                  for m in methods}  # fmt: skip
    after = _labels(gen_s.generate(torch.from_numpy(s_maps["x_new"])[:, None].to(dev))) if s_cases else []
    return {
        "finding": SHORTCUT_FINDING,
        "n_candidates": len(cand),
        "without_marker": [SHORTCUT_FINDING in r for r in nm],
        "marker_only": [SHORTCUT_FINDING in r for r in nf],
        "reliant": reliant,
        "removed": [SHORTCUT_FINDING not in r for r in after],
        "on_marker": on_marker,
        "on_finding": on_finding,
        "_cases": s_cases,
        "_maps": s_maps,
    }


# ----------------------------------------------------------------------------------------------
# summaries with intervals


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(np.mean(xs)) if xs else float("nan")


def bootstrap(per_seed: list, stat: Callable[[list], float], n: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of ``stat`` under a two-level bootstrap: seeds are resampled with
    replacement, then the cases within each drawn seed. ``per_seed`` holds one list of case
    records per seed; ``stat`` maps a list of records to a number. With one seed, a case bootstrap."""
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        drawn: list = []
        for s in rng.integers(len(per_seed), size=len(per_seed)):
            cases = per_seed[int(s)]
            if len(cases):
                drawn += [cases[int(i)] for i in rng.integers(len(cases), size=len(cases))]
        v = stat(drawn)
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return (float(lo), float(hi))


N_BOOT = 1000  # bootstrap resamples per interval (the quick demo lowers it)


def figure(per_seed: list, stat: Callable[[list], float]) -> dict:
    """{"value": stat over all seeds' cases pooled, "ci95": [lo, hi], "per_seed": [...]}."""
    pooled = [r for rows in per_seed for r in rows]
    return {"value": stat(pooled), "ci95": list(bootstrap(per_seed, stat, n=N_BOOT)),
            "per_seed": [stat(r) for r in per_seed]}


def edit_stats(rows_per_seed: list[list[dict]]) -> dict:
    def collateral(rows):
        others = sum(r["others"] for r in rows)
        return sum(r["collateral"] for r in rows) / others if others else float("nan")

    def g2_collateral(rows):
        rows = [r for r in rows if "g2_collateral" in r]
        others = sum(r["others"] for r in rows)
        return sum(r["g2_collateral"] for r in rows) / others if others else float("nan")

    out = {
        "n": sum(len(r) for r in rows_per_seed),
        "cycle_success": figure(rows_per_seed, lambda rows: _mean(r["success"] for r in rows)),
        "collateral_change": figure(rows_per_seed, collateral),
        "mean_abs_delta": figure(rows_per_seed, lambda rows: _mean(r["l1"] for r in rows)),
    }
    if any("transfer" in r for rows in rows_per_seed for r in rows):
        out["transfer_success"] = figure(rows_per_seed, lambda rows: _mean(r.get("transfer") for r in rows))
        out["n_transfer"] = sum(r.get("transfer") is not None for rows in rows_per_seed for r in rows)
        out["g2_collateral_change"] = figure(rows_per_seed, g2_collateral)
    for key, values in (("kind", EDIT_KINDS), ("finding", FINDINGS)):
        out["by_" + key] = {}
        for v in values:
            sub = [[r for r in rows if r[key] == v] for rows in rows_per_seed]
            if any(sub):
                out["by_" + key][v] = {"n": sum(len(s) for s in sub),
                                       "cycle_success": _mean(r["success"] for s in sub for r in s),
                                       "transfer_success": _mean(r.get("transfer") for s in sub for r in s)}  # fmt: skip
    return out


def localisation_stats(loc_per_seed: list[dict], methods: Sequence[str] = METHODS) -> dict:
    """``loc_per_seed``: per seed {"finding": [...], method: {"pointing": [...], "iou": [...], "auroc": [...]}}."""
    records = [[{"finding": f, **{(m, k): s[m][k][i] for m in methods for k in ("pointing", "iou", "auroc")}}
                for i, f in enumerate(s["finding"])] for s in loc_per_seed]  # fmt: skip
    res: dict = {"n_cases": sum(len(r) for r in records),
                 "n_by_finding": {f: sum(r["finding"] == f for rows in records for r in rows) for f in FINDINGS}}
    res["methods"] = {}
    for m in methods:
        res["methods"][m] = {k: figure(records, lambda rows, _m=m, _k=k: _mean(r[(_m, _k)] for r in rows))
                             for k in ("pointing", "iou", "auroc")}  # fmt: skip
        res["methods"][m]["pointing_by_finding"] = {
            f: _mean(r[(m, "pointing")] for rows in records for r in rows if r["finding"] == f) for f in FINDINGS}
    pooled = {m: _mean(r[(m, "pointing")] for rows in records for r in rows) for m in BASELINES}
    best = max(BASELINES, key=lambda b: pooled[b])
    res["best_baseline"] = best
    res["pointing_margin_over_best_baseline"] = figure(
        records, lambda rows: _mean(r[("cvlm", "pointing")] for r in rows) - _mean(r[(best, "pointing")] for r in rows))
    res["m_alone_margin_over_best_baseline"] = figure(
        records, lambda rows: _mean(r[("cvlm_m_alone", "pointing")] for r in rows) - _mean(r[(best, "pointing")] for r in rows))
    return res


def shortcut_stats(sc_per_seed: list[dict], methods: Sequence[str] = METHODS) -> dict:
    """The shortcut figures: per method the rate of maps whose maximum is on the marker over the
    reliant cases (the headline), over all cases, and on the heart over the non-reliant cases."""
    records = [[{"reliant": s["reliant"][i], "removed": s["removed"][i],
                 **{("m", m): s["on_marker"][m][i] for m in methods}, **{("f", m): s["on_finding"][m][i] for m in methods}}
                for i in range(len(s["reliant"]))] for s in sc_per_seed]  # fmt: skip

    def rate(key, m, sel=None):
        return lambda rows: _mean(r[(key, m)] for r in rows if sel is None or r["reliant"] == sel)

    res = {"n_cases": sum(len(r) for r in records), "n_reliant": sum(r["reliant"] for rows in records for r in rows),
           "n_candidates": sum(s["n_candidates"] for s in sc_per_seed),
           "reports_finding_without_marker": _mean(v for s in sc_per_seed for v in s["without_marker"]),
           "reports_finding_with_marker_only": _mean(v for s in sc_per_seed for v in s["marker_only"]),
           "cycle_success": _mean(r["removed"] for rows in records for r in rows),
           "on_marker_reliant": {m: figure(records, rate("m", m, True)) for m in methods},
           "on_marker": {m: figure(records, rate("m", m)) for m in methods},
           "on_finding_not_reliant": {m: figure(records, rate("f", m, False)) for m in methods}}  # fmt: skip
    bases = [b for b in BASELINES if b in methods]
    if bases and "cvlm" in methods:
        pooled = {b: res["on_marker_reliant"][b]["value"] for b in bases}
        best = max(bases, key=lambda b: -1 if np.isnan(pooled[b]) else pooled[b])
        res["best_baseline"] = best
        res["margin_over_best_baseline"] = figure(
            records, lambda rows: rate("m", "cvlm", True)(rows) - rate("m", best, True)(rows))
    return res
