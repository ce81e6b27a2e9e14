"""Procedural chest X-ray phantoms with ground-truth findings and pixel masks.

No paired chest X-ray data can be downloaded here, so the default data are phantoms: a thorax,
two lungs (shapes taken from the real lung segmentation masks that ``torchxrayvision`` ships as a
data file, read by path without importing that package), heart, mediastinum, ribs, lung markings
and noise, plus findings with known masks. Knowing the mask of every finding is what lets us
*measure* whether an explanation points at the right pixels.

Orientation follows the radiological convention: the patient's right is on the image's left
(columns ``< W/2``).
"""

from __future__ import annotations

import importlib.util
import io
import sys
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

FINDINGS: tuple[str, ...] = ("cardiomegaly", "effusion", "pneumothorax", "opacity", "nodule", "device")
SIDES = ("right", "left")
ZONES = ("upper", "mid", "lower")
SIZES = ("small", "large")
# Which attributes each finding carries (others are ``None``).
ATTRS: dict[str, tuple[str, ...]] = {
    "cardiomegaly": (),
    "effusion": ("side", "size"),
    "pneumothorax": ("side",),
    "opacity": ("side", "zone"),
    "nodule": ("side", "zone", "size"),
    "device": ("side",),
}
MARKER_NAME = "marker"  # the planted shortcut (not a finding, never reported)


@dataclass(frozen=True)
class Finding:
    """One present finding; attributes that do not apply to ``name`` are ``None``."""

    name: str
    side: str | None = None
    zone: str | None = None
    size: str | None = None

    def key(self) -> tuple[str, str | None, str | None, str | None]:
        return (self.name, self.side, self.zone, self.size)


Findings = dict[str, Finding]  # present findings by name; an absent finding is not a key


@dataclass
class Phantom:
    """An image in [0, 1] (H, W) float32, its present findings and a mask per finding."""

    image: np.ndarray
    findings: Findings
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool (H, W); includes "marker"
    lungs: np.ndarray | None = None


# ----------------------------------------------------------------------------------------------
# lung shapes


