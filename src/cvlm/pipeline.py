"""The demo pipeline: data -> generator -> manipulator -> shortcut pair -> evaluation -> outputs.

Everything is seeded, so the same command gives the same numbers on the same machine. Held-out
phantoms use different seed streams from the training phantoms.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, atomic_write, atomic_write_text
from .explain import BASELINES, baseline_maps, cvlm_map
from .generator import CXRReportGenerator, GeneratorConfig, freeze
from .manipulator import Manipulator, ManipulatorConfig
from .metrics import auroc, collateral_changes, cycle_success, pointing_game, topk_iou
from .phantoms import FINDINGS, MARKER_NAME, Phantom, make_dataset
from .reports import EDIT_KINDS, Edit, Tokenizer, label_report, random_edit, write_report
from .train import generator_findings, images_tensor, train_generator, train_manipulator

TARGETS = {
    "cycle_success": (">=", 0.90),
    "collateral_change": ("<=", 0.05),
    "pointing_margin_over_best_baseline": (">=", 0.10),
    "shortcut_exposed": (">=", 0.80),
}
SHORTCUT_FINDING = "cardiomegaly"
# every map scored: CVLM as configured (by default M's change refined on each image), the amortised
# manipulator M alone (one forward pass), the CVLM objective optimised per image from zero (M
# unused), and the baselines
METHODS = ("cvlm", "cvlm_m_alone", "cvlm_from_zero", *BASELINES)


@dataclass
class DemoConfig:
    """Sizes of the demo; ``quick()`` shrinks everything so that a test can run it in seconds."""

    size: int = 64
    n_train: int = 6000  # training phantoms per generator (rendering is ~2 ms each)
    n_man_train: int = 2000  # the first n of them train the manipulators (G's reports are generated for them)
    n_test: int = 200
    # step caps; with the default time budget the budget usually ends a training first
    gen_steps: int = 6000
    man_steps: int = 5000
    short_gen_steps: int = 2000
    short_man_steps: int = 3000
    batch_size: int = 32
    man_batch_size: int = 16
    n_loc: int = 8  # localisation cases per finding type at most (each runs occlusion and IG)
    n_short: int = 24
    seed: int = 0
    gen_lr: float = 2e-3
    man_lr: float = 4e-3
    identity_frac: float = 0.2
    # overrides of manipulator.DEFAULT_WEIGHTS: a stronger L1 (sparsity), a 0.2-nat hinge on the
    # cycle loss and the common-mode penalty (measured in docs/cvlm.md); the per-image refinement
    # adds its own total variation (ManipulatorConfig.refine_weights)
    man_weights: dict[str, float] = field(default_factory=lambda: {"l1": 5.0, "margin": 0.2, "common": 10.0})
    # Wall-clock budget of the four trainings together (None: run the step counts exactly, which
    # is deterministic). Each training stops at its step count or when its share of the budget
    # (plus whatever earlier trainings left unused) is spent, and anneals its learning rate on
    # whichever comes first; metrics.json records the steps actually run.
    budget_s: float | None = 600.0
    budget_shares: tuple[float, float, float, float] = (0.33, 0.37, 0.1, 0.2)  # gen, man, gen_s, man_s
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    man: ManipulatorConfig = field(default_factory=ManipulatorConfig)

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            size=32, n_train=96, n_man_train=96, n_test=24, gen_steps=6, man_steps=4, short_gen_steps=4, short_man_steps=3,
            batch_size=8, man_batch_size=8, n_loc=3, n_short=6, budget_s=None,
            gen=GeneratorConfig(d_model=32, n_layers=1, n_heads=2, channels=(8, 16), image_size=32),
            man=ManipulatorConfig(channels=(8, 16, 16), d_text=16),
        )  # fmt: skip


def save_model(model: CXRReportGenerator | Manipulator, path: Path) -> None:
    """Checkpoint atomically (temp file + os.replace)."""
    atomic_write(path, lambda p: torch.save(model.state(), p))


def load_generator(path: Path) -> CXRReportGenerator:
    return freeze(CXRReportGenerator.from_state(_load(path)))


def load_manipulator(path: Path) -> Manipulator:
    return Manipulator.from_state(_load(path))


def _load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(path, "expected a checkpoint written by `cvlm demo` or `cvlm train` (file not found)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the user's file problem
        raise UserError(path, f"expected a cvlm checkpoint, could not read it ({type(e).__name__})") from None


# ----------------------------------------------------------------------------------------------
# evaluation


def _labels(reports: list[str]) -> list[dict]:
    return [label_report(r) for r in reports]


def evaluate_edits(gen, manip, test: list[Phantom], seed: int, refine: bool = True) -> tuple[dict, list[dict]]:
    """One random edit per held-out phantom (edit kinds uniform): cycle success and collateral.
    ``refine=False`` scores M alone (its residual without the per-image refinement)."""
    rng = np.random.default_rng(seed)
    x = images_tensor(test)
    t_old = gen.generate(x)
    before = _labels(t_old)
    edits: list[Edit] = []
    for f in before:
        e = random_edit(f, rng)
        assert e is not None  # "add" always applies to some absent finding or another edit exists
        edits.append(e)
    t_new = [write_report(e.apply(f)) for e, f in zip(edits, before, strict=True)]
    x_new = manip.manipulate(x, t_new, t_old, gen=gen if refine else None)
    after = _labels(gen.generate(x_new))
    rows = []
    for i, (e, b, a) in enumerate(zip(edits, before, after, strict=True)):
        changed, n_other = collateral_changes(e, b, a)
        rows.append({"i": i, "edit": e.describe(), "kind": e.kind, "finding": e.name,
                     "success": cycle_success(e, b, a), "collateral": changed, "others": n_other,
                     "l1": float((x_new[i] - x[i]).abs().mean())})  # fmt: skip
    res = {
        "n": len(rows),
        "cycle_success": float(np.mean([r["success"] for r in rows])),
        "collateral_change": float(sum(r["collateral"] for r in rows) / sum(r["others"] for r in rows)),
        "mean_abs_delta": float(np.mean([r["l1"] for r in rows])),
        "by_kind": {},
        "by_finding": {},
    }
    for key, values in (("by_kind", EDIT_KINDS), ("by_finding", FINDINGS)):
        field_ = "kind" if key == "by_kind" else "finding"
        for v in values:
            sel = [r for r in rows if r[field_] == v]
            if sel:
                res[key][v] = {"n": len(sel), "cycle_success": float(np.mean([r["success"] for r in sel])),
                               "collateral_change": float(sum(r["collateral"] for r in sel) / sum(r["others"] for r in sel))}  # fmt: skip
    return res, rows


def localisation_cases(gen, test: list[Phantom], n_per_finding: int) -> list[tuple[int, str]]:
    """(phantom index, finding) where the finding is truly present AND the generator reports it,
    so that "remove it" is an edit of the generator's own report with a known mask."""
    reports = gen.generate(images_tensor(test))
    cases: list[tuple[int, str]] = []
    for name in FINDINGS:
        sel = [i for i, (p, r) in enumerate(zip(test, reports, strict=True))
               if name in p.findings and name in label_report(r) and p.masks[name].any()]  # fmt: skip
        cases += [(i, name) for i in sel[:n_per_finding]]
    return cases


