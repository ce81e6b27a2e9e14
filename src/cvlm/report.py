"""The demo's HTML report: an image grid (original | manipulated | CVLM | Grad-CAM | IG |
occlusion | true mask) and the metrics tables; images are small PNGs embedded as base64 so the
report is one self-contained file (well under 1 MB)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from .errors import atomic_write_text
from .explain import BASELINES
from .phantoms import MARKER_NAME, Phantom

_COLUMNS = ("original", "manipulated", "cvlm", *BASELINES, "true mask")


def png_b64(arr: np.ndarray, cmap: str | None = None, scale: int = 2) -> str:
    """A 2-D array as a base64 PNG (grey in [0, 1], or a colour map after min-max scaling)."""
    from PIL import Image

    a = np.asarray(arr, dtype=np.float32)
    if cmap is None:
        rgb = (np.clip(a, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(rgb, mode="L")
    else:
        import matplotlib

        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        rgb = (matplotlib.colormaps[cmap](a)[..., :3] * 255).astype(np.uint8)
        img = Image.fromarray(rgb, mode="RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def save_png(path: Path, arr: np.ndarray, cmap: str | None = None, scale: int = 1) -> None:
    from .errors import atomic_write

    atomic_write(path, lambda p: p.write_bytes(base64.b64decode(png_b64(arr, cmap, scale))))


def _img(b64: str) -> str:
    return f'<img src="data:image/png;base64,{b64}">'


def _grid(title: str, phantoms: list[Phantom], cases: list[tuple[int, str]], maps: dict, idx: list[int],
          mask_name: str | None = None) -> str:  # fmt: skip
    rows = [f"<h2>{html.escape(title)}</h2><table class=grid><tr>" + "".join(f"<th>{c}</th>" for c in _COLUMNS) + "</tr>"]
    for k in idx:
        i, name = cases[k]
        p = phantoms[i]
        mask = p.masks[mask_name or name].astype(np.float32)
        cells = [png_b64(p.image), png_b64(maps["x_new"][k])]
        cells += [png_b64(maps[m][k], "inferno") for m in ("cvlm", *BASELINES)]
        cells.append(png_b64(mask))
        rows.append("<tr>" + "".join(f"<td>{_img(c)}</td>" for c in cells) + "</tr>")
        rows.append(f'<tr><td colspan={len(_COLUMNS)} class=cap>edit: remove {html.escape(name)}. '
                    f"G(x): <i>{html.escape(maps['t'][k])}</i><br>t': <i>{html.escape(maps['t_new'][k])}</i></td></tr>")  # fmt: skip
    rows.append("</table>")
    return "\n".join(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def write_html(path: Path, metrics: dict, test: list[Phantom], cases: list[tuple[int, str]], loc_maps: dict,
               s_test: list[Phantom], s_cases: list[tuple[int, str]], s_maps: dict, edit_rows: list[dict]) -> None:  # fmt: skip
    """Write the self-contained HTML report."""
    parts = ["<!doctype html><meta charset=utf-8><title>CVLM demo</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:auto} table{border-collapse:collapse}",
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px} .grid td{padding:1px}",
             ".cap{font-size:11px;color:#444} .miss{color:#b00} .met{color:#070}</style>",
             "<h1>CVLM on chest X-ray phantoms</h1>",
             "<p>Explaining a report generator by cyclic manipulation: the manipulator edits the image so that the "
             "frozen generator writes the edited report; the map is |x' - x|. Baselines explain the same contrastive "
             "score log p(t|x) - log p(t'|x) of the same generator. All numbers on held-out phantoms.</p>",
             "<h2>Targets</h2><table><tr><th>metric</th><th>value</th><th>target</th><th>met</th></tr>"]  # fmt: skip
    for k, t in metrics["targets"].items():
        cls = "met" if t["met"] else "miss"
        parts.append(f"<tr><td>{k}</td><td>{_fmt(t['value'])}</td><td>{t['target']}</td><td class={cls}>{t['met']}</td></tr>")
    parts.append("</table><h2>Localisation (edit: remove a present finding)</h2>")
    parts.append("<table><tr><th>method</th><th>pointing game</th><th>top-k IoU</th><th>pixel AUROC</th>"
                 "<th>pointing by finding</th></tr>")  # fmt: skip
    for m, r in metrics["localisation"]["methods"].items():
        by = ", ".join(f"{n} {v:.2f}" for n, v in r["pointing_by_finding"].items())
        parts.append(f"<tr><td>{m}</td><td>{_fmt(r['pointing_game'])}</td><td>{_fmt(r['iou'])}</td>"
                     f"<td>{_fmt(r['auroc'])}</td><td>{by}</td></tr>")  # fmt: skip
    e = metrics["edits"]
    parts.append(f"</table><h2>Edits (n={e['n']})</h2><p>cycle success {_fmt(e['cycle_success'])}, collateral change "
                 f"{_fmt(e['collateral_change'])}, mean |delta| {_fmt(e['mean_abs_delta'])}{_m_alone(metrics)}</p>"
                 "<table><tr><th>group</th><th>n</th><th>cycle success</th><th>collateral</th></tr>")  # fmt: skip
    for key in ("by_kind", "by_finding"):
        for g, r in e[key].items():
            parts.append(f"<tr><td>{g}</td><td>{r['n']}</td><td>{_fmt(r['cycle_success'])}</td>"
                         f"<td>{_fmt(r['collateral_change'])}</td></tr>")  # fmt: skip
    s = metrics["shortcut"]
    parts.append("</table><h2>Shortcut test</h2><p>A second generator G_s is trained on phantoms where a corner marker "
                 f"appears exactly when {s['finding']} is present. On held-out marker + {s['finding']} cases it reports "
                 f"{s['finding']} in {_fmt(s['reports_finding_without_marker'])} of the same cases re-rendered without "
                 f"the marker (same anatomy), and in {_fmt(s['reports_finding_with_marker_only'])} of them re-rendered "
                 f"with the marker but without the finding. A case is <i>reliant</i> when removing the marker makes G_s "
                 f"drop the finding ({s['n_reliant']} of {s['n_cases']} explained cases). The shortcut manipulator's "
                 f"edit 'remove {s['finding']}' succeeds (G_s(x') drops it) in {_fmt(s['cycle_success'])}. "
                 "Fraction of maps whose maximum lies on the marker:</p><table><tr><th>cases</th>"
                 + "".join(f"<th>{m}</th>" for m in s["on_marker"]) + "</tr><tr><td>reliant</td>"
                 + "".join(f"<td>{_fmt(v)}</td>" for v in s["on_marker_reliant"].values()) + "</tr><tr><td>all</td>"
                 + "".join(f"<td>{_fmt(v)}</td>" for v in s["on_marker"].values()) + "</tr><tr><td>on the heart (all)</td>"
                 + "".join(f"<td>{_fmt(v)}</td>" for v in s["on_finding"].values()) + "</tr></table>")  # fmt: skip
    # example grid: a few cases per finding, then shortcut cases
    seen: dict[str, int] = {}
    idx = []
    for k, (_, n) in enumerate(cases):
        if seen.get(n, 0) < 1:
            seen[n] = seen.get(n, 0) + 1
            idx.append(k)
    parts.append(_grid("Examples (held-out phantoms)", test, cases, loc_maps, idx))
    if s_cases:
        parts.append(_grid("Shortcut generator: remove " + s["finding"] + " (true mask = planted marker)", s_test,
                           s_cases, s_maps, list(range(min(3, len(s_cases)))), mask_name=MARKER_NAME))  # fmt: skip
    parts.append("<h2>Run</h2><pre>" + html.escape(
        "\n".join(f"{k}: {v}" for k, v in {**metrics["machine"], **metrics["seconds"]}.items())) + "</pre>")
    atomic_write_text(path, "\n".join(parts))


def _m_alone(metrics: dict) -> str:
    """The same edits by M alone (no per-image refinement), when measured."""
    m = metrics.get("edits_m_alone")
    if not m:
        return ""
    return (f" (M alone, without the refinement: cycle success {_fmt(m['cycle_success'])}, collateral change "
            f"{_fmt(m['collateral_change'])}, mean |delta| {_fmt(m['mean_abs_delta'])})")


def results_markdown(metrics: dict, command: str = "cvlm demo") -> str:
    """The headline numbers as a Markdown section (for docs/results and the README text)."""
    lines = [f"Command: `{command}`", "",
             "| metric | value | target | met |", "|---|---|---|---|"]  # fmt: skip
    for k, t in metrics["targets"].items():
        lines.append(f"| {k} | {t['value']:.3f} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "| method | pointing game | top-k IoU | pixel AUROC | on shortcut marker (reliant / all cases) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for m, r in metrics["localisation"]["methods"].items():
        lines.append(f"| {m} | {r['pointing_game']:.3f} | {r['iou']:.3f} | {r['auroc']:.3f} | "
                     f"{metrics['shortcut']['on_marker_reliant'][m]:.3f} / {metrics['shortcut']['on_marker'][m]:.3f} |")  # fmt: skip
    e = metrics["edits"]
    lines += ["", f"Edits: n={e['n']}, cycle success {e['cycle_success']:.3f}, collateral change "
              f"{e['collateral_change']:.3f}{_m_alone(metrics)}; by kind: "
              + ", ".join(f"{k} {v['cycle_success']:.2f} (n={v['n']})" for k, v in e["by_kind"].items())
              + "; by finding: "
              + ", ".join(f"{k} {v['cycle_success']:.2f}" for k, v in e["by_finding"].items()) + ".", ""]  # fmt: skip
    s = metrics["shortcut"]
    lines.append(f"Shortcut generator ({s['finding']} <-> corner marker), n={s['n_cases']} explained cases: it reports "
                 f"{s['finding']} on {_fmt(s['reports_finding_without_marker'])} of the same cases re-rendered without "
                 f"the marker and on {_fmt(s['reports_finding_with_marker_only'])} re-rendered with the marker but "
                 f"without the finding; {s['n_reliant']} of the {s['n_cases']} cases are reliant (the marker's removal "
                 f"flips the report); the shortcut manipulator's 'remove {s['finding']}' succeeds in "
                 f"{_fmt(s['cycle_success'])}.")  # fmt: skip
    lines.append("")
    lines.append("Generator accuracy (labelled state exactly right) on held-out phantoms: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in metrics["generator_accuracy"].items()) + ".")  # fmt: skip
    tr = metrics["training"]
    lines.append("\nTraining steps run (of at most): " + ", ".join(
        f"{k.replace('_', ' ')} {v['steps']}/{v.get('max_steps', v['steps'])} in {v['seconds']:.0f} s" for k, v in tr.items()) + ".")
    sec = metrics["seconds"]
    lines.append(f"\nWall time {sec['total']:.0f} s (training {sec['train']:.0f} s), process CPU "
                 f"{sec.get('process_cpu', float('nan')):.0f} s, {metrics['machine']['threads']} torch thread(s).")
    return "\n".join(lines) + "\n"
