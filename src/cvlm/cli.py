"""``cvlm`` command line: demo, explain, phantom, data-check, labels.

User errors print ``error: <file>[:<line>]: <what was expected>`` and exit with code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import typer

from .errors import USER_ERROR_EXIT_CODE, UserError, atomic_write_text

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Explain a chest X-ray report generator by cyclic manipulation.")


def _threads(n: int) -> None:
    # One thread by default: on a shared 2-core machine OpenMP threads spin against other work
    # and a 2-thread run was measured 10x slower than a 1-thread one.
    import torch

    torch.set_num_threads(max(1, n))


def _out_dir(out: Path, overwrite: bool, names: tuple[str, ...]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(out, "expected a directory for --out")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(out / existing[0], "already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/cvlm-demo"), "--out", help="output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes, runs in seconds (a smoke test, not results)"),
    seeds: list[int] = typer.Option([0], "--seeds", "--seed", help="one or more seeds (repeat the option); "
                                    "a seed whose seed_N/cases.json exists is reused, so a cut-off run resumes"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    budget_s: float = typer.Option(-1.0, "--budget-s", help="wall-clock seconds for the five trainings of a seed "
                                   "(default: the config's; 0 = no time cap, run the step counts exactly)"),
    resume: bool = typer.Option(False, "--resume", help="continue a run in --out (reuse finished seeds)"),
) -> None:
    """Train G, G2, M and the shortcut pair on phantoms per seed; write metrics.json, results.md and report.html."""
    from .pipeline import DemoConfig, run_demo

    _threads(threads)
    if not resume:
        _out_dir(out, overwrite, ("metrics.json", "report.html", *(f"seed_{s}" for s in seeds)))
    cfg = DemoConfig.quick() if quick else DemoConfig()
    if budget_s >= 0:
        cfg.budget_s = budget_s or None
    m = run_demo(out, cfg, seeds=seeds, progress=progress, log=lambda s: typer.echo(s, err=True))
    for k, t in m["targets"].items():
        lo, hi = t["ci95"]
        typer.echo(f"{k:36s} {t['value']:.3f} [{lo:.3f}, {hi:.3f}]  target {t['target']:7s} "
                   f"{'met' if t['met'] else 'missed'}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'results.md'} and {out / 'report.html'} "
               f"in {m['run']['seconds_this_call']:.0f} s")


@app.command()
def explain(
    image: Path = typer.Argument(..., help="a PNG/JPEG chest X-ray (or a phantom from `cvlm phantom`)"),
    edit: str = typer.Option(..., "--edit", help='e.g. "remove effusion", "add small left upper nodule", "flip effusion"'),
    model: Path = typer.Option(Path("runs/cvlm-demo"), "--model", help="folder with generator.pt and manipulator.pt"),
    out: Path = typer.Option(Path("runs/cvlm-explain"), "--out", help="output folder for PNGs and explanation.json"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: int = typer.Option(1, "--threads"),
    refine_steps: int | None = typer.Option(
        None, "--refine-steps", help="gradient steps optimising the change for this image (default: as saved; 0 = M alone)"
    ),
    refine_init: str | None = typer.Option(
        None, "--refine-init", help="start the optimisation from 'zero' or from M's change, 'manipulator' (default: as saved)"
    ),
) -> None:
    """Explain the saved generator's report of IMAGE under an edit: writes x', |x' - x| and the report change."""
    import dataclasses

    import torch

    from .data import load_image
    from .html_report import save_png
    from .pipeline import load_generator, load_manipulator
    from .report_text import label_report, parse_edit, write_report

    _threads(threads)
    gen = load_generator(model / "generator.pt")
    manip = load_manipulator(model / "manipulator.pt")
    overrides = {k: v for k, v in (("refine_steps", refine_steps), ("refine_init", refine_init)) if v is not None}
    try:  # ManipulatorConfig validates its own fields ("<field>: expected ...")
        manip.cfg = dataclasses.replace(manip.cfg, **overrides)
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise UserError("--" + field.replace("_", "-"), message) from None
    _out_dir(out, overwrite, ("explanation.json",))
    x = torch.from_numpy(load_image(image, gen.cfg.image_size))[None, None]
    t = gen.generate(x)[0]
    before = label_report(t)
    e = parse_edit(edit, before)
    t_new = write_report(e.apply(before))
    x_new = manip.manipulate(x, [t_new], [t], gen=gen)
    t_regen = gen.generate(x_new)[0]
    delta = (x_new - x)[0, 0].numpy()
    save_png(out / "manipulated.png", np.clip(x_new[0, 0].numpy(), 0, 1), scale=4)
    save_png(out / "cvlm_map.png", np.abs(delta), cmap="inferno", scale=4)
    ok = label_report(t_regen).get(e.name) == e.apply(before).get(e.name)
    res = {"image": str(image), "edit": e.describe(), "report": t, "edited_report": t_new,
           "regenerated_report": t_regen, "cycle_success": ok, "mean_abs_delta": float(np.abs(delta).mean()),
           "refine_steps": manip.cfg.refine_steps, "refine_init": manip.cfg.refine_init}  # fmt: skip
    atomic_write_text(out / "explanation.json", json.dumps(res, indent=2))
    for k, v in res.items():
        typer.echo(f"{k}: {v}")


@app.command()
def phantom(
    out: Path = typer.Option(Path("runs/cvlm-phantoms"), "--out"),
    n: int = typer.Option(4, "--n"),
    size: int = typer.Option(128, "--size"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Write N phantoms as PNG with their reports (reports.csv: image,report) - a loadable folder."""
    import csv
    import io

    from .html_report import save_png
    from .phantoms import make_dataset
    from .report_text import write_report

    _out_dir(out, overwrite, ("reports.csv",))
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "report"])
    for i, p in enumerate(make_dataset(n, seed, size=size)):
        save_png(out / f"phantom_{i:03d}.png", p.image)
        w.writerow([f"phantom_{i:03d}.png", write_report(p.findings)])
    atomic_write_text(out / "reports.csv", buf.getvalue())
    typer.echo(f"wrote {n} phantoms and {out / 'reports.csv'}")


@app.command("data-check")
def data_check(
    source: Path = typer.Argument(..., help="reports CSV, IU X-ray XML folder or MIMIC-CXR folder"),
    images: Path = typer.Option(None, "--images", help="image folder if not beside the reports"),
    size: int = typer.Option(64, "--size"),
) -> None:
    """Validate a real image/report folder: every image readable, every report labelled."""
    from collections import Counter

    from .data import load_image, load_studies
    from .report_text import label_report

    studies = load_studies(source, images)
    counts: Counter[str] = Counter()
    for s in studies:
        load_image(s.image_path, size)
        counts.update(list(label_report(s.report)))
    typer.echo(f"{len(studies)} studies; findings stated: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@app.command()
def labels(text: str = typer.Argument(..., help="a report")) -> None:
    """Run the rule-based labeller on a report and print the findings."""
    from .report_text import label_report

    f = label_report(text)
    typer.echo(json.dumps({k: {a: getattr(v, a) for a in ("side", "zone", "size") if getattr(v, a)} for k, v in f.items()}))


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e.format()}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(USER_ERROR_EXIT_CODE)
        raise


if __name__ == "__main__":
    main()