def explain_cases(gen, manip, phantoms: list[Phantom], cases: list[tuple[int, str]], batch: int = 16) -> dict:
    """Maps of every method for the 'remove finding' edit of each case, as numpy (N, H, W)."""
    maps: dict[str, list[np.ndarray]] = {m: [] for m in METHODS}
    x_news, t_olds, t_news = [], [], []
    for k in range(0, len(cases), batch):
        chunk = cases[k : k + batch]
        x = images_tensor([phantoms[i] for i, _ in chunk])
        t = gen.generate(x)
        t_new = [write_report(Edit("remove", label_report(r)[n], n).apply(label_report(r))) for r, (_, n) in
                 zip(t, chunk, strict=True)]  # fmt: skip
        x_new, m = cvlm_map(manip, x, t_new, t, gen=gen)
        maps["cvlm"].append(m.numpy())
        maps["cvlm_m_alone"].append(cvlm_map(manip, x, t_new, t)[1].numpy())
        maps["cvlm_from_zero"].append(cvlm_map(manip, x, t_new, t, gen=gen, init="zero")[1].numpy())
        for name, bm in baseline_maps(gen, x, t, t_new).items():
            maps[name].append(bm.detach().numpy())
        x_news.append(x_new[:, 0].numpy())
        t_olds += t
        t_news += t_new
    if not cases:  # e.g. a generator that never reports the finding: nothing to explain
        empty = np.zeros((0, phantoms[0].image.shape[0], phantoms[0].image.shape[1]), np.float32)
        return {**{k: empty for k in maps}, "x_new": empty, "t": [], "t_new": []}
    out = {k: np.concatenate(v) for k, v in maps.items()}
    out["x_new"] = np.concatenate(x_news)
    out["t"] = t_olds
    out["t_new"] = t_news
    return out


