"""The papers' evaluation protocol, ``eval.protocol: generate_extract``, beside lm-eval's log-likelihood.

R-LoRA (arXiv:2502.15455) and Align-LoRA (arXiv:2508.05078) do not score choices by likelihood: their
released scripts prompt with an instruction, the options under task-specific names and an
``Answer format:`` line (``data_load.py``, identical in both repositories), generate greedily,
decode the whole sequence and extract the answer (``test_fc.py``: ``batch_test_mt``,
``parse_model_output``, ``accuracy_score``). This module transcribes that, so our figures can be
set beside the papers' tables.

::

    "Please read the passage and answer the following question with true or false. \\n"
    "Passage:{passage}\\nQuestion:{question}\\nAnswer format: true/false. Answer: "
        -> greedy generation (EOS or max_new_tokens) -> decode prompt + output
        -> text after the last "Answer:"  -> compared with "true" / "false"

Transcribed as released: the instructions, option names and ``Answer format`` lines of the
commonsense tasks and sst2; greedy decoding to EOS; extraction after the last ``Answer:`` (else
``Result:``, ``answer:``, ``result:``); the comparison mode chosen by the task's first gold answer
(number, option letter, or text); its quirks (``OPTIONS`` maps both 0 and 1 to ``A``; text answers
must match exactly after strip/lower/dropping dots, so "true, because ..." is wrong).

Differences, each forced by our data or our evaluator: the question text comes from our task's
rendering (the raw dataset fields are not kept), which only matters for siqa (the released prompt
drops the context; ours keeps it) and ARC (options always lettered A-D, where a few ARC rows use
1-4); prompts are truncated from the left (the released tokenizer call cuts the right end, the
``Answer:`` cue included); ``max_new_tokens`` is ``eval.max_new_tokens`` (released: 128). Tasks with
no released template get a generic one (``{prompt}\\nOption1: ...\\nAnswer format: option1/....
Answer: ``) and are marked ``template: generic`` in the predictions. The released runs also *train* on
these prompts; an adapter trained on our lm-eval prompts meets this format for the first time here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mtlora.data.example import Example

PROTOCOLS = ("loglik", "generate_extract")

__all__ = ["PROTOCOLS", "accuracy_flags", "parse_model_output", "render_prompt", "score_generations"]


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Rendered:
    prompt: str
    gold: str
    template: str  # "released" or "generic"


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    text = text.removeprefix(prefix) if prefix else text
    return text.removesuffix(suffix) if suffix else text


def _numbered(name: str, choices: Sequence[str]) -> str:
    return "".join(f"\n{name}{i + 1}: {c}" for i, c in enumerate(choices))


def _formats(name: str, n: int) -> str:
    return "/".join(f"{name}{i + 1}" for i in range(n))


def _boolq(ex: Example) -> Rendered:
    passage, _, question = ex.prompt.rpartition("\nQuestion: ")
    question = _strip(question, suffix="?\nAnswer:")
    instruction = "Please read the passage and answer the following question with true or false. "
    prompt = f"{instruction}\nPassage:{passage}\nQuestion:{question}\nAnswer format: true/false. Answer: "
    return Rendered(prompt, "true" if ex.gold == 1 else "false", "released")


def _named(ex: Example, instruction: str, body: str, name: str) -> Rendered:
    """The released layout of named options: ``{body}\nName1: ...\nName2: ...``, the format line
    ``name1/name2/...`` and the gold ``name{k}``."""
    options = _numbered(name.capitalize(), ex.choices)
    fmt = _formats(name, len(ex.choices))
    return Rendered(f"{instruction}{body}{options}\nAnswer format: {fmt}. Answer: ", f"{name}{ex.gold + 1}", "released")


def _piqa(ex: Example) -> Rendered:
    goal = _strip(ex.prompt, "Question: ", "\nAnswer:")
    return _named(ex, "Please choose the correct solution to the question: ", goal, "solution")


def _siqa(ex: Example) -> Rendered:
    question = _strip(ex.prompt, "Q: ", "\nA:")
    return _named(ex, "Please choose the correct answer to the question: ", question, "answer")


def _hellaswag(ex: Example) -> Rendered:
    return _named(ex, "Please choose the correct ending to complete the given sentence: ", ex.prompt, "ending")


def _winogrande(ex: Example) -> Rendered:
    sentence = ex.prompt.split("\nQuestion: Which option fits the blank", 1)[0]
    return _named(ex, "Please choose the correct answer to fill in the blank to complete the given sentence: ",
                  sentence, "option")


LETTERS = "ABCDEFGH"


def _openbookqa(ex: Example) -> Rendered:
    instruction = "Complete the sentence in the most reasonable way by choosing the best option: "
    options = " ".join(f"{LETTERS[i]}: {c}" for i, c in enumerate(ex.choices))
    return Rendered(f"{instruction}{ex.prompt} {options} Answer format: A/B/C/D. Answer: ", LETTERS[ex.gold],
                    "released")


def _arc(ex: Example) -> Rendered:
    question = _strip(ex.prompt, "Question: ", "\nAnswer:")
    instruction = "Please Answer the following multiple-choice question based on given choices.\nQuestion\uff1a"
    choices = ", ".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(ex.choices))
    prompt = f"{instruction}\nQuestion: {question}\nChoices: {choices}\nAnswer format: A/B/C/D. Answer: "
    return Rendered(prompt, LETTERS[ex.gold], "released")


def _sst2(ex: Example) -> Rendered:
    sentence = ex.prompt.split("\nQuestion: Is this sentence positive or negative?", 1)[0]
    instruction = "classify the sentiment of the text: "
    prompt = f'{instruction}Is the following sentence "{sentence}"sentimently positive? Answer: '
    return Rendered(prompt, ex.answer, "released")


TEMPLATES: dict[str, Callable[[Example], Rendered]] = {
    "boolq": _boolq,
    "piqa": _piqa,
    "siqa": _siqa,
    "hellaswag": _hellaswag,
    "winogrande": _winogrande,
    "openbookqa": _openbookqa,
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "sst2": _sst2,
}


def render_prompt(ex: Example) -> Rendered:
    """The released instruction prompt of ``ex`` and its gold answer string, or the generic template."""
    build = TEMPLATES.get(ex.task)
    if build is not None:
        return build(ex)
    if ex.choices is None:
        return Rendered(f"{ex.prompt}\nAnswer: ", ex.answer, "generic")
    fmt = _formats("option", len(ex.choices))
    prompt = f"{ex.prompt}{_numbered('Option', ex.choices)}\nAnswer format: {fmt}. Answer: "
    return Rendered(prompt, f"option{ex.gold + 1}", "generic")


# ---------------------------------------------------------------------------------------- extraction
# test_fc.py, transcribed: is_number, extract_last_option, extract_number_from_text, is_option_format,
# parse_model_output, accuracy_score (the test_fc.py variant, with its digit -> letter table).
_OPTIONS = {0: "A", 1: "A", 2: "B", 3: "C", 4: "D", 5: "E", 6: "F", 7: "G", 8: "H"}


def is_number(s: str) -> bool:
    return re.match(r"^[-+]?(\d+|\d*\.\d+)$", s.strip()) is not None


def extract_last_option(text: str) -> str:
    matches = re.findall(r"\((\w)\)", text)
    matches2 = re.findall(r"\b([A-Z])\b", text)
    if matches:
        return matches[-1].strip("()")
    if matches2:
        return matches2[-1]
    return ""


def extract_number_from_text(text: str) -> float | None:
    match = re.compile(r"[-+]?\d*\.?\d+").search(text)
    if match:
        try:
            return float(match.group())
        except ValueError:
            return None
    return None


def is_option_format(text: str) -> bool:
    return bool(re.search(r"\((\w)\)", text) or re.search(r"\b([A-Z])\b", text))


def parse_model_output(output_text: str) -> str:
    """The text after the last ``Answer:`` (else ``Result:``, ``answer:``, ``result:``), stripped."""
    for cue in ("Answer:", "Result:", "answer:", "result:"):
        if cue in output_text:
            return output_text.split(cue)[-1].strip()
    return output_text


def accuracy_flags(outputs: Sequence[str], ground_truths: Sequence[str]) -> list[bool]:
    """Per-example correctness as ``accuracy_score`` decides it; the mode comes from the first truth."""
    if not ground_truths:
        return []
    flags = []
    if is_number(ground_truths[0]):
        for output, truth in zip(outputs, ground_truths, strict=True):
            value = extract_number_from_text(output)
            try:
                flags.append(value is not None and math.isclose(value, float(truth), rel_tol=1e-9))
            except ValueError:
                flags.append(False)
    elif is_option_format(ground_truths[0]):
        for output, truth in zip(outputs, ground_truths, strict=True):
            output_op = extract_last_option(output)
            if output_op == "" and output.isdigit():
                output = _OPTIONS.get(int(output), output_op)
            else:
                output = output_op
            truth = extract_last_option(truth)
            flags.append(output.strip().lower().replace(".", "") == truth.strip().lower().replace(".", ""))
    else:
        for output, truth in zip(outputs, ground_truths, strict=True):
            flags.append(output.strip().lower().replace(".", "") == truth.strip().lower().replace(".", ""))
    return flags


# ------------------------------------------------------------------------------------------- scoring
def score_generations(examples: Sequence[Example], outputs: Sequence[str]) -> list[dict[str, Any]]:
    """One prediction dict per example (``kind: generation``), scored as the released scripts score.

    ``outputs[i]`` is the decoded prompt + continuation of ``render_prompt(examples[i])`` (greedy,
    to EOS or the token budget: :func:`mtlora.evaluate.evaluate` runs the model). Each is parsed by
    :func:`parse_model_output`, and correctness comes from :func:`accuracy_flags` over each task's
    examples together (its mode depends on the task's first gold answer, as in ``batch_test_mt``).
    """
    rendered = [render_prompt(ex) for ex in examples]
    preds = [parse_model_output(text.strip()) for text in outputs]
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    correct = [False] * len(examples)
    for members in by_task.values():
        flags = accuracy_flags([preds[i] for i in members], [rendered[i].gold.strip() for i in members])
        for i, flag in zip(members, flags, strict=True):
            correct[i] = flag
    return [
        {
            "task": ex.task, "kind": "generation", "pred": preds[i], "gold": rendered[i].gold,
            "correct": correct[i], "template": rendered[i].template,
        }
        for i, ex in enumerate(examples)
    ]
