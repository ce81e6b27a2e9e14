"""The Hugging Face adapter end to end on a tiny randomly initialised ViT + GPT-2 built here."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

SIZE = 32


def tiny_hf_model():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
        VisionEncoderDecoderModel,  # fmt: skip
        ViTConfig,
        ViTModel,
    )

    from cvlm.report_text import Tokenizer as Words

    vocab = {w: i for i, w in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *Words().itos[4:]])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
                                  unk_token="[UNK]")  # fmt: skip
    torch.manual_seed(0)
    enc = ViTModel(ViTConfig(image_size=SIZE, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64))  # fmt: skip
    dec = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                                     add_cross_attention=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))  # fmt: skip
    model = VisionEncoderDecoderModel(encoder=enc, decoder=dec)
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 1, 0, 2
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model, tok


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import ViTImageProcessor

    model, tok = tiny_hf_model()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4], image_std=[0.25]).save_pretrained(folder)
    return folder


def test_adapter_is_a_report_generator_with_hf_likelihood(hf_folder):
    from cvlm.generator import ReportGenerator
    from cvlm.hf import HFReportGenerator

    g = HFReportGenerator.from_pretrained(hf_folder, max_new_tokens=8)
    assert isinstance(g, ReportGenerator)
    assert (g.image_spec.size, g.image_spec.channels, g.image_spec.mean) == (SIZE, 1, (0.4,))
    x = torch.rand(2, 1, SIZE, SIZE, requires_grad=True)
    reports = ["No pneumothorax.", "There is a small right pleural effusion."]
    ll = g.report_log_likelihood(x, reports)
    assert ll.shape == (2,) and (ll < 0).all()
    # the adapter's sum equals the model's own labels loss (a mean over the label tokens) x tokens
    for k, r in enumerate(reports):
        labels = g._labels([r], "cpu")
        loss = g.model(pixel_values=g.pixel_values(x[k : k + 1]), labels=labels).loss
        assert torch.allclose(ll[k], -loss * (labels != -100).sum(), rtol=1e-4)
    ll.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable in the image
    out = g.generate(x.detach())
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_refinement_through_the_adapter_moves_the_image_toward_the_edit(hf_folder):
    from cvlm.generator import report_nll
    from cvlm.hf import HFReportGenerator
    from cvlm.manipulator import Manipulator, ManipulatorConfig

    g = HFReportGenerator.from_pretrained(hf_folder, max_new_tokens=8)
    m = Manipulator(ManipulatorConfig(channels=(8, 16, 16), d_text=16, refine_steps=15, refine_lr=0.02, refine_init="zero"))
    x = torch.rand(2, 1, SIZE, SIZE) * 0.5 + 0.25
    edited = ["The heart is enlarged."] * 2
    x_new = m.manipulate(x, edited, ["The heart is normal in size."] * 2, gen=g)
    assert (x_new >= 0).all() and (x_new <= 1).all()  # clipped inside the optimisation
    assert (report_nll(g, x_new, edited) < report_nll(g, x, edited)).all()
    assert all(p.grad is None for p in g.model.parameters())  # the model is never trained


def test_explain_cli_with_a_hf_generator_folder(hf_folder, tmp_path, capsys):
    import numpy as np
    from PIL import Image


    img = tmp_path / "x.png"
    Image.fromarray((np.random.default_rng(0).random((40, 30)) * 255).astype(np.uint8)).save(img)
    out = tmp_path / "ex"
    from test_cvlm_cli import DEVICE, run  # the suite's one way to run the cvlm CLI in-process

    code, _, err = run(["explain", str(img), "--edit", "add small right effusion", "--generator", str(hf_folder),
                        "--model", str(tmp_path / "no-manipulator"), "--refine-steps", "5", "--out", str(out),
                        "--device", DEVICE], capsys)  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "explanation.json").read_text())
    assert res["device"].split(":")[0] == DEVICE.split(":")[0]  # the HF model and the new M ran there
    assert res["generator"] == str(hf_folder) and res["refine_init"] == "zero"  # no M for this generator
    assert "effusion" in res["edited_report"].lower()
    x_new = np.load(out / "manipulated.npy")
    assert x_new.shape == (SIZE, SIZE) and (out / "manipulated.png").is_file()
    assert isinstance(res["report_of_saved_png"], str)