def xrv_data_dir() -> Path | None:
    """The ``torchxrayvision/data`` folder if the package is installed (found, not imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "data"
    return folder if folder.is_dir() else None


def _analytic_lungs(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    right = ((xx - 0.31) / 0.15) ** 2 + ((yy - 0.50) / 0.33) ** 2 < 1
    left = ((xx - 0.69) / 0.15) ** 2 + ((yy - 0.50) / 0.33) ** 2 < 1
    return (right | left) & (yy > 0.2)


@lru_cache(maxsize=4)
def lung_bank(size: int = 128) -> tuple[np.ndarray, ...]:
    """Binary lung masks (size x size) from the v7labs masks in torchxrayvision's data folder.

    Masks are kept when both lungs are present and the lung area is plausible; if the package or
    the file is absent an analytic two-ellipse shape is used and a one-line warning is printed.
    """
    folder = xrv_data_dir()
    path = folder / "semantic_masks_v7labs_lungs.zip" if folder else None
    masks: list[np.ndarray] = []
    cache = Path.home() / ".cache" / "cvlm" / f"lungs_{size}.npy"
    if path is not None and path.is_file() and cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        try:
            return tuple(np.load(cache))  # decoding ~500 images takes seconds; the cache takes ms
        except (OSError, ValueError):
            pass
    if path is not None and path.is_file():
        from PIL import Image

        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith("/"):
                    continue
                try:
                    img = Image.open(io.BytesIO(zf.read(name))).convert("L")
                except Exception:  # noqa: BLE001 - a broken member of a data file is skipped
                    continue
                m = np.asarray(img.resize((size, size), Image.NEAREST)) > 127
                half = size // 2
                area = m.mean()
                r_area, l_area = m[:, :half].mean() * 2, m[:, half:].mean() * 2
                if not (0.18 < area < 0.5 and r_area > 0.12 and l_area > 0.12):
                    continue
                rows = np.where(m.any(1))[0]
                if rows[0] < 0.04 * size or rows[-1] > 0.97 * size:
                    continue
                masks.append(m)
    if not masks:
        print("warning: torchxrayvision lung masks not found; using analytic lung shapes", file=sys.stderr)
        return (_analytic_lungs(size),)
    try:
        from .errors import atomic_write

        def _save(p: Path) -> None:
            with p.open("wb") as f:
                np.save(f, np.stack(masks))

        atomic_write(cache, _save)
    except OSError:
        pass  # a read-only home only costs the decoding time again
    return tuple(masks)


# ----------------------------------------------------------------------------------------------
# small numpy helpers


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square (no scipy needed)."""
    if r <= 0:
        return mask.copy()
    p = np.pad(mask, r)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ~dilate(~mask, r)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly."""
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.standard_normal((gh, gw))
    ys = np.linspace(0, gh - 2, h)
    xs = np.linspace(0, gw - 2, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx


def _side_mask(lungs: np.ndarray, side: str) -> np.ndarray:
    half = lungs.shape[1] // 2
    m = np.zeros_like(lungs)
    if side == "right":
        m[:, :half] = lungs[:, :half]
    else:
        m[:, half:] = lungs[:, half:]
    return m


def _zone_rows(side_mask: np.ndarray, zone: str) -> tuple[int, int]:
    rows = np.where(side_mask.any(1))[0]
    r0, r1 = int(rows[0]), int(rows[-1])
    third = (r1 - r0) / 3
    i = ZONES.index(zone)
    return int(r0 + i * third), int(r0 + (i + 1) * third)


def _pick_point(rng: np.random.Generator, region: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(region)
    i = rng.integers(len(ys))
    return int(ys[i]), int(xs[i])


# ----------------------------------------------------------------------------------------------
# sampling and rendering


def sample_findings(rng: np.random.Generator, p: float = 0.3) -> Findings:
    """Each finding independently present with probability ``p``, with random attributes."""
    out: Findings = {}
    for name in FINDINGS:
        if rng.random() < p:
            out[name] = random_finding(rng, name)
    return out


def random_finding(rng: np.random.Generator, name: str) -> Finding:
    attrs = ATTRS[name]
    return Finding(
        name,
        side=str(rng.choice(SIDES)) if "side" in attrs else None,
        zone=str(rng.choice(ZONES)) if "zone" in attrs else None,
        size=str(rng.choice(SIZES)) if "size" in attrs else None,
    )


def render(
    findings: Findings,
    seed: int,
    size: int = 128,
    marker: bool | str = False,
    noise: float = 0.02,
) -> Phantom:
    """Render a phantom with the given findings; the same ``seed`` gives the same anatomy.

    Because anatomy depends on ``seed`` only, ``render(f1, s)`` and ``render(f2, s)`` differ
    exactly in the findings, which the tests use as a counterfactual pair.

    ``marker``: False, True / "corner" (a hollow square in the top-left corner) or "random" (the
    same square at a position drawn from ``seed`` alone, at least 10 % of the side away from the
    frame and off the heart even when enlarged, so that it is neither a frame artefact nor part
    of the finding).
    """
    rng = np.random.default_rng(seed)
    h = w = size
    s = size / 128.0
    bank = lung_bank(size)
    lungs = bank[int(rng.integers(len(bank)))]
    dy, dx = rng.integers(-3, 4, size=2) * s
    lungs = np.roll(lungs, (int(dy), int(dx)), axis=(0, 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # body, mediastinum, lungs with vascular markings, ribs. The body outline, the mediastinum and
    # the heart vary between patients: with one fixed outline, any change there was something the
    # generator had never seen, and a manipulator could move the generator by editing the frame
    # of the body instead of a finding.
    shape = rng.uniform(-1, 1, size=8)
    bx, by = w / 2 + 0.02 * w * shape[0], 0.58 * h * (1 + 0.04 * shape[1])
    brx, bry = 0.47 * w * (1 + 0.05 * shape[2]), 0.62 * h * (1 + 0.05 * shape[3])
    body = ((xx - bx) / brx) ** 2 + ((yy - by) / bry) ** 2 < 1
    img = np.where(body, 0.42 * (1 + 0.08 * shape[4]), 0.05 + 0.02 * shape[5]).astype(np.float32)
    img += 0.05 * _smooth_noise(rng, h, w, max(4, int(24 * s))).astype(np.float32) * body
    medi = (np.abs(xx - w / 2 - dx) < 0.09 * w * (1 + 0.2 * shape[6])) & body
    img[medi] = 0.55 * (1 + 0.05 * shape[7])
    texture = 0.035 * _smooth_noise(rng, h, w, max(2, int(4 * s)))
    lung_val = 0.14 + texture
    img = np.where(lungs, lung_val, img).astype(np.float32)
    rib_phase = rng.uniform(0, 1)
    ribs = np.zeros((h, w), bool)
    for i in range(9):
        y0 = (0.12 + 0.085 * (i + rib_phase)) * h
        curve = y0 + 0.9 * ((xx - w / 2) / w) ** 2 * h * 0.5 - 0.08 * np.abs(xx - w / 2)
        ribs |= np.abs(yy - curve) < 1.6 * s
    img[ribs & lungs] += 0.07

    # heart
    hy, hx = 0.66 * h + dy, 0.54 * w + dx
    ry, rx = 0.12 * h * (1 + 0.06 * shape[3]), 0.15 * w * (1 + 0.06 * shape[2])  # scales with the body
    masks: dict[str, np.ndarray] = {}
    if "cardiomegaly" in findings:
        ry, rx = ry * 1.3, rx * 1.45
    heart = (((xx - hx) / rx) ** 2 + ((yy - hy) / ry) ** 2 < 1) & body
    img[heart] = 0.52 + 0.02 * rng.standard_normal()
    lungs_vis = lungs & ~heart
    if "cardiomegaly" in findings:
        masks["cardiomegaly"] = heart.copy()

    for name in FINDINGS[1:]:
        if name not in findings:
            continue
        f = findings[name]
        if name == "device":
            continue  # drawn last, on top of everything
        side = _side_mask(lungs_vis, f.side or "right")
        rows = np.where(side.any(1))[0]
        r0, r1 = int(rows[0]), int(rows[-1])
        lateral = (xx / w) if f.side == "left" else (1 - xx / w)  # 1 at the lateral edge
        if name == "effusion":
            frac = 0.22 if f.size == "small" else 0.45
            level = r1 - frac * (r1 - r0) - 0.25 * h * np.clip(lateral - 0.6, 0, None)
            region = side & (yy > level)
            img[region] = 0.5 + 0.02 * rng.standard_normal(region.sum())
            masks[name] = region
        elif name == "pneumothorax":
            top = r0 + 0.6 * (r1 - r0)
            cols = np.where(side.any(0))[0]
            c0, c1 = int(cols[0]), int(cols[-1])
            width = 0.4 * (c1 - c0) * np.clip((top - yy) / (top - r0 + 1e-6), 0, 1) ** 0.5
            edge = (c0 + width) if f.side == "right" else (c1 - width)
            region = side & (yy < top) & ((xx < edge) if f.side == "right" else (xx > edge))
            img[region] = 0.03 + (img[region] - lung_val[region]) * 0.5  # keep ribs, lose markings
            line = side & (yy < top) & (np.abs(xx - edge) < 1.0 * s) & ~region
            img[line] += 0.18
            masks[name] = region | line
        elif name == "opacity":
            z0, z1 = _zone_rows(side, f.zone or "mid")
            cy, cx = _pick_point(rng, _zone_region(side, z0, z1, int(4 * s)))
            blob = np.zeros((h, w), np.float32)
            for _ in range(4):
                oy, ox = rng.normal(0, 4 * s, 2)
                sig = rng.uniform(4.5, 7) * s
                blob += np.exp(-((yy - cy - oy) ** 2 + (xx - cx - ox) ** 2) / (2 * sig**2))
            blob = np.clip(blob / blob.max(), 0, 1) * lungs_vis
            patchy = 1 + 0.3 * _smooth_noise(rng, h, w, max(2, int(3 * s)))
            img += (0.3 * blob * patchy).astype(np.float32)
            masks[name] = blob > 0.3
        elif name == "nodule":
            r = max(2.5 * s, 1.8) if f.size == "small" else max(5.0 * s, 3.5)
            z0, z1 = _zone_rows(side, f.zone or "mid")
            cy, cx = _pick_point(rng, _zone_region(side, z0, z1, int(r + 1)))
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            img += (0.33 * np.exp(-d2 / (2 * (0.6 * r) ** 2)) * (d2 < (1.6 * r) ** 2)).astype(np.float32)
            masks[name] = d2 <= (r + 1) ** 2
    if "device" in findings:
        f = findings["device"]
        sign = -1 if f.side == "right" else 1
        pts = np.array(
            [
                [0.02 * h, w / 2 + sign * 0.22 * w],
                [0.18 * h, w / 2 + sign * 0.12 * w],
                [0.35 * h, w / 2 + sign * 0.03 * w],
                [0.52 * h + dy, w / 2 + dx],
            ]
        )
        dist = np.full((h, w), np.inf, np.float32)
        for (ya, xa), (yb, xb) in zip(pts[:-1], pts[1:], strict=True):  # distance to each segment
            vy, vx = yb - ya, xb - xa
            t = np.clip(((yy - ya) * vy + (xx - xa) * vx) / (vy * vy + vx * vx), 0, 1)
            dist = np.minimum(dist, np.hypot(yy - ya - t * vy, xx - xa - t * vx))
        line = dist <= max(1.0 * s, 0.75)
        img[line] = 0.9
        masks["device"] = dilate(line, 1)
    if marker:
        m = np.zeros((h, w), bool)
        a, b = int(3 * s), int(11 * s)
        y0 = x0 = 0
        if marker == "random":
            big = ((xx - hx) / (rx * 1.6)) ** 2 + ((yy - hy) / (ry * 1.4)) ** 2 < 1.2  # the heart as if enlarged
            mrng = np.random.default_rng([seed, 11])
            lo, hi = int(0.1 * size), int(0.9 * size) - b
            for _ in range(100):
                y0, x0 = (int(v) - a for v in mrng.integers(lo, hi, size=2))
                if not big[y0 + a : y0 + b, x0 + a : x0 + b].any():
                    break
        m[y0 + a : y0 + b, x0 + a : x0 + b] = True
        m[y0 + a + int(2 * s) : y0 + b - int(2 * s), x0 + a + int(2 * s) : x0 + b - int(2 * s)] = False  # hollow
        img[m] = 0.95
        masks[MARKER_NAME] = m
    gain = rng.uniform(0.93, 1.07)
    img = img * gain + noise * rng.standard_normal((h, w)).astype(np.float32)
    return Phantom(np.clip(img, 0, 1).astype(np.float32), dict(findings), masks, lungs)


def _zone_region(side: np.ndarray, z0: int, z1: int, margin: int) -> np.ndarray:
    """Rows z0..z1 of the (eroded) lung side; falls back to less strict regions if empty."""
    for cand in (erode(side, margin), side):
        region = cand.copy()
        region[:z0] = False
        region[z1:] = False
        if region.any():
            return region
    return side


def make_dataset(
    n: int,
    seed: int,
    size: int = 128,
    p: float = 0.3,
    shortcut: str | None = None,
    shortcut_rate: float = 1.0,
    marker: str = "corner",
) -> list[Phantom]:
    """``n`` phantoms with seeds ``seed*1_000_003 + i`` (disjoint streams for train/test seeds).

    With ``shortcut=NAME`` the planted marker appears with probability ``shortcut_rate`` when the
    finding NAME is present (and ``1 - shortcut_rate`` when it is absent), placed as ``marker``
    says ("corner" or "random", see ``render``).
    """
    out = []
    for i in range(n):
        s = seed * 1_000_003 + i
        rng = np.random.default_rng([s, 7])
        f = sample_findings(rng, p)
        has = False
        if shortcut is not None:
            has = bool(rng.random() < (shortcut_rate if shortcut in f else 1 - shortcut_rate))
        out.append(render(f, s, size=size, marker=marker if has else False))
    return out
