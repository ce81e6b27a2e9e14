"""Every model and tensor of the cvlm pipeline follows the chosen device.

``MTLORA_TEST_DEVICE`` (default cpu) is the device the end-to-end test trains and evaluates on:
the device check runs it with ``MTLORA_TEST_DEVICE=cuda``, where a tensor left on the CPU makes
torch raise. On a CPU-only machine the ``meta`` device stands in for a second one: it computes
nothing but raises on the same mixing, and a result built on the CPU shows as a CPU device.
"""

import os

import numpy as np
import pytest
import torch

import cvlm.errors
import mtlora.errors
import mtlora.models
from cvlm.devices import DEVICES, device_of, resolve_device
from cvlm.evaluate import evaluate_edits, evaluate_shortcut, explain_cases, localisation_cases
from cvlm.explain import baseline_maps, cvlm_map
from cvlm.generator import CXRReportGenerator, GeneratorConfig, augment, freeze, report_nll
from cvlm.manipulator import Manipulator, ManipulatorConfig, manipulator_losses
from cvlm.phantoms import make_dataset
from cvlm.report_text import Tokenizer
from cvlm.train import generator_reports, images_tensor, train_generator, train_manipulator

DEVICE = os.environ.get("MTLORA_TEST_DEVICE", "cpu")
SIZE = 32
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0, d_model=32):
    torch.manual_seed(seed)
    gen = CXRReportGenerator(Tokenizer(), GeneratorConfig(d_model=d_model, n_layers=1, n_heads=2, channels=(8, 16),
                                                          image_size=SIZE))  # fmt: skip
    return gen, Manipulator(ManipulatorConfig(channels=(8, 16, 16), d_text=16, refine_steps=2))


def says(gen, report: str) -> None:
    """Make ``gen`` report ``report`` for every image, after generating on the images' device."""
    real = gen.generate

    def generate(images, batch_size=128):
        assert images.device == device_of(gen), "an image batch was built on another device"
        real(images, batch_size)
        return [report] * images.shape[0]

    gen.generate = generate


def test_resolve_device_is_shared_with_mtlora():
    assert mtlora.models.DEVICES is DEVICES and mtlora.models._resolve_device is resolve_device  # one function
    assert resolve_device("cpu") == mtlora.models.resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else resolve_device("auto").type)
    with pytest.raises(cvlm.errors.UserError, match=r"^--device: expected one of \['auto'"):
        resolve_device("tpu", where="--device")
    with pytest.raises(mtlora.errors.UserError, match="^device: expected one of"):
        mtlora.models.resolve_device("tpu")
    assert mtlora.errors.UserError is cvlm.errors.UserError  # one class: both command lines catch it


@no_cuda
def test_cuda_without_cuda_names_the_option():
    with pytest.raises(cvlm.errors.UserError) as e:
        resolve_device("cuda", where="--device")
    assert str(e.value).startswith("--device: cuda requested but this machine has no CUDA device")
    assert str(e.value).endswith("use --device cpu or auto") and "\n" not in str(e.value)
    with pytest.raises(mtlora.errors.UserError, match="use device=cpu or auto$"):
        mtlora.models.resolve_device("cuda:0")


