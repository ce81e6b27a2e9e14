"""The bench's paired statistics and verdicts on synthetic per-example results (no model, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtlora.bench import check_orderings, interval_verdict, load_papers, paired_difference
from mtlora.bench.report import orderings_section, render_markdown
from mtlora.bench.statistics import minimum_detectable_difference, per_example_correctness
from mtlora.data.example import Example
from mtlora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TASKS = ("t1", "t2")
N = 150


def _entry(role: str, bits_by_seed: dict[int, str], eval_only: bool = False, training_data=None) -> dict:
    """A method's aggregate entry as ``aggregate`` builds it, from one bit string per seed (every task)."""
    values = [100 * b.count("1") / len(b) for b in bits_by_seed.values()]
    mean = sum(values) / len(values)
    std = None if len(values) < 2 else (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return {"role": role, "label": role, "eval_only": eval_only,
            "macro": {"mean": mean, "std": std, "values": values, "eval_se": 2.9},
            "correct": {str(s): {t: b for t in TASKS} for s, b in bits_by_seed.items()},
            "training_data": training_data}


def _bits(ones: int, start: int = 0) -> str:
    return "".join("1" if start <= i < start + ones else "0" for i in range(N))


@pytest.mark.parametrize("relation,low,high,held,starts", [
    (">", 0.5, 3.0, True, "held"),
    (">", -3.0, -0.5, False, "did not hold"),
    (">", -1.0, 2.0, None, "not resolved"),
    (">=", -3.0, -0.5, False, "did not hold"),
    (">=", -1.5, 2.0, True, "held: not lower by more than 2"),
    (">=", -2.5, 2.0, None, "not resolved"),
    (">=~", -1.9, -0.1, True, "held: not lower by more than 2"),
    (">=~", -4.0, -0.5, False, "did not hold"),
    (">=~", -4.0, 1.0, None, "not resolved"),
    ("~", -1.0, 1.5, True, "held"),
    ("~", 2.5, 4.0, False, "did not hold"),
    ("~", -1.0, 3.0, None, "not resolved"),
])
def test_interval_verdicts(relation, low, high, held, starts):
    got_held, text = interval_verdict(relation, low, high, margin=2.0)
    assert got_held is held and text.startswith(starts)


def test_pairing_resolves_a_small_consistent_difference():
    """B is A plus 5 more correct examples per task at every seed: -3.3 pp, one-signed, so the paired
    interval excludes 0, though the unpaired eval SE (~4 pp of a difference) could never resolve it."""
    a = _entry("mlora", {0: _bits(60), 1: _bits(62), 2: _bits(58)})
    b = _entry("rlora", {0: _bits(65), 1: _bits(67), 2: _bits(63)})
    paired, reason = paired_difference(a, [b])
    assert reason == "" and paired["diff"] == pytest.approx(-100 * 5 / N)
    assert paired["high"] < 0 and paired["seeds"] == [0, 1, 2] and paired["n_examples"] == {"t1": N, "t2": N}
    rows = {o["claim"]: o for o in check_orderings({"m": a, "r": b})}
    row = rows["M-LoRA > R-LoRA"]
    assert row["held"] is False and row["verdict"].startswith("did not hold: reversed")
    assert "interval" in orderings_section({"orderings": [row], "equivalence_margin_pp": 2.0})[-1]


def test_seeds_without_per_example_results_are_named():
    a = _entry("mlora", {0: _bits(60), 1: _bits(62)})
    b = _entry("rlora", {0: _bits(65), 1: _bits(67)})
    a["seeds_done"] = b["seeds_done"] = [0, 1, 2]  # seed 2 ran before cells kept per-example results
    row = {o["claim"]: o for o in check_orderings({"m": a, "r": b})}["M-LoRA > R-LoRA"]
    assert row["paired"]["seeds"] == [0, 1] and "paired on seeds [0, 1] only" in row["verdict"]


def test_a_pairing_over_fewer_seeds_than_one_side_has_run_is_named():
    """The table's means cover every seed a method ran; the paired interval only the seeds both
    sides have: a three-seed method against a one-seed cell is paired at that seed, and says so."""
    a = _entry("mlora", {0: _bits(60), 1: _bits(62), 2: _bits(58)})
    b = _entry("rlora", {0: _bits(65)})
    a["seeds_done"], b["seeds_done"] = [0, 1, 2], [0]
    row = {o["claim"]: o for o in check_orderings({"m": a, "r": b})}["M-LoRA > R-LoRA"]
    assert row["paired"]["seeds"] == [0] and "paired on seeds [0] only: the seeds every side has run" in row["verdict"]
    b = _entry("rlora", {0: _bits(65), 1: _bits(67), 2: _bits(63)})
    b["seeds_done"] = [0, 1, 2]
    row = {o["claim"]: o for o in check_orderings({"m": a, "r": b})}["M-LoRA > R-LoRA"]
    assert "only" not in row["verdict"]


def test_identical_methods_give_an_interval_around_zero():
    a = _entry("mlora", {0: _bits(60, 0), 1: _bits(70, 20)})
    same, _ = paired_difference(a, [_entry("rlora", {0: _bits(60, 0), 1: _bits(70, 20)})])
    assert same["diff"] == 0 and same["low"] == same["high"] == 0  # nothing differs on any example


def test_seed_noise_enters_the_interval():
    """Seed 0: A ahead by 20 examples per task; seed 1: behind by 20. Each seed alone would look
    decisive; over the seeds the interval must include 0."""
    a = _entry("align_kl", {0: _bits(80), 1: _bits(60)})
    b = _entry("mlora", {0: _bits(60), 1: _bits(80)})
    paired, _ = paired_difference(a, [b])
    assert paired["diff"] == 0 and paired["low"] < 0 < paired["high"]
    one_seed, _ = paired_difference(_entry("align_kl", {0: _bits(80)}), [_entry("mlora", {0: _bits(60)})])
    assert one_seed["low"] > 0  # one seed: only the eval-set noise enters


def test_eval_only_reference_pairs_with_every_seed():
    zero = _entry("zero_shot", {0: _bits(50)}, eval_only=True)
    lora = _entry("lora", {0: _bits(80), 1: _bits(81), 2: _bits(79)})
    paired, _ = paired_difference(lora, [zero])
    assert paired["seeds"] == [0, 1, 2] and paired["diff"] == pytest.approx(100 * 30 / N) and paired["low"] > 0


def test_full_data_verdict_is_untested_unless_the_full_cell_saw_more_than_k():
    k50 = {"k_shot": 50, "distinct_per_task": {"t1": 50, "t2": 50}}
    meta = _entry("meta_k50", {0: _bits(79), 1: _bits(80), 2: _bits(81)}, training_data=k50)

    def claim(full_seen):
        full = _entry("lora_full", {0: _bits(80), 1: _bits(80), 2: _bits(80)},
                      training_data={"k_shot": None, "distinct_per_task": full_seen})
        rows = {o["claim"]: o for o in check_orderings({"meta": meta, "full": full})}
        return rows["MeTA-LoRA k=50/task matches LoRA on all data"]

    saw_little = claim({"t1": 400, "t2": 50})  # one task no richer than the k-shot pool
    assert saw_little["held"] is None and saw_little.get("untested")
    assert saw_little["verdict"].startswith("untested: lora_full saw at most 50 distinct examples of t2 (k = 50")
    assert "measured: held" in saw_little["verdict"]  # the measurement is still shown, not as a verdict
    saw_more = claim({"t1": 400, "t2": 300})
    assert not saw_more.get("untested") and saw_more["held"] is True
    assert claim(None)["verdict"].startswith("untested: lora_full does not record")

    # a grid without a lora_full cell falls back to LoRA r=8, which saw ~k per task: untested
    lora = _entry("lora", {0: _bits(80), 1: _bits(80), 2: _bits(80)},
                  training_data={"k_shot": None, "distinct_per_task": {"t1": 52, "t2": 48}})
    row = {o["claim"]: o for o in check_orderings({"meta": meta, "lora": lora})}[
        "MeTA-LoRA k=50/task matches LoRA on all data"]
    assert row["right"] == ["lora"] and "no lora_full cell" in row["reference_note"]
    assert row["verdict"].startswith("untested: lora saw at most 48 distinct examples of t2")


def test_vacuous_match_when_the_reference_learned_nothing():
    zero = _entry("zero_shot", {0: _bits(60)}, eval_only=True)
    lora = _entry("lora", {0: _bits(60), 1: _bits(61), 2: _bits(60)},
                  training_data={"distinct_per_task": {"t1": 400, "t2": 400}})
    meta = _entry("meta_k50", {0: _bits(60), 1: _bits(60), 2: _bits(61)},
                  training_data={"k_shot": 50, "distinct_per_task": {"t1": 50, "t2": 50}})
    row = {o["claim"]: o for o in check_orderings({"z": zero, "l": lora, "m": meta})}[
        "MeTA-LoRA k=50/task matches LoRA on all data"]
    assert row["held"] is True and "vacuous: the reference is not above zero-shot" in row["verdict"]


def test_minimum_detectable_difference_is_2_8_standard_errors():
    rows = [{"paired": {"se": 1.0}}, {"paired": {"se": 2.0}}, {"paired": None}, {"paired": {"se": 3.0}}]
    assert minimum_detectable_difference(rows) == pytest.approx(2.8 * 2.0)
    assert minimum_detectable_difference([{"paired": None}]) is None


def test_per_example_bits_refuse_misaligned_predictions():
    exs = [Example("t1", "q1", "a", ("a", "b"), 0), Example("t2", "q2", "b", ("a", "b"), 1)]
    preds = [{"task": "t1", "gold": 0, "correct": True}, {"task": "t2", "gold": 1, "correct": False}]
    got = per_example_correctness(preds, exs)
    assert got["t1"]["correct"] == "1" and got["t2"]["correct"] == "0" and len(got["t1"]["ids"][0]) == 12
    assert per_example_correctness(preds[::-1], exs) is None
    assert per_example_correctness(preds[:1], exs) is None


def test_papers_file_is_data_and_is_checked(tmp_path):
    papers = load_papers(REPO / "configs" / "bench" / "papers.yaml")
    assert papers.reference_table()["theirs: Qwen2.5-3B, 8-task commonsense in-domain avg (Align-LoRA Table 5)"][
        "align_kl"] == 80.06
    assert all(r.get("table") and r.get("paper") for r in papers.references)
    assert papers.cite("align_lora") == "arXiv 2508.05078"
    bad = tmp_path / "papers.yaml"
    bad.write_text("claims:\n  - {left: lora, relation: '>>', right: [mlora], text: x}\n")
    with pytest.raises(UserError, match=r"papers.yaml: claims\[0\].relation"):
        load_papers(bad)
    bad.write_text("references:\n  - {label: x, values: {best: 1.0}}\n")
    with pytest.raises(UserError, match="unknown role 'best'"):
        load_papers(bad)


@pytest.mark.parametrize("folder", ["bench-cpu", "bench-cpu-small", "bench-cpu-small-48"])
def test_committed_results_without_per_example_data_say_so(folder):
    """The committed grids predate per-example results: no paired interval is made up for them."""
    results = json.loads((REPO / "docs" / "results" / folder / "results.json").read_text())
    methods = results["aggregate"]["methods"]
    orderings = check_orderings(methods)
    ran = [o for o in orderings if o["verdict"] != "not run"]
    assert ran and all(o["paired"] is None for o in ran)
    assert all(o["verdict"].startswith(("not resolvable: per-example results not saved", "untested")) for o in ran)
    results["aggregate"]["orderings"] = orderings
    results["aggregate"]["minimum_detectable_difference"] = None
    table = render_markdown(results)
    assert "paired intervals unavailable" in table and "| unavailable |" in table


def test_rereport_a_committed_results_json(tmp_path, monkeypatch, capsys):
    """`mtlora bench RESULTS.json --report`: the committed CPU grid re-checked from its results.json alone;
    its LoRA saw 50 examples per task, as many as MeTA-LoRA's k=50, so the MeTA claims are untested."""
    import shutil

    from conftest import run_cli

    shutil.copy(REPO / "docs" / "results" / "bench-cpu" / "results.json", tmp_path / "results.json")
    code, out, _ = run_cli(monkeypatch, capsys, "bench", str(tmp_path / "results.json"), "--report")
    assert code == 0 and "table:" in out
    results = json.loads((tmp_path / "results.json").read_text())
    lora = results["aggregate"]["methods"]["lora_r8"]
    assert lora["training_data"]["replayed"] and set(lora["training_data"]["distinct_per_task"].values()) == {50}
    rows = {o["claim"]: o for o in results["aggregate"]["orderings"]}
    assert rows["MeTA-LoRA k=50/task matches LoRA on all data"]["verdict"].startswith(
        "untested: LoRA r=8 saw at most 50 distinct examples")
    table = (tmp_path / "table.md").read_text()
    assert "paired intervals unavailable" in table and "regenerated from the finished cells" in table
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = run_cli(monkeypatch, capsys, "bench", str(tmp_path / "results.json"))
    assert code == 2 and "can only be re-reported" in err


def test_chart_draws_method_and_paired_intervals(tmp_path):
    from mtlora.bench.report import plot_macro

    a = _entry("mlora", {0: _bits(60), 1: _bits(62)})
    b = _entry("rlora", {0: _bits(65), 1: _bits(67)})
    for e in (a, b):
        own, _ = paired_difference(e, [])
        e["macro"]["ci95"] = [own["low"], own["high"]]
        e["label"] = e["role"]
    methods = {"m": a, "r": b}
    results = {"meta": {"title": "synthetic"}, "aggregate": {"methods": methods, "orderings": check_orderings(methods)}}
    assert any(o.get("paired") for o in results["aggregate"]["orderings"])
    plot_macro(results, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
