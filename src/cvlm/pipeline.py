"""The demo pipeline: phantoms -> generators -> manipulators -> evaluation -> outputs, per seed,
then the seeds together with intervals.

Per seed: the generator G, a second generator G2 (other seed, other width) that only scores
transfer, the manipulator M for G, and the shortcut pair (G_s, M_s) trained where a marker goes
with the finding on part of the cases. Tuning choices of the refinement (total-variation weight,
start from M or from zero) are made on a validation split; the test split is scored once.
Held-out phantoms use seed streams disjoint from the training ones. ``run_demo`` is resumable:
a seed whose ``seed_N/cases.json`` exists is not run again.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .devices import resolve_device
from .errors import UserError, atomic_write, atomic_write_text
from .evaluate import (
    CVLM_VARIANTS,
    SHORTCUT_FINDING,
    edit_stats,
    evaluate_edits,
    evaluate_shortcut,
    explain_cases,
    localisation_cases,
    localisation_stats,
    score_cases,
    shortcut_stats,
)
from .explain import BASELINES
from .generator import CXRReportGenerator, GeneratorConfig, freeze
from .manipulator import Manipulator, ManipulatorConfig
from .phantoms import FINDINGS, make_dataset
from .report_text import Tokenizer, label_report
from .train import generator_reports, images_tensor, train_generator, train_manipulator

# (direction, threshold); the shortcut target is relative to the best baseline, and the negative
# control (clean generator on marker images) must stay below its threshold
TARGETS = {
    "cycle_success": (">=", 0.90),
    "collateral_change": ("<=", 0.05),
    "transfer_success": (">=", 0.50),
    "pointing_margin_over_best_baseline": (">=", 0.10),
    "shortcut_margin_over_best_baseline": (">=", 0.10),
    "negative_control_on_marker": ("<=", 0.20),
}
TRAININGS = ("generator", "manipulator", "generator2", "shortcut_generator", "shortcut_manipulator")


@dataclass
class DemoConfig:
    """Sizes of the demo; ``quick()`` shrinks everything so that a test can run it in seconds."""

    size: int = 64
    n_train: int = 5000  # training phantoms per generator (rendering is ~2 ms each)
    n_man_train: int = 2000  # the first n of them train the manipulators (G's reports are generated for them)
    n_val: int = 200  # validation phantoms: every tuning choice is made here
    n_test: int = 400
    n_edit: int = 100  # test phantoms that get one random edit each
    # step caps; with the default time budget the budget usually ends a training first
    gen_steps: int = 6000
    man_steps: int = 5000
    short_gen_steps: int = 2000
    short_man_steps: int = 3000
    batch_size: int = 32
    man_batch_size: int = 16
    n_loc: int = 30  # localisation cases per finding type at most
    n_val_loc: int = 2  # validation cases per finding for the tuning
    n_short: int = 30
    seed: int = 0
    gen_lr: float = 2e-3
    man_lr: float = 4e-3
    identity_frac: float = 0.2
    # the shortcut generator's training data: the marker comes with the finding in this fraction of
    # the cases with it (and with its absence in the same fraction of the others), so the finding
    # itself stays informative and G_s relies on the marker only in part
    shortcut_rate: float = 0.85
    marker: str = "random"
    # overrides of manipulator.DEFAULT_WEIGHTS: a stronger L1 (sparsity), a 0.2-nat hinge on the
    # cycle loss and the common-mode penalty
    man_weights: dict[str, float] = field(default_factory=lambda: {"l1": 5.0, "margin": 0.2, "common": 10.0})
    # refinement settings tried on the validation split (pointing game decides; ties keep the first)
    tune_tv: tuple[float, ...] = (10.0, 1.0)
    tune_init: tuple[str, ...] = ("manipulator", "zero")
    # the maps scored on the test split: CVLM as tuned, M alone, and the baselines; add
    # "cvlm_from_zero" (the objective per image from zero, M unused) for that comparison too -
    # it doubles the refinement time of the evaluation
    methods: tuple[str, ...] = ("cvlm", "cvlm_m_alone", *BASELINES)
    n_boot: int = 1000  # bootstrap resamples per 95 % interval
    # Budget of the five trainings together in CPU seconds of this process (None: run the step
    # counts exactly). CPU time, not wall time: on a shared machine a wall-clock budget buys less
    # training the busier the machine is. Each training stops at its step count or when its share
    # (plus whatever earlier trainings left unused) is spent; metrics.json records the steps run.
    budget_s: float | None = 300.0
    budget_shares: tuple[float, ...] = (0.3, 0.3, 0.15, 0.1, 0.15)  # in the order of TRAININGS
    gen: GeneratorConfig = field(default_factory=GeneratorConfig)
    # G2: another width and seed, so that a change that moves G but is not a feature of the image
    # (G's own adversarial direction) does not move G2
    gen2: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(d_model=48, channels=(24, 48, 48, 48)))
    man: ManipulatorConfig = field(default_factory=ManipulatorConfig)

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            size=32, n_train=96, n_man_train=96, n_val=24, n_test=24, n_edit=12, gen_steps=6, man_steps=4,
            short_gen_steps=4, short_man_steps=3, batch_size=8, man_batch_size=8, n_loc=3, n_val_loc=1, n_short=6,
            budget_s=None,
            gen=GeneratorConfig(d_model=32, n_layers=1, n_heads=2, channels=(8, 16), image_size=32),
            gen2=GeneratorConfig(d_model=16, n_layers=1, n_heads=2, channels=(8, 16), image_size=32),
            man=ManipulatorConfig(channels=(8, 16, 16), d_text=16, refine_steps=3), n_boot=100,
        )  # fmt: skip


def save_model(model: CXRReportGenerator | Manipulator, path: Path) -> None:
    """Checkpoint atomically (temp file + os.replace)."""
    atomic_write(path, lambda p: torch.save(model.state(), p))


def load_generator(path: Path, device: torch.device | str | None = None) -> CXRReportGenerator:
    return freeze(CXRReportGenerator.from_state(_load(path), device))


def load_manipulator(path: Path, device: torch.device | str | None = None) -> Manipulator:
    return Manipulator.from_state(_load(path), device)


def _load(path: Path) -> dict:
    if not path.is_file():
        raise UserError(path, "expected a checkpoint written by `cvlm demo` (file not found)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is the user's file problem
        raise UserError(path, f"expected a cvlm checkpoint, could not read it ({type(e).__name__})") from None


def git_commit() -> str:
    """The commit of the code that runs: ``$CVLM_COMMIT`` when set (a run from an exported copy of
    the sources), else ``git rev-parse`` of this file's checkout, else ``unknown``."""
    import os

    if os.environ.get("CVLM_COMMIT"):
        return os.environ["CVLM_COMMIT"]
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------------------------
# one seed