def test_every_differentiable_piece_stays_on_the_meta_device():
    """The generator's losses, M, the refinement and the three baselines on ``meta`` tensors: a
    tensor made on the CPU inside them (a ``torch.zeros`` without ``device``) raises, or shows in a
    result's device. Generation and the training loops read values, which meta has not."""
    gen, manip = tiny()
    gen, manip = freeze(gen.to("meta")), manip.to("meta")
    assert device_of(gen) == device_of(manip) == torch.device("meta")
    x = torch.empty(2, 1, SIZE, SIZE, device="meta")
    t = ["The heart is enlarged.", "No pneumothorax."]
    t_new = ["The heart size is normal.", "There is a small right pneumothorax."]
    assert augment(x, 0.05).device.type == "meta"
    assert report_nll(gen, x, t, margin=0.2).device.type == "meta"
    gen.train()
    tokens = gen.batch_tokens(t, x.device)
    assert tokens.device.type == "meta" and gen.loss(x, tokens, torch.zeros(2, 48, device="meta")).device.type == "meta"
    gen.eval()
    cond = manip.encode_reports(t_new, t)
    assert cond.device.type == "meta"
    # (M's training loss asks whether the batch has an edit, a value meta has not: the end-to-end
    # test below covers it, and here a CPU identity mask next to meta images must not raise)
    with pytest.raises(RuntimeError, match="meta tensors"):
        manipulator_losses(manip, gen, x, t_new, cond, torch.tensor([False, True]), {"common": 1.0})
    x_new, cmap = cvlm_map(manip, x, t_new, t, gen=gen)  # M, then two refinement steps through G
    assert x_new.device.type == cmap.device.type == "meta"
    assert cvlm_map(manip, x, t_new, t, gen=gen, init="zero")[0].device.type == "meta"
    for name, m in baseline_maps(gen, x, t, t_new).items():
        assert m.device.type == "meta" and m.shape == (2, SIZE, SIZE), name


def test_the_pipeline_trains_and_evaluates_on_the_test_device():
    """Both trainings, the edits with transfer, localisation and the shortcut test on DEVICE: the
    models stay there, the rows and maps come back as numpy."""
    device = resolve_device(DEVICE)
    data = make_dataset(24, 1, size=SIZE)
    gen, manip = tiny()
    gen, manip = gen.to(device), manip.to(device)
    gen2 = tiny(1, d_model=16)[0].to(device)
    assert images_tensor(data, device).device == device
    h = train_generator(gen, data, 3, 4, progress=False)
    train_generator(gen2, data, 2, 4, progress=False)
    assert h["steps"] == 3 and np.isfinite(h["final_loss"])
    freeze(gen), freeze(gen2)
    base = generator_reports(gen, data)
    hm = train_manipulator(manip, gen, data, 2, 4, base=base, weights={"common": 1.0}, progress=False)
    assert hm["steps"] == 2 and np.isfinite(hm["cycle"])
    assert {p.device for p in [*gen.parameters(), *gen2.parameters(), *manip.parameters()]} == {device}
    rows, examples = evaluate_edits(gen, manip, data[:6], 0, gen2=gen2, variants=("cvlm", "cvlm_m_alone"))
    assert len(rows["cvlm"]) == 6 and all(isinstance(r["l1"], float) for r in rows["cvlm"])
    assert all(isinstance(a, np.ndarray) for e in examples.values() for a in (e["x_new"], *e["maps"].values()))
    # a generator trained for 3 steps reports nothing: let it say "enlarged heart" (after its own
    # generation, on its device) so that localisation and the shortcut test have cases
    says(gen, "The heart is enlarged.")
    cases = localisation_cases(gen, data, 2)
    assert cases and {n for _, n in cases} == {"cardiomegaly"}
    maps = explain_cases(gen, manip, data, cases)
    assert all(isinstance(maps[m], np.ndarray) and maps[m].shape[0] == len(cases) for m in ("cvlm", "gradcam", "ig"))
    s_test = make_dataset(12, 4, size=SIZE, shortcut="cardiomegaly", shortcut_rate=1.0)
    sc = evaluate_shortcut(gen, manip, s_test, 4, SIZE, 2, ("cvlm", "occlusion"))
    assert sc["n_candidates"] > 0 and len(sc["removed"]) == min(2, sc["n_candidates"])
    # a checkpoint holds CPU tensors whatever the device, and loads onto the device asked for
    state = gen.state()
    assert {v.device.type for v in state["weights"].values()} == {"cpu"}
    assert device_of(CXRReportGenerator.from_state(state, device)) == device
    assert device_of(Manipulator.from_state(manip.state(), device)) == device
