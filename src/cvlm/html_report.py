"""The demo's HTML page (``report.html``) and its Markdown summary (``results.md``).

Per example: the original and edited report with the changed sentence highlighted, what G and
the unseen generator G2 write for x' (with hit / miss marks), and one matplotlib figure per
example: the X-ray, x', the signed difference x' - x, and every method's map overlaid on the
X-ray with the true mask's contour, all maps on one shared scale (each map divided by its own
maximum) with one colour bar. Images are PNGs embedded as base64, so the page is one file.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from .errors import atomic_write, atomic_write_text
from .report_text import split_sentences

_METHOD_NAMES = {"cvlm": "CVLM", "cvlm_m_alone": "M alone", "cvlm_from_zero": "CVLM from zero", "gradcam": "Grad-CAM",
                 "ig": "integrated gradients", "occlusion": "occlusion"}  # fmt: skip


def png_b64(arr: np.ndarray, cmap: str | None = None, scale: int = 2, limits: tuple[float, float] | None = None) -> str:
    """A 2-D array as a base64 PNG (grey in [0, 1], or a colour map over ``limits``, by default
    the array's minimum and maximum)."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if cmap is None:
        img = Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8), mode="L")
    else:
        import matplotlib

        lo, hi = limits or (float(a.min()), float(a.max()))
        a = np.clip((a - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(a)
        img = Image.fromarray((matplotlib.colormaps[cmap](a)[..., :3] * 255).astype(np.uint8), mode="RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def save_png(path: Path, arr: np.ndarray, cmap: str | None = None, scale: int = 1,
             limits: tuple[float, float] | None = None) -> None:  # fmt: skip
    atomic_write(path, lambda p: p.write_bytes(base64.b64decode(png_b64(arr, cmap, scale, limits))))


def example_figure(ex: dict, methods: list[str]) -> str:
    """One example as a base64 PNG: X-ray, x', signed change, then each map over the X-ray."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 3 + len(methods)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.9 * n + 0.5, 2.3), gridspec_kw={"width_ratios": [1] * n + [0.07]})
    img, x_new = ex["image"], ex["x_new"]
    diff = x_new - img
    lim = float(np.abs(diff).max()) or 1.0
    mask = ex.get("mask")
    panels = [("X-ray x", img, "gray", (0, 1)), ("x'", x_new, "gray", (0, 1)),
              (f"x' - x (±{lim:.2f})", diff, "RdBu_r", (-lim, lim))]  # fmt: skip
    for ax, (title, a, cmap, (lo, hi)) in zip(axes, panels, strict=False):
        ax.imshow(a, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=8)
    im = None
    for ax, m in zip(axes[3:n], methods, strict=True):
        a = np.asarray(ex["maps"][m], dtype=np.float32)
        top = float(a.max())
        a = a / top if top > 0 else a
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        im = ax.imshow(a, cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="nearest")
        ax.set_title(_METHOD_NAMES.get(m, m), fontsize=8)
    for ax in axes[:n]:
        if mask is not None and np.asarray(mask).any():
            ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        cb = fig.colorbar(im, cax=axes[n])
        cb.set_label("map / its max", fontsize=7)
        cb.ax.tick_params(labelsize=6)
    fig.tight_layout(pad=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _highlight(text: str, other: str) -> str:
    """``text`` with the sentences that ``other`` does not have marked."""
    have = set(split_sentences(other))
    return " ".join(html.escape(s) if s in have else f"<mark>{html.escape(s)}</mark>" for s in split_sentences(text))


def _mark(ok) -> str:
    if ok is None:
        return "<span class=na>(not scored: G2 disagreed with G at x)</span>"
    return "<span class=met>&#10003; states the edit</span>" if ok else "<span class=miss>&#10007; does not</span>"


def fmt(v, digits: int = 2) -> str:
    """Numbers rounded, booleans as met / missed, NaN as n/a."""
    if isinstance(v, bool):
        return "met" if v else "missed"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.{digits}f}"
    return html.escape(str(v))


def fig_ci(f: dict) -> str:
    """"0.71 [0.62, 0.80]" for a figure with its interval."""
    ci = f.get("ci95")
    return fmt(f["value"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def write_html(path: Path, metrics: dict, examples: dict) -> None:
    """Write the self-contained HTML page."""
    run = metrics.get("run", {})
    methods = list(metrics["localisation"]["methods"])
    p = ["<!doctype html><meta charset=utf-8><title>CVLM demo</title><style>",
         "body{font-family:sans-serif;max-width:1250px;margin:auto;padding:0 10px} table{border-collapse:collapse}",
         "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:left} .miss{color:#b00;font-weight:bold}",
         ".met{color:#070;font-weight:bold} .na{color:#777} mark{background:#ffe27a} .ex{margin:14px 0;"
         "border-top:1px solid #ddd;padding-top:8px} .ex p{margin:3px 0;font-size:13px} img{max-width:100%}",
         "pre{white-space:pre-wrap;font-size:12px}</style>",
         "<h1>CVLM on chest X-ray phantoms</h1>",
         f"<p>Commit <code>{fmt(run.get('commit', '?'))}</code>, seeds {fmt(metrics['seeds'])}, "
         f"{fmt(run.get('date', '?'))}, torch {fmt(run.get('torch', '?'))}. The manipulator edits the image so "
         "that the frozen generator G writes the edited report; the map is |x' - x|. Baselines explain the same "
         "contrastive score log p(t|x) - log p(t'|x) of the same G. G2 is a second generator (other seed and "
         "width) that neither the manipulator nor the refinement saw. Numbers are on held-out phantoms, with "
         "95 % intervals (bootstrap over seeds, then cases) in brackets.</p>",
         "<h2>Targets</h2><table><tr><th>metric</th><th>value [95 % interval]</th><th>target</th><th>point value</th>"
         "<th>whole interval</th></tr>"]  # fmt: skip
    for k, t in metrics["targets"].items():
        p.append(f"<tr><td>{k}</td><td>{fig_ci(t)}</td><td>{t['target']}</td>"
                 f"<td class={'met' if t['met'] else 'miss'}>{fmt(t['met'])}</td>"
                 f"<td class={'met' if t['met_at_interval'] else 'miss'}>{fmt(t['met_at_interval'])}</td></tr>")  # fmt: skip
    loc = metrics["localisation"]
    p.append(f"</table><h2>Localisation: 'remove a present finding' ({loc['n_cases']} cases: "
             + ", ".join(f"{k} {v}" for k, v in loc["n_by_finding"].items()) + ")</h2>"
             "<p>Pointing game: the map's maximum (all tied maxima) within 2 px of the true mask.</p>"
             "<table><tr><th>method</th><th>pointing game</th><th>top-k IoU</th><th>pixel AUROC</th>"
             "<th>pointing by finding</th></tr>")  # fmt: skip
    for m, r in loc["methods"].items():
        by = ", ".join(f"{n} {fmt(v)}" for n, v in r["pointing_by_finding"].items())
        p.append(f"<tr><td>{_METHOD_NAMES.get(m, m)}</td><td>{fig_ci(r['pointing'])}</td><td>{fig_ci(r['iou'])}</td>"
                 f"<td>{fig_ci(r['auroc'])}</td><td>{by}</td></tr>")  # fmt: skip
    p.append("</table><h2>Edits of G's own report (one random edit per test phantom)</h2><table><tr><th>variant</th>"
             "<th>n</th><th>cycle success (G)</th><th>collateral (G)</th><th>transfer success (G2)</th>"
             "<th>collateral (G2)</th><th>mean |x' - x|</th></tr>")  # fmt: skip
    na = {"value": float("nan")}
    for v, e in metrics["edits"].items():
        p.append(f"<tr><td>{_METHOD_NAMES.get(v, v)}</td><td>{e['n']}</td><td>{fig_ci(e['cycle_success'])}</td>"
                 f"<td>{fig_ci(e['collateral_change'])}</td><td>{fig_ci(e.get('transfer_success', na))} "
                 f"(n={e.get('n_transfer', 0)})</td><td>{fig_ci(e.get('g2_collateral_change', na))}</td>"
                 f"<td>{fig_ci(e['mean_abs_delta'])}</td></tr>")  # fmt: skip
    p.append("</table><p>By kind (CVLM): " + ", ".join(
        f"{k} {fmt(v['cycle_success'])} / G2 {fmt(v['transfer_success'])} (n={v['n']})"
        for k, v in metrics["edits"]["cvlm"]["by_kind"].items()) + "</p>")
    for key, title in (("shortcut", "Shortcut test"), ("negative_control", "Negative control: clean G on marker images")):
        s = metrics[key]
        p.append(f"<h2>{title}</h2><p>{s['n_cases']} cases ({s['n_reliant']} reliant: the finding disappears from the "
                 f"report when the marker is taken away, same anatomy). The generator reports the finding on "
                 f"{fmt(s['reports_finding_without_marker'])} of them without the marker and on "
                 f"{fmt(s['reports_finding_with_marker_only'])} with the marker but without the finding; 'remove' "
                 f"succeeds on {fmt(s['cycle_success'])}.</p><table><tr><th>method</th><th>on marker (reliant)</th>"
                 "<th>on marker (all)</th><th>on heart (not reliant)</th></tr>")  # fmt: skip
        for m in methods:
            p.append(f"<tr><td>{_METHOD_NAMES.get(m, m)}</td><td>{fig_ci(s['on_marker_reliant'][m])}</td>"
                     f"<td>{fig_ci(s['on_marker'][m])}</td><td>{fig_ci(s['on_finding_not_reliant'][m])}</td></tr>")
        p.append("</table>")
    shown = [m for m in ("cvlm", "cvlm_m_alone", "gradcam", "ig", "occlusion") if m in methods]
    p.append(f"<h2>Examples of every edit kind (seed {fmt(metrics['seeds'][0])})</h2><p>Green contour: the true "
             "mask of the edited finding (none for an added finding).</p>")
    for kind, ex in examples.get("edits", {}).items():
        ex_maps = [m for m in ("cvlm", "gradcam", "ig", "occlusion") if m in ex["maps"]]
        p.append(f"<div class=ex><p><b>{kind}</b>: {html.escape(ex['edit'])}</p>"
                 f"<p>original report t: {_highlight(ex['t'], ex['t_new'])}</p>"
                 f"<p>edited report t': {_highlight(ex['t_new'], ex['t'])}</p>"
                 f"<p>G(x'): <i>{html.escape(ex['g'])}</i> {_mark(ex['success'])}</p>"
                 f"<p>G2(x'): <i>{html.escape(ex['g2'] or '')}</i> {_mark(ex['transfer'])}</p>"
                 f"<img src='data:image/png;base64,{example_figure(ex, ex_maps)}'></div>")  # fmt: skip
    for key, title in (("localisation", "Localisation examples ('remove', one per finding)"),
                       ("shortcut", "Shortcut generator: 'remove cardiomegaly' (contour: the planted marker)")):
        p.append(f"<h2>{title}</h2>")
        for ex in examples.get(key, []):
            extra = f" ({'reliant' if ex['reliant'] else 'not reliant'} on the marker)" if "reliant" in ex else ""
            p.append(f"<div class=ex><p><b>remove {html.escape(ex['finding'])}</b>{extra}</p>"
                     f"<p>t: {_highlight(ex['t'], ex['t_new'])}</p><p>t': {_highlight(ex['t_new'], ex['t'])}</p>"
                     f"<img src='data:image/png;base64,{example_figure(ex, shown)}'></div>")  # fmt: skip
    p.append("<h2>Run</h2><pre>" + html.escape(
        "\n".join(f"{k}: {v}" for k, v in run.items()) + "\nrefinement chosen on validation: "
        + json_short(metrics.get("tuning", {})) + "\nseconds per seed: "
        + json_short({k: {a: round(b) for a, b in v.items()} for k, v in metrics.get("seconds", {}).items()})) + "</pre>")
    atomic_write_text(path, "\n".join(p))


def json_short(obj) -> str:
    import json

    return json.dumps(obj, default=str)


def results_markdown(metrics: dict, command: str = "cvlm demo") -> str:
    """The headline numbers as Markdown (for docs/results and the README)."""
    def ci(f):
        c = f.get("ci95")
        return f"{f['value']:.3f} [{c[0]:.3f}, {c[1]:.3f}]" if c else f"{f['value']:.3f}"

    run = metrics.get("run", {})
    lines = [f"Command: `{command}`; commit {run.get('commit', '?')}, seeds {metrics['seeds']}, {run.get('date', '?')}.",
             "", "| target | value [95 % interval] | target | point value | whole interval |", "|---|---|---|---|---|"]
    for k, t in metrics["targets"].items():
        lines.append(f"| {k} | {ci(t)} | {t['target']} | {'met' if t['met'] else 'missed'} | "
                     f"{'met' if t['met_at_interval'] else 'missed'} |")  # fmt: skip
    loc, sc, neg = metrics["localisation"], metrics["shortcut"], metrics["negative_control"]
    lines += ["", f"Localisation ({loc['n_cases']} cases) and shortcut ({sc['n_cases']} cases, {sc['n_reliant']} reliant):",
              "", "| method | pointing game | top-k IoU | pixel AUROC | on marker, reliant | on marker, negative control |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for m, r in loc["methods"].items():
        lines.append(f"| {m} | {ci(r['pointing'])} | {ci(r['iou'])} | {ci(r['auroc'])} | "
                     f"{ci(sc['on_marker_reliant'][m])} | {ci(neg['on_marker'][m])} |")  # fmt: skip
    lines += ["", "| edits by | n | cycle success | collateral | transfer success (G2) | G2 collateral |",
              "|---|---|---|---|---|---|"]
    na = {"value": float("nan")}
    for v, e in metrics["edits"].items():
        lines.append(f"| {v} | {e['n']} | {ci(e['cycle_success'])} | {ci(e['collateral_change'])} | "
                     f"{ci(e.get('transfer_success', na))} | {ci(e.get('g2_collateral_change', na))} |")
    lines.append("")
    lines.append("Refinement chosen on the validation split, per seed: " + ", ".join(
        f"{s}: tv {t['chosen']['tv']}, from {t['chosen']['init']}" for s, t in metrics.get("tuning", {}).items()) + ".")
    lines.append("Wall seconds per seed: " + ", ".join(
        f"{s}: {v['total']:.0f} (training {v['train']:.0f})" for s, v in metrics.get("seconds", {}).items()) + ".")
    return "\n".join(lines) + "\n"