def score_maps(maps: dict, masks: list[np.ndarray], names: list[str]) -> dict:
    res: dict = {}
    for method in METHODS:
        pg = [pointing_game(m, k) for m, k in zip(maps[method], masks, strict=True)]
        iou = [topk_iou(m, k) for m, k in zip(maps[method], masks, strict=True)]
        au = [auroc(m, k) for m, k in zip(maps[method], masks, strict=True)]
        res[method] = {"pointing_game": float(np.mean(pg)), "iou": float(np.mean(iou)), "auroc": float(np.nanmean(au)),
                       "pointing_by_finding": {n: float(np.mean([p for p, nn in zip(pg, names, strict=True) if nn == n]))
                                               for n in sorted(set(names))}}  # fmt: skip
    return res


def evaluate_shortcut(gen_s, manip_s, s_test: list[Phantom], cfg: DemoConfig) -> dict:
    """The shortcut experiment on held-out phantoms that have the finding and the marker and whose
    report by the shortcut generator states the finding; the edit is "remove the finding".

    Reliance is measured per case on counterfactuals rendered with the same seed (same anatomy):
    the case is *reliant* when G_s no longer reports the finding once the marker is taken away.
    Only there is the marker the evidence G_s uses, so only there must a faithful map point at it
    (where G_s reads the finding from the heart, pointing at the marker would be unfaithful): the
    headline ``shortcut_exposed`` is the CVLM pointing rate on the marker over the reliant cases;
    the rate over all cases is reported beside it. Sufficiency is checked the other way: the same
    anatomy with the marker but without the finding."""
    from .phantoms import render

    s_reports = _labels(gen_s.generate(images_tensor(s_test)))
    cand = [i for i, p in enumerate(s_test)
            if MARKER_NAME in p.masks and SHORTCUT_FINDING in p.findings and SHORTCUT_FINDING in s_reports[i]]  # fmt: skip
    base_seed = (cfg.seed * 10 + 4) * 1_000_003  # make_dataset's seed stream for s_test
    no_marker = [render(s_test[i].findings, base_seed + i, size=cfg.size, marker=False) for i in cand]
    no_finding = [render({k: v for k, v in s_test[i].findings.items() if k != SHORTCUT_FINDING}, base_seed + i,
                         size=cfg.size, marker=True) for i in cand]  # fmt: skip
    nm = _labels(gen_s.generate(images_tensor(no_marker))) if cand else []
    nf = _labels(gen_s.generate(images_tensor(no_finding))) if cand else []
    reliant_all = [SHORTCUT_FINDING not in r for r in nm]
    s_cases = [(i, SHORTCUT_FINDING) for i in cand[: cfg.n_short]]
    reliant = reliant_all[: cfg.n_short]
    s_maps = explain_cases(gen_s, manip_s, s_test, s_cases)
    methods = METHODS
    on_marker = {m: [pointing_game(a, s_test[i].masks[MARKER_NAME]) for a, (i, _) in zip(s_maps[m], s_cases, strict=True)]
                 for m in methods}  # fmt: skip
    on_finding = {m: [pointing_game(a, s_test[i].masks[SHORTCUT_FINDING]) for a, (i, _) in zip(s_maps[m], s_cases, strict=True)]
                  for m in methods}  # fmt: skip
    after = _labels(gen_s.generate(torch.from_numpy(s_maps["x_new"])[:, None])) if s_cases else []

    def mean(xs, sel=None) -> float:
        xs = [x for x, k in zip(xs, sel, strict=True) if k] if sel is not None else list(xs)
        return float(np.mean(xs)) if xs else 0.0

    return {
        "finding": SHORTCUT_FINDING,
        "n_candidates": len(cand),
        "n_cases": len(s_cases),
        "n_reliant": int(sum(reliant)),
        "reports_finding_without_marker": mean([SHORTCUT_FINDING in r for r in nm]) if cand else None,
        "reports_finding_with_marker_only": mean([SHORTCUT_FINDING in r for r in nf]) if cand else None,
        "cycle_success": mean([SHORTCUT_FINDING not in r for r in after]),
        "on_marker_reliant": {m: mean(on_marker[m], reliant) for m in methods},
        "on_marker": {m: mean(on_marker[m]) for m in methods},
        "on_finding": {m: mean(on_finding[m]) for m in methods},
        "reliant": reliant,
        "_cases": s_cases,
        "_maps": s_maps,
    }