def _train_all(out: Path, cfg: DemoConfig, progress: bool, device: torch.device) -> tuple[dict, dict]:
    """Train the five models of one seed on ``device``. Each model is built on the CPU and then
    moved, so its initial weights are the same whatever the device."""
    tok = Tokenizer()
    gcfg = GeneratorConfig(**{**asdict(cfg.gen), "image_size": cfg.size})
    g2cfg = GeneratorConfig(**{**asdict(cfg.gen2), "image_size": cfg.size})
    train = make_dataset(cfg.n_train, cfg.seed * 10 + 1, size=cfg.size)
    s_train = make_dataset(cfg.n_train, cfg.seed * 10 + 3, size=cfg.size, shortcut=SHORTCUT_FINDING,
                           shortcut_rate=cfg.shortcut_rate, marker=cfg.marker)  # fmt: skip
    shares = np.cumsum(cfg.budget_shares) / np.sum(cfg.budget_shares)
    hist: dict = {}

    def left(phase: int) -> float | None:
        """CPU seconds left for training ``phase``: its share plus what earlier trainings left
        (the time spent generating M's base reports does not count)."""
        spent = sum(h["cpu_seconds"] for h in hist.values())
        return None if cfg.budget_s is None else max(0.0, shares[phase] * cfg.budget_s - spent)

    man_kw = {"lr": cfg.man_lr, "identity_frac": cfg.identity_frac, "weights": cfg.man_weights or None,
              "progress": progress}  # fmt: skip
    models = {}
    gen = CXRReportGenerator(tok, gcfg).to(device)
    hist["generator"] = train_generator(gen, train, cfg.gen_steps, cfg.batch_size, lr=cfg.gen_lr, seed=cfg.seed,
                                        max_seconds=left(0), progress=progress)  # fmt: skip
    models["generator"] = freeze(gen)
    manip = Manipulator(cfg.man).to(device)
    m_train = train[: cfg.n_man_train]
    hist["manipulator"] = train_manipulator(manip, gen, m_train, cfg.man_steps, cfg.man_batch_size, seed=cfg.seed,
                                            base=generator_reports(gen, m_train), max_seconds=left(1), **man_kw)  # fmt: skip
    models["manipulator"] = manip
    gen2 = CXRReportGenerator(tok, g2cfg).to(device)
    hist["generator2"] = train_generator(gen2, train, cfg.gen_steps, cfg.batch_size, lr=cfg.gen_lr,
                                         seed=cfg.seed + 1000, desc="generator G2", max_seconds=left(2),
                                         progress=progress)  # fmt: skip
    models["generator2"] = freeze(gen2)
    gen_s = CXRReportGenerator(tok, gcfg).to(device)
    hist["shortcut_generator"] = train_generator(gen_s, s_train, cfg.short_gen_steps, cfg.batch_size, lr=cfg.gen_lr,
                                                 seed=cfg.seed + 1, desc="shortcut generator", max_seconds=left(3),
                                                 progress=progress)  # fmt: skip
    models["shortcut_generator"] = freeze(gen_s)
    manip_s = Manipulator(cfg.man).to(device)
    ms_train = s_train[: cfg.n_man_train]
    hist["shortcut_manipulator"] = train_manipulator(manip_s, gen_s, ms_train, cfg.short_man_steps, cfg.man_batch_size,
                                                     seed=cfg.seed + 1, base=generator_reports(gen_s, ms_train),
                                                     desc="shortcut manipulator", max_seconds=left(4), **man_kw)  # fmt: skip
    models["shortcut_manipulator"] = manip_s
    for name, m in models.items():
        save_model(m, out / f"{name}.pt")
    return models, hist


