"""Evaluator: lm-eval-exact log-likelihoods, shared prompt pass == per-choice reference, metrics, generation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mtlora.evaluate as ev
from mtlora.adapters.context import current_context
from mtlora.data.example import Example
from mtlora.evaluate import EvalReport, encode_pair, evaluate, normalize_answer, render_table, score_choices
from mtlora.testing import TINY_ARCHS, tiny_model, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: toy models want one thread


MC = [
    # choices of very different token lengths, one single-token choice
    Example("fox", "The quick brown fox", "jumps", ("jumps", "sat on the mat because it was tired", "z"), 0),
    Example("qa", "Question: Which gas do plants absorb? Answer:", "carbon dioxide",
            ("carbon dioxide", "no", "the cat sat on the mat"), 0),
    Example("fox", "", "yes", ("yes", "no"), 0),  # empty context -> prefix token
    Example("qa", "Is the sky blue? ", "yes", ("yes", "no", "true false positive"), 0),  # trailing space
    Example("fox", "Premise: The man turned on the faucet.", "Water flowed",
            ("Water flowed", "A", "B", "the dog"), 0, target_delimiter="\n"),
]


def reference_logliks(model, tok, examples, max_length=None):
    """Unbatched, unpadded, no cache: one full forward per (context, choice); lm-eval's definition."""
    out = []
    for ex in examples:
        row = []
        for choice in ex.choices:
            ctx, cont = encode_pair(tok, ex.prompt, ex.target_delimiter + choice)
            if max_length is not None:
                longest = max(len(encode_pair(tok, ex.prompt, ex.target_delimiter + c)[1]) for c in ex.choices)
                ctx = ctx[-(max_length + 1 - longest):]
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                lp = model(ids).logits.float().log_softmax(-1)[0]
            row.append(sum(lp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        out.append(row)
    return out


def assert_close(a, b, tol=1e-4):
    assert [len(r) for r in a] == [len(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for x, y in zip(ra, rb, strict=True):
            assert abs(x - y) < tol, (a, b)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shared_and_per_choice_match_unbatched_reference(arch):
    model, tok = tiny_model(arch)
    ref = reference_logliks(model, tok, MC)
    for batch_size in (1, 4):  # 4: a batch mixing prompt lengths (left padding) and choice counts
        for method in ev.METHODS:  # shared (packed, block mask), kv_cache, per_choice (naive)
            got = score_choices(model, tok, MC, method=method, batch_size=batch_size)
            assert_close(got, ref)
            assert all(v < 0 for row in got for v in row)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_shared_block_mask_also_under_eager_attention(arch):
    model, tok = tiny_model(arch)
    ref = reference_logliks(model, tok, MC)
    model.config._attn_implementation = "eager"  # the float block mask must mean the same to eager
    assert_close(score_choices(model, tok, MC, method="shared", batch_size=4), ref)


def test_encode_pair_follows_lm_eval():
    tok = tiny_tokenizer()
    ctx, cont = encode_pair(tok, "Is the sky blue? ", " yes")
    # trailing whitespace of the context moves into the continuation
    assert ctx == tok.encode("Is the sky blue?", add_special_tokens=False)
    whole = tok.encode("Is the sky blue?  yes", add_special_tokens=False)
    assert cont == whole[len(ctx):]
    # empty context: the prefix token (no BOS here -> EOS), continuation tokenised alone
    ctx, cont = encode_pair(tok, "", " yes")
    assert ctx == [tok.eos_token_id] and cont == tok.encode(" yes", add_special_tokens=False)


def test_acc_norm_divides_by_choice_length_without_delimiter(monkeypatch):
    # logliks -2 ("a", 1 char) and -5 ("bbbb", 4 chars): acc picks 0; acc_norm -2/1 < -5/4 picks 1.
    # Counting the delimiter (2 and 5 chars) would tie at -1 and pick 0, so this pins the definition.
    monkeypatch.setattr(ev, "_score_mc", lambda *a, **k: [[-2.0, -5.0]])
    model, tok = tiny_model("llama")
    report = evaluate(model, tok, [Example("t", "p", "bbbb", ("a", "bbbb"), 1)], progress=False)
    pred = report.predictions[0]
    assert (pred["pred"], pred["pred_norm"]) == (0, 1)
    assert report.per_task["t"] == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_left_truncation_to_max_length(arch):
    model, tok = tiny_model(arch)
    long = Example("t", "the cat sat on the mat because it was tired " * 6, "happy", ("happy", "warm and happy"), 0)
    max_length = 12
    ref = reference_logliks(model, tok, [long], max_length=max_length)
    for method in ev.METHODS:
        assert_close(score_choices(model, tok, [long], method=method, max_length=max_length), ref)
    untruncated = score_choices(model, tok, [long])
    assert abs(untruncated[0][0] - ref[0][0]) > 1e-6  # truncation really changed the context
    too_long = Example("t", "x", "a " * 20, ("a " * 20, "b"), 0)
    with pytest.raises(ValueError, match="window"):
        score_choices(model, tok, [too_long], max_length=8)


class TaskBias(nn.Module):
    """A stand-in adapter: adds a per-task vector to a linear layer's output, read from the context."""

    def __init__(self, base: nn.Linear, n_tasks: int, seen: list):
        super().__init__()
        self.base, self.seen = base, seen
        self.bias = nn.Parameter(torch.randn(n_tasks, base.out_features))

    def forward(self, x):
        ids = current_context().task_ids
        assert ids is not None and ids.shape == (x.shape[0],), "task ids must match the rows of the batch"
        self.seen.append(ids.tolist())
        return self.base(x) + self.bias[ids][:, None, :]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_task_ids_reach_adapters_in_both_methods(arch):
    model, tok = tiny_model(arch)
    plain = score_choices(model, tok, MC)
    seen: list = []
    torch.manual_seed(1)
    layer = model.model.layers[0].self_attn
    layer.q_proj = TaskBias(layer.q_proj, n_tasks=3, seen=seen)
    names = ["other", "qa", "fox"]  # explicit mapping: fox -> 2, qa -> 1
    shared = score_choices(model, tok, MC, method="shared", task_names=names, batch_size=2)
    per_choice = score_choices(model, tok, MC, method="per_choice", task_names=names, batch_size=2)
    kv_cache = score_choices(model, tok, MC, method="kv_cache", task_names=names, batch_size=2)
    assert_close(shared, per_choice)  # each choice row carries its own example's task id
    assert_close(kv_cache, per_choice)
    assert max(abs(a - b) for ra, rb in zip(shared, plain, strict=True) for a, b in zip(ra, rb, strict=True)) > 1e-3
    assert {i for call in seen for i in call} == {1, 2}
    with pytest.raises(ValueError, match="not in task_names"):
        score_choices(model, tok, MC, task_names=["fox"])


def test_training_mode_restored_and_no_grad():
    model, tok = tiny_model("qwen2")
    model.train()
    lls = score_choices(model, tok, MC[:2])
    assert model.training and all(isinstance(v, float) for row in lls for v in row)
    model.eval()
    evaluate(model, tok, MC[:2], progress=False)
    assert not model.training


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generation_matches_hf_generate(arch):
    model, tok = tiny_model(arch)
    prompts = ["The quick brown", "Question: Which gas do plants absorb? Answer:", "A B C"]
    examples = [Example("gen", p, "x") for p in prompts]
    report = evaluate(model, tok, examples, batch_size=2, max_new_tokens=6, progress=False)
    for ex, pred in zip(examples, report.predictions, strict=True):
        ids = torch.tensor([tok.encode(ex.prompt, add_special_tokens=False)])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        expected = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("\n", 1)[0]
        assert pred["pred"] == expected
        assert "\n" not in pred["pred"]
    # the same texts as answers (case and trailing punctuation changed) all count as exact matches
    answers = [Example("gen", ex.prompt, p["pred"].upper() + " .", None)
               for ex, p in zip(examples, report.predictions, strict=True)]
    again = evaluate(model, tok, answers, batch_size=3, max_new_tokens=6, progress=False)
    assert again.per_task["gen"]["exact_match"] == 1.0


def test_normalize_answer():
    assert normalize_answer("  Paris.\n") == "paris"
    assert normalize_answer("New   York!?") == "new york"
    assert normalize_answer("U.S. army") == "u.s. army"  # inner punctuation kept
    assert normalize_answer("the Paris") != normalize_answer("Paris")


def test_report_aggregates_and_serialises(monkeypatch):
    monkeypatch.setattr(ev, "_score_mc", lambda model, tok, exs, **k: [[-1.0, -3.0]] * len(exs))
    monkeypatch.setattr(ev, "_generate", lambda model, tok, exs, **k: ["Paris."] * len(exs))
    examples = [
        Example("mc_a", "p", "a", ("a", "b"), 0),  # correct
        Example("mc_a", "p", "b", ("a", "b"), 1),  # wrong
        Example("mc_b", "p", "a", ("a", "b"), 0),  # correct
        Example("gen", "q", "paris", None),  # correct after normalisation
    ]
    model, tok = tiny_model("llama")
    report = evaluate(model, tok, examples, progress=False)
    assert report.per_task == {
        "gen": {"exact_match": 1.0, "n": 1},
        "mc_a": {"acc": 0.5, "acc_norm": 0.5, "n": 2},
        "mc_b": {"acc": 1.0, "acc_norm": 1.0, "n": 1},
    }
    assert report.macro["primary"] == pytest.approx((1.0 + 0.5 + 1.0) / 3)
    assert report.macro["acc_norm"] == pytest.approx(0.75)
    assert report.micro["primary"] == pytest.approx(3 / 4)
    assert report.micro["acc_norm"] == pytest.approx(2 / 3)
    assert [p["task"] for p in report.predictions] == [ex.task for ex in examples]
    back = EvalReport.from_dict({**json.loads(report.to_json()), "step": 7})
    assert back.per_task == report.per_task and back.predictions[3]["pred"] == "Paris."


def test_render_table_side_by_side():
    from rich.console import Console

    base = EvalReport({"arc": {"acc": 0.25, "acc_norm": 0.3, "n": 4}}, {"primary": 0.25, "acc_norm": 0.3},
                      {"primary": 0.25, "acc_norm": 0.3, "n": 4})
    tuned = EvalReport({"arc": {"acc": 0.75, "acc_norm": 0.5, "n": 4}}, {"primary": 0.75, "acc_norm": 0.5},
                       {"primary": 0.75, "acc_norm": 0.5, "n": 4})
    console = Console(record=True, width=120)
    render_table(base, tuned, labels=("base", "tuned"), console=console)
    text = console.export_text()
    assert "arc" in text and "base" in text and "tuned" in text
    assert "25.0" in text and "75.0" in text and "+50.0" in text


def test_bad_method_rejected():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        score_choices(model, tok, MC[:1], method="bogus")


def test_shared_falls_back_to_kv_cache_without_custom_masks(monkeypatch):
    calls = []
    monkeypatch.setattr(ev, "_score_batch_kv_cache", lambda m, encs, *a: calls.append(1) or [[0.0] * len(e.conts)
                                                                                              for e in encs])
    model, tok = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # takes no 4D block mask
    score_choices(model, tok, MC[:2], method="shared")
    assert calls
