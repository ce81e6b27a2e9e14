"""The bench grid on the tiny model: outputs, resume/skip, a crashing cell, matched budgets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from mtlora.bench import (
    bench_from_dict,
    budget_report,
    check_orderings,
    lora_parameter_count,
    matched_lora_rank,
    multihead_parameter_count,
    run_bench,
)
from mtlora.errors import UserError

TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _bench(tmp_path: Path, model: Path, tasks: list[Path], methods: dict, seeds=(0, 1), isolate=False):
    raw = {
        "title": "tiny grid",
        "output_dir": str(tmp_path / "bench"),
        "seeds": list(seeds),
        "isolate": isolate,
        "base": {
            "model": str(model),
            "tasks": [str(t) for t in tasks],
            "adapter": {"r": 2, "alpha": 4, "target_modules": TARGETS},
            "data": {"max_length": 32, "max_eval_per_task": 4},
            "train": {"batch_size": 4, "max_steps": 2, "save_every": 1, "log_every": 1},
            "eval": {"batch_size": 8},
        },
        "methods": methods,
    }
    return bench_from_dict(raw, source="tiny.yaml")


METHODS = {
    "zero_shot": {"role": "zero_shot", "eval_only": True},
    "lora": {"role": "lora"},
    "rlora": {"role": "rlora", "method": "rlora", "adapter": {"num_heads": 3}},
}


def test_grid_writes_outputs_and_skips_finished_cells(tmp_path, tiny_model_dir, task_files):
    bench = _bench(tmp_path, tiny_model_dir, task_files, METHODS)
    lines: list[str] = []
    outcome = run_bench(bench, progress=False, echo=lines.append, command="mtlora bench tiny.yaml")
    # the eval-only method runs once; the trained ones at both seeds, seed-major
    assert outcome.ran == ["zero_shot/seed0", "lora/seed0", "rlora/seed0", "lora/seed1", "rlora/seed1"]
    assert not outcome.failed
    out = tmp_path / "bench"
    results = json.loads((out / "results.json").read_text())
    methods = results["aggregate"]["methods"]
    assert methods["lora"]["seeds_done"] == [0, 1] and methods["zero_shot"]["seeds_done"] == [0]
    assert methods["lora"]["macro"]["std"] is not None and methods["zero_shot"]["macro"]["std"] is None
    assert methods["zero_shot"]["trainable_parameters"] == 0
    # the counted budget equals what training reports
    assert methods["rlora"]["budget_parameters"] == methods["rlora"]["trainable_parameters"] > 0
    table = (out / "table.md").read_text()
    assert "mtlora bench tiny.yaml" in table and "theirs: Qwen2.5-3B" in table
    assert "| R-LoRA > HydraLoRA (arXiv 2502.15455) | - | - | - | - | not run |" in table  # no HydraLoRA here
    # every cell keeps its per-example correctness and the training data it saw
    cell0 = json.loads((out / "cells" / "lora" / "seed0" / "cell.json").read_text())
    assert set(cell0["examples"]) == {"qa", "sentiment"}
    assert len(cell0["examples"]["qa"]["correct"]) == len(cell0["examples"]["qa"]["ids"]) == 4
    assert cell0["training_data"]["example_passes"] == 2 * 4  # 2 steps of 4
    assert sum(cell0["training_data"]["distinct_per_task"].values()) <= 8
    assert results["aggregate"]["eval_examples"]["qa"] == cell0["examples"]["qa"]["ids"]
    assert set(methods["lora"]["correct"]) == {"0", "1"} and "examples" not in methods["lora"]["cells"][0]
    low, high = methods["lora"]["macro"]["ci95"]
    assert low <= methods["lora"]["macro"]["mean"] <= high
    assert "macro 95 % CI" in table and "minimum detectable difference" in table
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    cell = out / "cells" / "lora" / "seed1"
    assert yaml.safe_load((cell / "cell.yaml").read_text())["train"]["seed"] == 1
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/cell.json")}
    assert len(mtimes) == 5

    again = run_bench(bench, progress=False, echo=lines.append)
    assert again.ran == [] and len(again.skipped) == 5
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/cell.json")} == mtimes

    # --report: nothing runs, the header keeps the original command and says what regenerated it
    (out / "cells" / "rlora" / "seed1" / "cell.json").unlink()
    report = run_bench(bench, progress=False, echo=lines.append, command="mtlora bench tiny.yaml --report",
                       execute=False)
    assert report.ran == [] and not (out / "cells" / "rlora" / "seed1" / "cell.json").exists()
    table = (out / "table.md").read_text()
    assert "command: `mtlora bench tiny.yaml`" in table and "by `mtlora bench tiny.yaml --report`" in table
    assert "rlora/seed1: not run yet" in table and "| 1/2 |" in table
    assert "* = cells run inside the bench process" in table


def test_failing_cell_is_recorded_and_the_rest_complete(tmp_path, tiny_model_dir, task_files, monkeypatch):
    import mtlora.train as train_module

    real_train = train_module.train

    def flaky(config, **kwargs):
        if config.method == "rlora":
            raise RuntimeError("boom in rlora")
        return real_train(config, **kwargs)

    monkeypatch.setattr(train_module, "train", flaky)
    bench = _bench(tmp_path, tiny_model_dir, task_files, {k: METHODS[k] for k in ("lora", "rlora")}, seeds=(0,))
    outcome = run_bench(bench, progress=False, echo=lambda _: None)
    assert outcome.failed == ["rlora/seed0"] and outcome.ran == ["lora/seed0"]
    error = (tmp_path / "bench" / "cells" / "rlora" / "seed0" / "error.txt").read_text()
    assert "RuntimeError: boom in rlora" in error
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert results["aggregate"]["failed"][0]["cell"] == "rlora/seed0"
    assert "lora" in results["aggregate"]["methods"] and "macro" in results["aggregate"]["methods"]["lora"]

    monkeypatch.setattr(train_module, "train", real_train)  # fixed: a rerun only runs the failed cell
    outcome = run_bench(bench, progress=False, echo=lambda _: None)
    assert outcome.ran == ["rlora/seed0"] and outcome.skipped == ["lora/seed0"] and not outcome.failed
    assert not (tmp_path / "bench" / "cells" / "rlora" / "seed0" / "error.txt").exists()


def test_crashing_subprocess_cell_is_isolated(tmp_path, tiny_model_dir, task_files):
    """In subprocess mode a cell that dies is recorded from its exit code and log; the grid goes on."""
    methods = {"broken": {"role": "lora", "tasks": [str(tmp_path / "missing.jsonl")]}}
    bench = _bench(tmp_path, tiny_model_dir, task_files, methods, seeds=(0,), isolate=True)
    outcome = run_bench(bench, progress=False, echo=lambda _: None)
    assert outcome.failed == ["broken/seed0"]
    cell = tmp_path / "bench" / "cells" / "broken" / "seed0"
    assert "missing.jsonl" in (cell / "error.txt").read_text()
    assert (cell / "log.txt").is_file()
    assert not (cell / "cell.json").exists()


def test_matched_budget_by_hand(tmp_path, tiny_model_dir, task_files):
    """Tiny llama: hidden 32, intermediate 64, 2 layers; gate/up 32->64, down 64->32."""
    shapes = [(32, 64), (32, 64), (64, 32)] * 2
    assert lora_parameter_count(shapes, 8) == 8 * 96 * 6 == 4608
    # R-LoRA 5 heads r=4: A 4*d_in + heads 5*d_out*4 + router 5*d_in
    rlora = 2 * (2 * (4 * 32 + 5 * 64 * 4 + 5 * 32) + (4 * 64 + 5 * 32 * 4 + 5 * 64))
    assert multihead_parameter_count(shapes, 4, 5, router=True) == rlora == 8704
    assert multihead_parameter_count(shapes, 4, 5, router=False) == 8704 - 2 * (5 * 32 * 2 + 5 * 64)
    assert matched_lora_rank(shapes, rlora) == 15  # 15 * 576 = 8640 is closest to 8704
    assert matched_lora_rank(shapes, 4608) == 8

    methods = {
        "lora": {"adapter": {"r": 8}},
        "rlora": {"method": "rlora", "adapter": {"r": 4, "num_heads": 5}},
        "mlora": {"method": "mlora", "adapter": {"r": 4, "num_heads": 5}},
    }
    rows = {r["method"]: r for r in budget_report(_bench(tmp_path, tiny_model_dir, task_files, methods))}
    assert rows["lora"]["trainable_parameters"] == 4608  # injected into the model and counted
    assert rows["rlora"]["trainable_parameters"] == 8704 and rows["rlora"]["matched_lora_rank"] == 15
    assert rows["mlora"]["trainable_parameters"] == 8704 - 2 * 640  # no router: 5*(32+32+64) per layer


def test_orderings_verdicts():
    def entry(role, values):
        mean = sum(values) / len(values)
        std = None if len(values) < 2 else (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
        return {"role": role, "macro": {"mean": mean, "std": std, "values": values}}

    methods = {
        "a": entry("align_kl", [60.0, 62.0]),  # mean 61, std 1.41
        "m": entry("mlora", [50.0, 52.0]),  # mean 51
        "r": entry("rlora", [51.0, 53.0]),  # mean 52 > mlora: "M-LoRA > R-LoRA" fails within spread
    }
    methods["z"] = entry("zero_shot", [50.0])
    methods["l"] = entry("lora", [50.0, 52.0])  # only 1 pp above zero-shot: nothing learned to match
    methods["k"] = entry("meta_k50", [50.0, 51.0])
    rows = {o["claim"]: o for o in check_orderings(methods)}
    # no per-example results (as in results saved before cells kept them): the seed-spread reading
    # survives as the unpaired reading, and no verdict is given
    assert rows["MeTA-LoRA k=50/task matches LoRA on all data"]["unpaired_verdict"].startswith("held (vacuous")
    assert rows["A-LoRA-K > M-LoRA"]["unpaired_verdict"] == "held (beyond the seed spread)"
    assert rows["M-LoRA > R-LoRA"]["unpaired_verdict"] == "did not hold (within the seed spread)"
    assert rows["A-LoRA-K > M-LoRA"]["verdict"].startswith("not resolvable: per-example results not saved")
    assert rows["A-LoRA-K > M-LoRA"]["paired"] is None and rows["A-LoRA-K > M-LoRA"]["held"] is None
    assert rows["R-LoRA > HydraLoRA"]["verdict"] == "not run"
    # no lora_full cell: the "all data" claim falls back to LoRA r=8, and without a record of what it saw
    # the claim is untested
    k50 = rows["MeTA-LoRA k=50/task matches LoRA on all data"]
    assert k50["right"] == ["lora"] and k50["verdict"].startswith("untested")


def test_bad_bench_configs(tmp_path, tiny_model_dir, task_files):
    with pytest.raises(UserError, match="unknown key 'method'"):
        bench_from_dict({"base": {}, "methods": {"a": {}}, "output_dir": "x", "method": "lora"})
    with pytest.raises(UserError, match="role"):
        bench_from_dict({"base": {}, "methods": {"a": {"role": "best"}}, "output_dir": "x"})
    with pytest.raises(UserError, match="cell_timeout_s"):
        bench_from_dict({"base": {}, "methods": {"a": {"cell_timeout_s": -1}}, "output_dir": "x"})
    bench = _bench(tmp_path, tiny_model_dir, task_files, {"bad": {"adapter": {"rank": 3}}}, seeds=(0,))
    with pytest.raises(UserError, match="rank"):
        run_bench(bench, progress=False, echo=lambda _: None)


def test_cli_budgets_and_user_error(monkeypatch, capsys, tmp_path, tiny_model_dir, task_files):
    from conftest import run_cli

    def cli(*args: str) -> tuple[int, str, str]:
        return run_cli(monkeypatch, capsys, "bench", *args)

    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "base": {"model": str(tiny_model_dir), "tasks": [str(t) for t in task_files],
                 "adapter": {"target_modules": TARGETS}},
        "methods": {"lora": {"adapter": {"r": 8}}, "rlora": {"method": "rlora", "adapter": {"r": 4, "num_heads": 5}}},
    }))
    code, out, _ = cli(str(config), "--budgets")
    assert code == 0
    assert "4,608" in out and "8,704" in out and "closest LoRA rank: r=15" in out
    code, _, err = cli(str(config), "seeds=[0,0]")
    assert code == 2 and err.startswith("error: ") and "seed is listed twice" in err


def test_interrupted_cell_resumes_only_its_own_checkpoint(tmp_path, tiny_model_dir, task_files, monkeypatch):
    """A checkpoint left by a killed cell is resumed; one left under another config is not."""
    import mtlora.train as train_module

    calls: list[bool] = []
    real_train = train_module.train

    def spy(config, **kwargs):
        calls.append(kwargs["resume"])
        return real_train(config, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    bench = _bench(tmp_path, tiny_model_dir, task_files, {"lora": METHODS["lora"]}, seeds=(0,))
    run_bench(bench, progress=False, echo=lambda _: None)
    cell = tmp_path / "bench" / "cells" / "lora" / "seed0"
    (cell / "cell.json").unlink()  # as if killed after its last checkpoint
    run_bench(bench, progress=False, echo=lambda _: None)
    assert calls == [False, True]
    (cell / "cell.json").unlink()
    bench.base["train"]["lr"] = 1e-2  # another config: the old checkpoint must not be resumed
    run_bench(bench, progress=False, echo=lambda _: None)
    assert calls == [False, True, False]


def test_cpu_profile_full_data_and_k_shot_cells(tmp_path):
    """configs/bench/cpu.yaml: >= 150 eval examples per task where the task has them; lora_full sees far
    more than k examples of every task, lora_k* exactly MeTA-LoRA's k per task; lora_r8 only ~k=50."""
    from mtlora.bench import load_bench_config, prepare_cells, training_data_seen
    from mtlora.data.tasks import task_size

    root = Path(__file__).resolve().parents[1]
    bench = load_bench_config(root / "configs" / "bench" / "cpu.yaml", ["seeds=[0]", f"output_dir={tmp_path}"])
    assert bench.base["data"]["max_eval_per_task"] >= 150
    assert all(task_size(t)["eval"] >= 150 or t == "arc_challenge" for t in bench.base["tasks"])
    configs = {m.name: (m, c) for m, _, c in prepare_cells(bench)}
    seen = {name: training_data_seen(c, eval_only=m.eval_only) for name, (m, c) in configs.items()}
    assert min(seen["lora_full"]["distinct_per_task"].values()) > 200
    assert seen["lora_full"]["pool_per_task"]["hellaswag"] == 2215 < task_size("hellaswag")["train"]
    assert seen["lora_full"]["pool_per_task"]["boolq"] == task_size("boolq")["train"]  # only hellaswag capped
    assert set(seen["lora_k50"]["distinct_per_task"].values()) == {50}
    assert set(seen["lora_k100"]["distinct_per_task"].values()) == {100}
    assert set(seen["lora_r8"]["distinct_per_task"].values()) == {50}
    assert configs["lora_full"][0].cell_timeout_s > bench.cell_timeout_s
    # "the same k examples": lora_k50's training set is exactly MeTA-LoRA k=50's k-shot pool
    from mtlora.meta import kshot_pools
    from mtlora.train import training_examples

    meta = configs["meta_k50"][1]
    pools = kshot_pools(training_examples(meta), meta.meta, seed=meta.train.seed)
    k50 = configs["lora_k50"][1]
    assert k50.train.seed == meta.train.seed
    assert {ex for p in pools for ex in (*p.support, *p.query)} == set(training_examples(k50))