def tune_refinement(gen, manip, val, cfg: DemoConfig) -> tuple[dict, list[dict]]:
    """Pick the refinement's total-variation weight and start on the validation split, by the
    pointing game of 'remove finding' on ``n_val_loc`` cases per finding."""
    cases = localisation_cases(gen, val, cfg.n_val_loc)
    masks = [val[i].masks[n] for i, n in cases]
    base_cfg = manip.cfg
    tried = []
    for tv in cfg.tune_tv:
        for init in cfg.tune_init:
            manip.cfg = dataclasses.replace(base_cfg, refine_weights={**base_cfg.refine_weights, "tv": tv},
                                            refine_init=init)  # fmt: skip
            maps = explain_cases(gen, manip, val, cases, methods=("cvlm",))
            pg = float(np.mean(score_cases(maps, masks, ("cvlm",))["cvlm"]["pointing"])) if cases else 0.0
            tried.append({"tv": tv, "init": init, "pointing": pg, "n": len(cases)})
    best = max(tried, key=lambda r: r["pointing"])  # max keeps the first of equals
    manip.cfg = dataclasses.replace(base_cfg, refine_weights={**base_cfg.refine_weights, "tv": best["tv"]},
                                    refine_init=best["init"])  # fmt: skip
    return {"tv": best["tv"], "init": best["init"]}, tried


