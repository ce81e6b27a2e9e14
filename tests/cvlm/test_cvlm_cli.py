"""CLI end to end on tiny sizes: quick demo, explain on its checkpoints, user errors, real-data loader."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from cvlm.cli import main
from cvlm.data import load_studies
from cvlm.errors import UserError

# the device the quick demo and explain run on (the device check: cuda); see test_cvlm_devices
DEVICE = os.environ.get("MTLORA_TEST_DEVICE", "cpu")


def run(argv, capsys):
    old = sys.argv
    sys.argv = ["cvlm", *argv]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """One quick two-seed demo for every test here that needs saved checkpoints."""
    out = tmp_path_factory.mktemp("demo")
    old = sys.argv
    sys.argv = ["cvlm", "demo", "--quick", "--out", str(out), "--no-progress", "--seeds", "0,1", "--device", DEVICE]
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        sys.argv = old
    return out


def test_quick_demo_writes_everything(demo_dir):
    m = json.loads((demo_dir / "metrics.json").read_text())
    assert m["seeds"] == [0, 1] and m["run"]["device"].split(":")[0] == DEVICE.split(":")[0]
    assert set(m["targets"]) == {"cycle_success", "collateral_change", "transfer_success",
                                 "pointing_margin_over_best_baseline", "shortcut_margin_over_best_baseline",
                                 "negative_control_on_marker"}
    for t in m["targets"].values():
        assert len(t["ci95"]) == 2 and isinstance(t["met"], bool)
    for method in ("cvlm", "cvlm_m_alone", "gradcam", "ig", "occlusion"):
        r = m["localisation"]["methods"][method]
        assert 0 <= r["pointing"]["value"] <= 1 and len(r["pointing"]["per_seed"]) == 2
    assert "transfer_success" in m["edits"]["cvlm"] and "transfer_success" in m["edits"]["cvlm_m_alone"]
    html = (demo_dir / "report.html").read_text()
    assert "<img src='data:image/png;base64," in html and "pointing game" in html
    assert "met" in html and "G2(x')" in html and "<mark>" in html
    assert "| cycle_success |" in (demo_dir / "results.md").read_text()
    for seed in (0, 1):
        for name in ("generator", "manipulator", "generator2", "shortcut_generator", "shortcut_manipulator"):
            assert (demo_dir / f"seed_{seed}" / f"{name}.pt").stat().st_size > 0
    assert not list(demo_dir.rglob("*.tmp"))  # atomic writes leave no temp files


@pytest.mark.slow
def test_demo_resumes_finished_seeds(demo_dir, capsys):
    before = (demo_dir / "seed_0" / "cases.json").stat().st_mtime_ns
    code, _, err = run(["demo", "--quick", "--out", str(demo_dir), "--seeds", "0", "--resume", "--no-progress"], capsys)
    assert code == 0 and "already done" in err
    assert (demo_dir / "seed_0" / "cases.json").stat().st_mtime_ns == before  # reused, not rerun
    assert json.loads((demo_dir / "metrics.json").read_text())["seeds"] == [0]
    # restore the two-seed summary for the other tests
    assert run(["demo", "--quick", "--out", str(demo_dir), "--seeds", "0", "--seeds", "1", "--resume",
                "--no-progress"], capsys)[0] == 0


def test_demo_refuses_to_overwrite(demo_dir, capsys):
    code, _, err = run(["demo", "--quick", "--out", str(demo_dir)], capsys)
    assert code == 2 and err.startswith("error: ") and "--overwrite" in err and "Traceback" not in err


def test_phantom_data_check_and_explain(demo_dir, tmp_path, capsys):
    ph = tmp_path / "ph"
    assert run(["phantom", "--out", str(ph), "--n", "3", "--size", "32"], capsys)[0] == 0
    code, out, _ = run(["data-check", str(ph / "reports.csv")], capsys)
    assert code == 0 and out.startswith("3 studies")
    ex = tmp_path / "ex"
    # the tiny generator's report decides which edits apply ("add" needs the finding absent)
    for edit in ("add large left upper nodule", "remove nodule"):
        code, out, err = run(["explain", str(ph / "phantom_000.png"), "--edit", edit, "--model", str(demo_dir),
                              "--out", str(ex), "--overwrite", "--device", DEVICE], capsys)  # fmt: skip
        if code == 0:
            break
        assert code == 2 and err.startswith("error: --edit: cannot")
    assert code == 0, err
    res = json.loads((ex / "explanation.json").read_text())
    assert (ex / "cvlm_map.png").is_file() and res["edited_report"] != res["report"]
    assert res["refine_init"] in ("manipulator", "zero") and res["refine_steps"] > 0  # as saved
    assert res["device"].split(":")[0] == DEVICE.split(":")[0]
    x_new = np.load(ex / "manipulated.npy")
    assert x_new.shape == (32, 32) and x_new.dtype == np.float32
    assert res["cycle_success_saved_png"] in (True, False) and isinstance(res["report_of_saved_png"], str)
    code, _, err = run(["explain", str(ph / "phantom_000.png"), "--edit", edit, "--model", str(demo_dir),
                        "--out", str(ex), "--overwrite", "--refine-init", "random"], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error: --refine-init: expected one of zero, manipulator")
    code, _, err = run(["explain", str(ph / "phantom_000.png"), "--edit", edit, "--model", str(demo_dir),
                        "--out", str(ex), "--overwrite", "--refine-steps", "0"], capsys)  # fmt: skip
    assert code == 0 and json.loads((ex / "explanation.json").read_text())["refine_steps"] == 0
    code, _, err = run(["explain", str(ph / "phantom_000.png"), "--edit", edit, "--model", str(demo_dir),
                        "--out", str(ex), "--overwrite", "--refine-steps", "-1"], capsys)  # fmt: skip
    assert code == 2 and err.startswith("error: --refine-steps: expected a number >= 0") and err.count("\n") == 1


def test_user_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(["explain", str(tmp_path / "nope.png"), "--edit", "remove effusion", "--model", str(tmp_path)],
                       capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "generator.pt" in err
    bad = tmp_path / "x.pt"
    bad.write_text("not a checkpoint")
    (tmp_path / "m").mkdir()
    bad.rename(tmp_path / "m" / "generator.pt")
    code, _, err = run(["explain", "a.png", "--edit", "remove effusion", "--model", str(tmp_path / "m")], capsys)
    assert code == 2 and "expected a cvlm checkpoint" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_this_machine_lacks_is_one_line_before_any_work(tmp_path, capsys):
    out = tmp_path / "demo"
    code, _, err = run(["demo", "--quick", "--out", str(out), "--device", "cuda", "--no-progress"], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: --device: cuda requested but this machine has no CUDA device")
    assert not out.exists()  # refused before the output folder is made
    # explain checks the device before it reads the image or the checkpoints (neither exists here)
    code, _, err = run(["explain", str(tmp_path / "nope.png"), "--edit", "remove effusion", "--model",
                        str(tmp_path), "--device", "cuda:1"], capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --device: cuda:1 requested")
    code, _, err = run(["demo", "--quick", "--out", str(out), "--device", "tpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--device: expected one of ['auto', 'cpu', 'cuda'" in err


def test_real_data_loader_errors(tmp_path):
    from PIL import Image

    Image.fromarray((np.random.default_rng(0).random((20, 20)) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    csv = tmp_path / "r.csv"
    csv.write_text("image,report\na.png,No pneumothorax.\nmissing.png,Cardiomegaly.\n")
    with pytest.raises(UserError) as e:
        load_studies(csv)
    assert e.value.line == 3 and "missing.png" in e.value.message
    csv.write_text("image,report\na.png,No pneumothorax.\n")
    assert load_studies(csv)[0].report == "No pneumothorax."
    csv.write_text("img,text\na.png,x\n")
    with pytest.raises(UserError, match="expected columns"):
        load_studies(csv)
    from cvlm.data import load_image

    with pytest.raises(UserError, match="readable PNG"):
        load_image(tmp_path / "broken.png", 16)
    # IU X-ray layout: XML with parentImage ids naming PNGs
    iu = tmp_path / "iu"
    iu.mkdir()
    (iu / "1.xml").write_text(
        '<eCitation><Abstract><AbstractText Label="FINDINGS">Heart size is enlarged.</AbstractText>'
        '<AbstractText Label="IMPRESSION">No pneumothorax.</AbstractText></Abstract>'
        '<parentImage id="CXR1_1_IM-0001-3001"/></eCitation>'
    )
    with pytest.raises(UserError, match="CXR1_1_IM-0001-3001"):
        load_studies(iu)
    Image.open(tmp_path / "a.png").save(iu / "CXR1_1_IM-0001-3001.png")
    s = load_studies(iu)
    assert len(s) == 1 and s[0].report == "Heart size is enlarged. No pneumothorax."
    # MIMIC-CXR layout
    study = tmp_path / "mimic" / "files" / "p10" / "p10000032" / "s50414267"
    study.mkdir(parents=True)
    Image.open(tmp_path / "a.png").save(study / "img.jpg")
    (study.parent / "s50414267.txt").write_text("FINDINGS: Small left pleural effusion.\nIMPRESSION: Effusion.\n")
    s = load_studies(tmp_path / "mimic")
    assert len(s) == 1 and "Small left pleural effusion." in s[0].report


def test_iu_corpus_is_readable_when_shipped():
    from cvlm.data import iu_reports_from_xrv
    from cvlm.phantoms import xrv_data_dir

    if xrv_data_dir() is None:
        pytest.skip("torchxrayvision data files not installed")
    reports = [r for _, r in zip(range(200), iu_reports_from_xrv(), strict=False)]
    assert len(reports) == 200 and any("pneumothorax" in r.lower() for r in reports)


def test_explain_on_a_real_chest_xray_jpeg(demo_dir, tmp_path, capsys):
    from PIL import Image
    from test_cvlm_images import pneumonia_jpegs

    jpegs = pneumonia_jpegs()
    if not jpegs:
        pytest.skip("pneumonia-model-package not installed")
    demo = demo_dir
    out = tmp_path / "ex"
    for edit in ("add small right effusion", "remove effusion"):
        code, text, err = run(["explain", str(jpegs[0]), "--edit", edit, "--model", str(demo), "--out", str(out),
                               "--overwrite"], capsys)  # fmt: skip
        if code == 0:
            break
    assert code == 0, err
    res = json.loads((out / "explanation.json").read_text())
    assert res["image"] == str(jpegs[0]) and "effusion" in (res["edited_report"] + res["report"]).lower()
    x_new = np.load(out / "manipulated.npy")
    saved = np.asarray(Image.open(out / "manipulated.png"), dtype=np.float32) / 255
    assert x_new.shape == saved.shape == (32, 32)
    assert np.abs(np.clip(x_new, 0, 1) - saved).max() <= 0.5 / 255 + 1e-6  # the PNG is x' rounded to 8 bits
    assert "report_of_saved_png" in res and "report_of_saved_png:" in text