def test_a_second_protocol_scores_the_same_trained_cells(tmp_path, tiny_model_dir, task_files):
    """``mtlora bench --protocol generate_extract``: every finished cell's saved adapter evaluated
    again (nothing trains, done cells are skipped), its table beside the grid's own."""
    from mtlora.bench import bench_command

    raw = _raw(tmp_path, tiny_model_dir, task_files)
    run_bench(bench_from_dict(raw, source="tiny.yaml"), progress=False, echo=lambda _: None)
    out = tmp_path / "bench"
    cell_json = {p: p.read_text() for p in out.glob("cells/*/*/cell.json")}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    assert bench_command(config, protocol="generate_extract", max_per_task=3, max_new_tokens=4, echo=lines.append) == 0
    assert {p: p.read_text() for p in out.glob("cells/*/*/cell.json")} == cell_json  # nothing retrained
    extra = sorted(out.glob("cells/*/*/eval_generate_extract.json"))
    assert len(extra) == 3  # zero-shot once, lora at two seeds
    row = json.loads(extra[0].read_text())
    assert row["protocol"] == "generate_extract" and row["max_per_task"] == 3
    assert all(len(v["correct"]) <= 3 for v in row["examples"].values())
    results = json.loads((out / "results.json").read_text())
    protocol = results["protocols"]["generate_extract"]["methods"]
    assert protocol["lora"]["seeds_done"] == [0, 1] and "macro" in protocol["lora"]
    table = (out / "table.md").read_text()
    assert "## The papers' protocol: generate_extract" in table and "## Orderings under generate_extract" in table
    # resumable: a second call evaluates nothing
    lines.clear()
    assert bench_command(config, protocol="generate_extract", max_per_task=3, max_new_tokens=4, echo=lines.append) == 0
    assert not any("evaluating under" in line for line in lines)
    with pytest.raises(UserError, match="--protocol: expected generate_extract or loglik"):
        bench_command(config, protocol="exact")
    # a checkout without the cell's trained adapter (run/ is git-ignored): one line, no traceback, exit 1
    gone = out / "cells" / "lora" / "seed1"
    (gone / "eval_generate_extract.json").unlink()
    shutil.rmtree(gone / "run" / "adapter")
    lines.clear()
    assert bench_command(config, protocol="generate_extract", max_per_task=3, max_new_tokens=4, echo=lines.append) == 1
    said = [line for line in lines if line.startswith("[") and "lora/seed1: not scored" in line]
    assert len(said) == 1 and "adapter" in said[0] and "Traceback" not in "\n".join(lines)
    assert not (gone / "error.txt").exists()


def _raw(tmp_path: Path, model: Path, tasks: list[Path]) -> dict:
    return {"title": "tiny grid", "output_dir": str(tmp_path / "bench"), "seeds": [0, 1], "isolate": False,
            "base": {"model": str(model), "tasks": [str(t) for t in tasks],
                     "adapter": {"r": 2, "alpha": 4, "target_modules": TARGETS},
                     "data": {"max_length": 32, "max_eval_per_task": 4},
                     "train": {"batch_size": 4, "max_steps": 2, "save_every": 1, "log_every": 1},
                     "eval": {"batch_size": 8}},
            "methods": {k: METHODS[k] for k in ("zero_shot", "lora")}}