def run_seed(out: Path, cfg: DemoConfig, progress: bool = True, log=print,
             device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Train and evaluate one seed on ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``
    or a ``torch.device``); writes ``out/cases.json`` (per-case rows), ``out/examples.pkl``
    (images and maps for the page) and the checkpoints. Returns the cases dict."""
    device = resolve_device(device)
    t_start, cpu_start = time.time(), time.process_time()
    torch.manual_seed(cfg.seed)
    log(f"seed {cfg.seed}: training five models on {cfg.n_train} phantoms each ({cfg.size} px, {device})")
    models, hist = _train_all(out, cfg, progress, device)
    t_train = time.time() - t_start
    gen, manip, gen2 = models["generator"], models["manipulator"], models["generator2"]
    gen_s, manip_s = models["shortcut_generator"], models["shortcut_manipulator"]
    val = make_dataset(cfg.n_val, cfg.seed * 10 + 5, size=cfg.size)
    test = make_dataset(cfg.n_test, cfg.seed * 10 + 2, size=cfg.size)
    s_seed = cfg.seed * 10 + 4
    s_test = make_dataset(cfg.n_test, s_seed, size=cfg.size, shortcut=SHORTCUT_FINDING,
                          shortcut_rate=cfg.shortcut_rate, marker=cfg.marker)  # fmt: skip

    log(f"tuning the refinement on the validation split (training took {t_train:.0f} s)")
    chosen, tried = tune_refinement(gen, manip, val, cfg)
    manip_s.cfg = dataclasses.replace(manip_s.cfg, refine_weights=dict(manip.cfg.refine_weights),
                                      refine_init=manip.cfg.refine_init)  # fmt: skip
    save_model(manip, out / "manipulator.pt")  # with the chosen refinement, which `cvlm explain` then uses
    save_model(manip_s, out / "shortcut_manipulator.pt")
    log(f"evaluating on held-out phantoms (refinement: tv {chosen['tv']}, from {chosen['init']})")
    x_test = images_tensor(test, device)
    acc = {}
    for name, g in (("generator", gen), ("generator2", gen2)):
        rep = [label_report(r) for r in g.generate(x_test)]
        acc[name] = {n: float(np.mean([r.get(n) == p.findings.get(n) for r, p in zip(rep, test, strict=True)]))
                     for n in FINDINGS}  # fmt: skip
    methods = cfg.methods
    variants = [m for m in methods if m in CVLM_VARIANTS]
    edit_rows, edit_examples = evaluate_edits(gen, manip, test[: cfg.n_edit], cfg.seed + 7, gen2=gen2,
                                              variants=variants)  # fmt: skip
    log(f"  edits done at {time.time() - t_start:.0f} s")
    cases = localisation_cases(gen, test, cfg.n_loc)
    loc_maps = explain_cases(gen, manip, test, cases, methods=methods)
    loc = {"finding": [n for _, n in cases], **score_cases(loc_maps, [test[i].masks[n] for i, n in cases], methods)}
    log(f"  localisation ({len(cases)} cases) done at {time.time() - t_start:.0f} s")
    sc = evaluate_shortcut(gen_s, manip_s, s_test, s_seed, cfg.size, cfg.n_short, methods)
    neg = evaluate_shortcut(gen, manip, s_test, s_seed, cfg.size, cfg.n_short, methods)
    log(f"  shortcut test and negative control done at {time.time() - t_start:.0f} s")
    s_cases, s_maps = sc.pop("_cases"), sc.pop("_maps")
    neg.pop("_cases"), neg.pop("_maps")
    seconds = {"train": t_train, "total": time.time() - t_start, "process_cpu": time.process_time() - cpu_start}
    record = {"seed": cfg.seed, "commit": git_commit(), "edits": edit_rows, "localisation": loc, "shortcut": sc, "negative_control": neg,
              "generator_accuracy": acc, "tuning": {"chosen": chosen, "tried": tried}, "training": hist,
              "seconds": seconds, "device": str(device), "config": asdict(cfg)}  # fmt: skip
    # a few cases for the page: one localisation case per finding and three shortcut cases
    first: dict[str, int] = {}
    for k, (_, n) in enumerate(cases):
        first.setdefault(n, k)
    pick = list(first.values())
    examples = {
        "edits": edit_examples,
        "localisation": [{"image": test[cases[k][0]].image, "mask": test[cases[k][0]].masks[cases[k][1]],
                          "finding": cases[k][1], "x_new": loc_maps["x_new"][k], "t": loc_maps["t"][k],
                          "t_new": loc_maps["t_new"][k], "maps": {m: loc_maps[m][k] for m in methods}} for k in pick],
        "shortcut": [{"image": s_test[i].image, "mask": s_test[i].masks["marker"], "finding": n,
                      "x_new": s_maps["x_new"][k], "t": s_maps["t"][k], "t_new": s_maps["t_new"][k],
                      "reliant": sc["reliant"][k], "maps": {m: s_maps[m][k] for m in methods}}
                     for k, (i, n) in enumerate(s_cases[:3])],
    }  # fmt: skip
    atomic_write(out / "examples.pkl", lambda p: p.write_bytes(pickle.dumps(examples)))
    atomic_write_text(out / "cases.json", json.dumps(record))
    log(f"seed {cfg.seed} done in {seconds['total']:.0f} s")
    return record


# ----------------------------------------------------------------------------------------------
# seeds together


def summarise(records: list[dict]) -> dict:
    """Figures with 95 % intervals (two-level bootstrap over seeds and cases) from per-seed rows."""
    from . import evaluate

    methods = tuple(records[0]["config"]["methods"])
    evaluate.N_BOOT = int(records[0]["config"].get("n_boot", 1000))
    edits = {v: edit_stats([r["edits"][v] for r in records]) for v in records[0]["edits"]}
    loc = localisation_stats([r["localisation"] for r in records], methods)
    sc = shortcut_stats([r["shortcut"] for r in records], methods)
    neg = shortcut_stats([r["negative_control"] for r in records], methods)
    head = {
        "cycle_success": edits["cvlm"]["cycle_success"],
        "collateral_change": edits["cvlm"]["collateral_change"],
        "transfer_success": edits["cvlm"].get("transfer_success", {"value": float("nan"), "ci95": [float("nan")] * 2}),
        "m_alone_cycle_success": edits["cvlm_m_alone"]["cycle_success"],
        "m_alone_transfer_success": edits["cvlm_m_alone"].get("transfer_success", {"value": float("nan")}),
        "pointing_game_cvlm": loc["methods"]["cvlm"]["pointing"],
        "pointing_game_m_alone": loc["methods"]["cvlm_m_alone"]["pointing"],
        "pointing_game_best_baseline": loc["methods"][loc["best_baseline"]]["pointing"],
        "best_baseline": loc["best_baseline"],
        "pointing_margin_over_best_baseline": loc["pointing_margin_over_best_baseline"],
        "shortcut_exposed": sc["on_marker_reliant"]["cvlm"],
        "shortcut_margin_over_best_baseline": sc["margin_over_best_baseline"],
        "negative_control_on_marker": neg["on_marker"]["cvlm"],
    }
    targets = {}
    for k, (op, v) in TARGETS.items():
        val, ci = head[k]["value"], head[k].get("ci95", [float("nan")] * 2)
        met = bool(val >= v if op == ">=" else val <= v) if not np.isnan(val) else False
        # "met" needs the whole interval on the right side; "within interval" when it straddles
        sure = bool(ci[0] >= v if op == ">=" else ci[1] <= v) if not np.isnan(ci[0]) else False
        targets[k] = {"target": f"{op} {v}", "value": val, "ci95": ci, "met": met, "met_at_interval": sure}
    return {"seeds": [r["seed"] for r in records], "headline": head, "targets": targets, "edits": edits,
            "localisation": loc, "shortcut": sc, "negative_control": neg,
            "tuning": {str(r["seed"]): r["tuning"] for r in records},
            "generator_accuracy": {str(r["seed"]): r["generator_accuracy"] for r in records},
            "training": {str(r["seed"]): r["training"] for r in records},
            "seconds": {str(r["seed"]): r["seconds"] for r in records}}  # fmt: skip


def run_demo(out: Path, cfg: DemoConfig, seeds: list[int] | None = None, progress: bool = True, log=print,
             device: torch.device | str = "cpu") -> dict:  # fmt: skip
    """Run (or resume) every seed under ``out/seed_N`` on ``device``, then write ``metrics.json``,
    ``results.md`` and ``report.html`` for the seeds together. Returns the metrics dict.

    The device is where the run happens, not what it is: it is not part of ``DemoConfig`` (a seed
    run on the CPU may be resumed on a GPU), and each seed's ``cases.json`` records its own."""
    from .html_report import results_markdown, write_html

    device = resolve_device(device)
    seeds = list(seeds) if seeds is not None else [cfg.seed]
    records = []
    t0 = time.time()
    for s in seeds:
        folder = out / f"seed_{s}"
        done = folder / "cases.json"
        if done.is_file():
            rec = json.loads(done.read_text())
            want = json.loads(json.dumps(asdict(dataclasses.replace(cfg, seed=s))))
            default = json.loads(json.dumps(asdict(DemoConfig())))
            saved = rec.get("config", {})
            # a setting added since the seed ran counts as its default there
            if set(saved) - set(want) or any(saved.get(k, default.get(k)) != v for k, v in want.items()):
                raise UserError(done, "expected the same demo configuration to resume (delete the folder to rerun)")
            log(f"seed {s}: already done, reusing {done}")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            rec = run_seed(folder, dataclasses.replace(cfg, seed=s), progress=progress, log=log, device=device)
        records.append(rec)
    metrics = summarise(records)
    metrics["config"] = asdict(cfg)
    metrics["run"] = {"commit": git_commit(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                      "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "device": str(device),
                      "seconds_this_call": time.time() - t0}  # fmt: skip
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    examples = pickle.loads((out / f"seed_{seeds[0]}" / "examples.pkl").read_bytes())
    write_html(out / "report.html", metrics, examples)
    atomic_write_text(out / "results.md", results_markdown(metrics))
    return metrics
