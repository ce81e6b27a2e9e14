"""The papers' generate-and-extract protocol: prompts, extraction and scoring on hand cases, end to end."""

from __future__ import annotations

import pytest
import torch

from mtlora.config import EvalConfig
from mtlora.data.example import Example
from mtlora.data.tasks import get_task
from mtlora.errors import UserError
from mtlora.eval_protocols import accuracy_flags, parse_model_output, render_prompt
from mtlora.evaluate import evaluate
from mtlora.testing import tiny_model


def _built(task: str, row: dict) -> Example:
    ex = get_task(task).build(row)
    assert ex is not None
    return ex


# --- prompts: the released data_load.py f-strings, written out here from the raw fields --------------
def test_boolq_prompt_is_the_released_one():
    ex = _built("boolq", {"passage": "Water boils at 100 C.", "question": "does water boil at 100 c", "answer": True})
    got = render_prompt(ex)
    instruction = "Please read the passage and answer the following question with true or false. "
    assert got.prompt == (
        f"{instruction}\nPassage:Water boils at 100 C.\nQuestion:does water boil at 100 c"
        "\nAnswer format: true/false. Answer: "
    )
    assert (got.gold, got.template) == ("true", "released")


def test_piqa_hellaswag_winogrande_arc_openbookqa_prompts():
    piqa = render_prompt(_built("piqa", {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat it", "label": 0}))
    assert piqa.prompt == ("Please choose the correct solution to the question: Open a jar\nSolution1: twist the lid"
                           "\nSolution2: eat it\nAnswer format: solution1/solution2. Answer: ")
    assert piqa.gold == "solution1"
    hs = render_prompt(_built("hellaswag", {"activity_label": "Cooking", "ctx_a": "A man cuts", "ctx_b": "an onion",
                                            "endings": "['he cries.', 'he sings.', 'he flies.', 'he sleeps.']",
                                            "label": "2"}))
    assert hs.prompt == ("Please choose the correct ending to complete the given sentence: Cooking: A man cuts "
                         "An onion\nEnding1: he cries.\nEnding2: he sings.\nEnding3: he flies.\nEnding4: he sleeps."
                         "\nAnswer format: ending1/ending2/ending3/ending4. Answer: ")
    assert hs.gold == "ending3"
    wg = render_prompt(_built("winogrande", {"sentence": "The cup fell off the _.", "option1": "table",
                                             "option2": "sky", "answer": "1"}))
    assert wg.prompt == ("Please choose the correct answer to fill in the blank to complete the given sentence: "
                         "The cup fell off the _.\nOption1: table\nOption2: sky\nAnswer format: option1/option2. "
                         "Answer: ")
    assert wg.gold == "option1"
    arc = render_prompt(_built("arc_easy", {"question": "What is hot?", "answerKey": "B",
                                            "choices": "{'text': ['ice', 'fire'], 'label': ['A', 'B']}"}))
    assert arc.prompt == ("Please Answer the following multiple-choice question based on given choices.\n"
                          "Question\uff1a\nQuestion: What is hot?\nChoices: A) ice, B) fire\n"
                          "Answer format: A/B/C/D. Answer: ")
    assert arc.gold == "B"
    obqa = render_prompt(_built("openbookqa", {"question_stem": "Sun is a", "answerKey": "A",
                                               "choices": "{'text': ['star', 'moon', 'rock', 'cat'], "
                                                          "'label': ['A', 'B', 'C', 'D']}"}))
    assert obqa.prompt == ("Complete the sentence in the most reasonable way by choosing the best option: Sun is a "
                           "A: star B: moon C: rock D: cat Answer format: A/B/C/D. Answer: ")


def test_unknown_tasks_get_the_generic_template():
    ex = Example("mine", "Pick one.", "b", choices=("a", "b"), gold=1)
    got = render_prompt(ex)
    assert got.prompt == "Pick one.\nOption1: a\nOption2: b\nAnswer format: option1/option2. Answer: "
    assert (got.gold, got.template) == ("option2", "generic")


# --- extraction and scoring: test_fc.py's rules ---------------------------------------------------------
@pytest.mark.parametrize(
    "decoded, expected",
    [
        ("...Answer format: true/false. Answer: true", "true"),
        ("Answer: x\nAnswer:  ending2 ", "ending2"),  # the last cue wins
        ("Result: 7", "7"),
        ("no cue at all", "no cue at all"),
    ],
)
def test_parse_model_output(decoded, expected):
    assert parse_model_output(decoded) == expected


def test_text_answers_must_match_exactly_after_strip_lower_and_dots():
    outs = ["True.", "true, because the passage says so", " FALSE ", "ending2", "ending 2"]
    golds = ["true", "true", "false", "ending2", "ending2"]
    assert accuracy_flags(outs, golds) == [True, False, True, True, False]


def test_option_answers_take_the_last_letter_and_the_released_digit_table():
    golds = ["B", "B", "C", "A", "A", "B", "D"]
    outs = ["(B)", "I think A, no, B", "C) fire", "1", "0", "2", "the answer is d"]
    # digits map through test_fc.py's OPTIONS, where 0 and 1 both mean A; a lower-case letter is no option
    assert accuracy_flags(outs, golds) == [True, True, True, True, True, True, False]


def test_number_answers_compare_the_first_number():
    assert accuracy_flags(["42.0 apples", "about 41", "none"], ["42", "42", "42"]) == [True, False, False]


def test_the_mode_follows_the_first_gold_as_released():
    # a first gold that looks like a letter makes the whole task compare letters: "yes" and "no"
    # both extract to "" and so match (a quirk of the released scorer, kept), "true" vs "B" does not
    assert accuracy_flags(["A", "yes", "true"], ["A", "no", "B"]) == [True, True, False]


# --- end to end through evaluate() ------------------------------------------------------------------
def _examples() -> list[Example]:
    return [
        _built("boolq", {"passage": "Ice is cold.", "question": "is ice cold", "answer": True}),
        _built("boolq", {"passage": "Fire is cold.", "question": "is fire cold", "answer": False}),
        _built("piqa", {"goal": "Dry hands", "sol1": "use a towel", "sol2": "use water", "label": 0}),
    ]


def test_evaluate_generate_extract_scores_what_the_model_generates(monkeypatch):
    """The real greedy decoder gives what ``model.generate`` gives on the rendered prompt (BOS, to the
    token budget, prompt + continuation parsed); a model made to answer with the gold (then a wrong
    answer) scores 1 (then 0): decode, parse and score are wired."""
    import mtlora.evaluate as ev
    from mtlora.eval_protocols import parse_model_output, render_prompt

    model, tok = tiny_model("llama")
    model.train()
    examples = _examples()
    report = evaluate(model, tok, examples, batch_size=2, max_new_tokens=5, protocol="generate_extract", progress=False)
    assert set(report.per_task) == {"boolq", "piqa"} and report.meta["protocol"] == "generate_extract"
    assert all(p["template"] == "released" and p["kind"] == "generation" for p in report.predictions)
    model.eval()
    for ex, pred in zip(examples, report.predictions, strict=True):
        prompt = render_prompt(ex).prompt
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=True)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        text = prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert pred["pred"] == parse_model_output(text.strip())
    model.train()

    answers = iter([])
    monkeypatch.setattr(ev, "_generate", lambda model, tok, exs, **kw: [next(answers) for _ in exs])
    answers = iter(["true", "false", "solution1"])
    right = evaluate(model, tok, examples, batch_size=2, protocol="generate_extract", progress=False)
    assert right.macro["primary"] == 1.0, right.predictions
    answers = iter(["false", "true", "solution2"])
    wrong = evaluate(model, tok, examples, batch_size=2, protocol="generate_extract", progress=False)
    assert wrong.macro["primary"] == 0.0, wrong.predictions
    assert model.training  # evaluate restored the training mode


def test_protocol_is_validated():
    with pytest.raises(UserError, match="eval.protocol"):
        EvalConfig(protocol="vibes")
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="protocol"):
        evaluate(model, tok, _examples(), protocol="vibes", progress=False)