# ----------------------------------------------------------------------------------------------
# the demo


def run_demo(out: Path, cfg: DemoConfig, progress: bool = True, log=print) -> dict:
    """Train everything on phantoms, evaluate on held-out phantoms, write checkpoints, metrics
    and the HTML report under ``out``. Returns the metrics dict."""
    from .report import results_markdown, write_html

    t_start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    tok = Tokenizer()
    gcfg = GeneratorConfig(**{**asdict(cfg.gen), "image_size": cfg.size})
    log(f"phantoms: {cfg.n_train} train + {cfg.n_test} test ({cfg.size} px), and a shortcut pair set")
    train = make_dataset(cfg.n_train, cfg.seed * 10 + 1, size=cfg.size)
    test = make_dataset(cfg.n_test, cfg.seed * 10 + 2, size=cfg.size)
    s_train = make_dataset(cfg.n_train, cfg.seed * 10 + 3, size=cfg.size, shortcut=SHORTCUT_FINDING)
    s_test = make_dataset(cfg.n_test, cfg.seed * 10 + 4, size=cfg.size, shortcut=SHORTCUT_FINDING)

    t_budget = time.time()
    shares = np.cumsum(cfg.budget_shares) / np.sum(cfg.budget_shares)

    def left(phase: int) -> float | None:
        """Seconds left for training phase ``phase`` (0..3) under the budget, if any."""
        return None if cfg.budget_s is None else max(0.0, shares[phase] * cfg.budget_s - (time.time() - t_budget))

    common = {"progress": progress}
    gen = CXRReportGenerator(tok, gcfg)
    hist_g = train_generator(gen, train, cfg.gen_steps, cfg.batch_size, lr=cfg.gen_lr, seed=cfg.seed,
                             max_seconds=left(0), **common)  # fmt: skip
    save_model(gen, out / "generator.pt")
    manip = Manipulator(tok, cfg.man)
    man_kw = {"lr": cfg.man_lr, "identity_frac": cfg.identity_frac, "weights": cfg.man_weights or None, **common}
    m_train = train[: cfg.n_man_train]
    hist_m = train_manipulator(manip, gen, m_train, cfg.man_steps, cfg.man_batch_size, seed=cfg.seed,
                               base=generator_findings(gen, m_train), max_seconds=left(1), **man_kw)  # fmt: skip
    save_model(manip, out / "manipulator.pt")
    gen_s = CXRReportGenerator(tok, gcfg)
    hist_gs = train_generator(gen_s, s_train, cfg.short_gen_steps, cfg.batch_size, lr=cfg.gen_lr, seed=cfg.seed + 1,
                              desc="shortcut generator", max_seconds=left(2), **common)  # fmt: skip
    save_model(gen_s, out / "generator_shortcut.pt")
    manip_s = Manipulator(tok, cfg.man)
    ms_train = s_train[: cfg.n_man_train]
    hist_ms = train_manipulator(manip_s, gen_s, ms_train, cfg.short_man_steps, cfg.man_batch_size, seed=cfg.seed + 1,
                                base=generator_findings(gen_s, ms_train), desc="shortcut manipulator",
                                max_seconds=left(3), **man_kw)  # fmt: skip
    save_model(manip_s, out / "manipulator_shortcut.pt")
    t_train = time.time() - t_start

    log("evaluating on held-out phantoms")
    freeze(gen)
    freeze(gen_s)
    x_test = images_tensor(test)
    gen_reports = _labels(gen.generate(x_test))
    gen_acc = {n: float(np.mean([r.get(n) == p.findings.get(n) for r, p in zip(gen_reports, test, strict=True)]))
               for n in FINDINGS}  # fmt: skip
    edits, edit_rows = evaluate_edits(gen, manip, test, cfg.seed + 7)
    edits_m, _ = evaluate_edits(gen, manip, test, cfg.seed + 7, refine=False)

    cases = localisation_cases(gen, test, cfg.n_loc)
    loc_maps = explain_cases(gen, manip, test, cases)
    loc_masks = [test[i].masks[n] for i, n in cases]
    loc = score_maps(loc_maps, loc_masks, [n for _, n in cases])
    best_base = max(BASELINES, key=lambda b: loc[b]["pointing_game"])

    shortcut = evaluate_shortcut(gen_s, manip_s, s_test, cfg)
    s_cases, s_maps = shortcut.pop("_cases"), shortcut.pop("_maps")
    margin = loc["cvlm"]["pointing_game"] - loc[best_base]["pointing_game"]
    headline = {
        "cycle_success": edits["cycle_success"],
        "collateral_change": edits["collateral_change"],
        "pointing_game_cvlm": loc["cvlm"]["pointing_game"],
        "pointing_game_best_baseline": loc[best_base]["pointing_game"],
        "best_baseline": best_base,
        "pointing_margin_over_best_baseline": margin,
        "shortcut_exposed": shortcut["on_marker_reliant"]["cvlm"],
    }
    targets = {k: {"target": f"{op} {v}", "value": headline[k], "met": bool(headline[k] >= v if op == ">=" else headline[k] <= v)}
               for k, (op, v) in TARGETS.items()}  # fmt: skip
    metrics = {
        "headline": headline,
        "targets": targets,
        "generator_accuracy": gen_acc,
        "edits": edits,
        "edits_m_alone": {k: edits_m[k] for k in ("n", "cycle_success", "collateral_change", "mean_abs_delta")},
        "localisation": {"n_cases": len(cases), "methods": loc},
        "shortcut": shortcut,
        "training": {"generator": hist_g, "manipulator": hist_m, "shortcut_generator": hist_gs,
                     "shortcut_manipulator": hist_ms},
        "config": asdict(cfg),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "seconds": {"train": t_train, "total": time.time() - t_start, "process_cpu": time.process_time() - cpu_start},
    }  # fmt: skip
    metrics["seconds"]["total"] = time.time() - t_start
    metrics["seconds"]["process_cpu"] = time.process_time() - cpu_start
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    write_html(out / "report.html", metrics, test, cases, loc_maps, s_test, s_cases, s_maps, edit_rows)
    atomic_write_text(out / "results.md", results_markdown(metrics))
    return metrics
