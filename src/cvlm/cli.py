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


DEVICE_HELP = "auto (CUDA, else MPS, else CPU) | cpu | cuda | cuda:N | mps: where every model and tensor runs"


def _device(name: str):
    """The ``--device`` option as a ``torch.device``; a device this machine lacks is one line, exit 2,
    before anything is written or loaded."""
    from .devices import resolve_device

    return resolve_device(name, where="--device")


def _out_dir(out: Path, overwrite: bool, names: tuple[str, ...]) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(out, "expected a directory for --out")
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise UserError(out / existing[0], "already exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)


@app.command(context_settings={"allow_extra_args": True})
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/cvlm-demo"), "--out", help="output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace existing outputs"),
    quick: bool = typer.Option(False, "--quick", help="tiny sizes, runs in seconds (a smoke test, not results)"),
    seed_text: list[str] = typer.Option(["0"], "--seeds", "--seed", help="seeds, e.g. --seeds 0,1,2 (or repeat "
                                        "the option); with --resume a seed whose seed_N/cases.json exists is reused"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    budget_s: float = typer.Option(-1.0, "--budget-s", help="CPU seconds for the five trainings of a seed "
                                   "(default: the config's; 0 = no time cap, run the step counts exactly)"),
    resume: bool = typer.Option(False, "--resume", help="continue a run in --out (reuse finished seeds)"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Train G, G2, M and the shortcut pair on phantoms per seed; write metrics.json, results.md and report.html."""
    from .pipeline import DemoConfig, run_demo

    try:  # --seeds 0,1,2 / --seeds 0 --seeds 1 / --seeds 0 1 2 (the extra words)
        seeds = [int(v) for t in [*seed_text, *ctx.args] for v in t.replace(",", " ").split()]
    except ValueError:
        raise UserError("--seeds", f"expected whole numbers such as 0 1 2, got {' '.join([*seed_text, *ctx.args])!r}") from None
    dev = _device(device)
    _threads(threads)
    if not resume:
        _out_dir(out, overwrite, ("metrics.json", "report.html", *(f"seed_{s}" for s in seeds)))
    cfg = DemoConfig.quick() if quick else DemoConfig()
    if budget_s >= 0:
        cfg.budget_s = budget_s or None
    m = run_demo(out, cfg, seeds=seeds, progress=progress, log=lambda s: typer.echo(s, err=True), device=dev)
    for k, t in m["targets"].items():
        lo, hi = t["ci95"]
        typer.echo(f"{k:36s} {t['value']:.3f} [{lo:.3f}, {hi:.3f}]  target {t['target']:7s} "
                   f"{'met' if t['met'] else 'missed'}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'results.md'} and {out / 'report.html'} "
               f"in {m['run']['seconds_this_call']:.0f} s")


def _model_folder(model: Path) -> Path:
    """A demo output folder holds one folder per seed: use the first seed's checkpoints."""
    if not (model / "generator.pt").is_file() and model.is_dir():
        seeds = sorted(model.glob("seed_*/generator.pt"))
        if seeds:
            return seeds[0].parent
    return model


@app.command()
def explain(
    image: Path = typer.Argument(..., help="a chest X-ray: PNG (8 or 16 bit), JPEG, or DICOM with pydicom installed"),
    edit: str = typer.Option(..., "--edit", help='e.g. "remove effusion", "add small left upper nodule", "flip effusion"'),
    model: Path = typer.Option(Path("runs/cvlm-demo"), "--model", help="folder with generator.pt and manipulator.pt "
                               "(a `cvlm demo` output folder: its first seed)"),
    generator: Path = typer.Option(None, "--generator", help="a Hugging Face image-to-text model folder "
                                   "(VisionEncoderDecoderModel or the same generate / labels contract) to explain "
                                   "instead of generator.pt; M from --model is used if present, else the change "
                                   "is optimised from zero"),
    out: Path = typer.Option(Path("runs/cvlm-explain"), "--out", help="output folder for PNGs, .npy and explanation.json"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    threads: int = typer.Option(1, "--threads"),
    refine_steps: int | None = typer.Option(
        None, "--refine-steps", help="gradient steps optimising the change for this image (default: as saved; 0 = M alone)"
    ),
    refine_init: str | None = typer.Option(
        None, "--refine-init", help="start the optimisation from 'zero' or from M's change, 'manipulator' (default: as saved)"
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
) -> None:
    """Explain a generator's report of IMAGE under an edit of that report: writes x' (PNG and the
    float .npy), the signed and absolute change, and explanation.json with the report G writes for
    x' and for the saved 8-bit PNG."""
    import dataclasses

    import torch

    from .data import load_image
    from .html_report import save_png
    from .manipulator import Manipulator, ManipulatorConfig
    from .pipeline import load_generator, load_manipulator
    from .report_text import edit_text, label_report, parse_edit

    dev = _device(device)
    _threads(threads)
    model = _model_folder(model)
    if generator is not None:
        from .hf import HFReportGenerator

        gen = HFReportGenerator.from_pretrained(generator, device=dev)
        has_m = (model / "manipulator.pt").is_file()
        manip = (load_manipulator(model / "manipulator.pt", dev) if has_m
                 else Manipulator(ManipulatorConfig(refine_init="zero")).to(dev))  # fmt: skip
    else:
        gen = load_generator(model / "generator.pt", dev)
        manip = load_manipulator(model / "manipulator.pt", dev)
    overrides = {k: v for k, v in (("refine_steps", refine_steps), ("refine_init", refine_init)) if v is not None}
    try:  # ManipulatorConfig validates its own fields ("<field>: expected ...")
        manip.cfg = dataclasses.replace(manip.cfg, **overrides)
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise UserError("--" + field.replace("_", "-"), message) from None
    _out_dir(out, overwrite, ("explanation.json",))
    x = torch.from_numpy(load_image(image, gen.image_spec.size))[None, None].to(dev)
    t = gen.generate(x)[0]
    before = label_report(t)
    e = parse_edit(edit, before)
    t_new = edit_text(t, e)
    x_new = manip.manipulate(x, [t_new], [t], gen=gen)
    t_regen = gen.generate(x_new)[0]
    x_np, x_new_np = x[0, 0].cpu().numpy(), x_new[0, 0].cpu().numpy()  # the files are written from the CPU
    delta = x_new_np - x_np
    scale = max(1, 256 // gen.image_spec.size)
    save_png(out / "original.png", x_np, scale=scale)
    save_png(out / "manipulated.png", np.clip(x_new_np, 0, 1), scale=1)
    np.save(out / "manipulated.npy", x_new_np)  # float x', not rounded to 8 bits
    save_png(out / "cvlm_map.png", np.abs(delta), cmap="inferno", scale=scale)
    lim = float(np.abs(delta).max()) or 1.0
    save_png(out / "signed_change.png", delta, cmap="RdBu_r", scale=scale, limits=(-lim, lim))  # 0 = white
    # what G writes for the PNG as saved (8-bit, clipped): the file a reader would look at
    saved = torch.from_numpy(load_image(out / "manipulated.png", gen.image_spec.size))[None, None].to(dev)
    t_saved = gen.generate(saved)[0]
    target = e.apply(before).get(e.name)
    ok = label_report(t_regen).get(e.name) == target
    res = {"image": str(image), "generator": str(generator) if generator is not None else str(model / "generator.pt"),
           "edit": e.describe(), "report": t, "edited_report": t_new, "regenerated_report": t_regen,
           "cycle_success": ok, "report_of_saved_png": t_saved,
           "cycle_success_saved_png": label_report(t_saved).get(e.name) == target,
           "mean_abs_delta": float(np.abs(delta).mean()), "refine_steps": manip.cfg.refine_steps,
           "refine_init": manip.cfg.refine_init, "device": str(dev)}  # fmt: skip
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
    images: Path = typer.Option(None, "--images", help="image root if not beside the reports (e.g. MIMIC-CXR-JPG's "
                                "files/ tree for MIMIC-CXR's report tree)"),
    size: int = typer.Option(64, "--size"),
    all_views: bool = typer.Option(False, "--all-views", help="keep lateral views too (default: frontal only "
                                   "where a metadata file names the views)"),
) -> None:
    """Validate a real image/report folder: every image readable, every report labelled."""
    from collections import Counter

    from .data import load_image, load_studies
    from .report_text import label_report

    studies = load_studies(source, images, frontal_only=not all_views)
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
