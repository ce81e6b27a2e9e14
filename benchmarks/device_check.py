"""The GPU check: everything that needs a CUDA device, in one run of at most 8 minutes, no network.

    python benchmarks/device_check.py                  # on a machine with a GPU
    python benchmarks/device_check.py --dry-run        # the same plumbing on this CPU, tiny sizes

Steps (each a subprocess with its own time limit, all within one 470 s budget; the first ones
matter most, so a slow machine loses the last ones):

1. ``pytest`` over the device-aware tests with ``MTLORA_TEST_DEVICE=cuda`` (precision, every
   method on every family, generate/export): their models, batches and checks run on the GPU.
2. ``train_step.py --device cuda --precision bf16`` (ours vs PEFT vs the frozen floor), then fp32.
3. a bf16 training run of the demo config on the GPU (``mtlora train ... precision=bf16 device=cuda``:
   train, evaluate, save), about 2 minutes.
4. ``multihead_step.py``, ``meta_step.py`` and ``eval_speed.py`` on CUDA (``--quick``).

Writes ``OUT/device_check.json``: the machine, and per step its command, exit code, seconds, the
``RESULT {...}`` line it printed (parsed) and the tail of its output. Exit code 1 if a step failed.
``--dry-run`` runs the same steps on the CPU with a tiny random model (built here, no download),
one quick test and single repetitions: it proves the plan runs, not any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 470  # 8 minutes minus start-up and the results file
DEVICE_TESTS = ["tests/test_precision.py", "tests/test_architectures.py", "tests/test_generate_export.py",
                "tests/cvlm/test_cvlm_devices.py"]


def plan(out: Path, dry_run: bool) -> list[dict]:
    """The steps as ``{name, cmd, env, timeout}``; the dry run swaps in the CPU, a tiny model and
    the smallest sizes each benchmark takes (a loaded CPU runs them slowly: wider time limits)."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    demo = [f"device={device}", "precision=bf16", f"output_dir={out / 'demo_bf16'}"]
    tests = [*DEVICE_TESTS, "-m", "not slow"]
    # train_step's torch.compile row compiles a PEFT model (minutes): left to a run of its own
    small = {"train_step": ["--quick", "--no-compile"], "multihead_step": ["--quick"], "meta_step": ["--quick"],
             "eval_speed": ["--quick"]}
    if dry_run:
        from mtlora.testing import save_tiny_model

        tiny = str(save_tiny_model(out / "tiny-llama"))
        demo += [f"model={tiny}", "train.max_steps=2", "data.max_train_per_task=8", "data.max_eval_per_task=2"]
        tests = ["tests/test_precision.py::test_device_auto_resolves_to_what_the_machine_has"]
        small = {
            "train_step": ["--model", tiny, "--batch", "1", "--seq", "16", "--answer-tokens", "4", "--reps", "1",
                           "--no-compile"],
            "multihead_step": ["--model", tiny, "--batch", "1", "--seq", "16"],
            "meta_step": ["--model", tiny, "--rows", "1", "--reps", "1"],
            "eval_speed": ["--model", tiny, "--n", "2"],
        }
    scale = 4 if dry_run else 1
    return [
        {"name": "pytest_device", "cmd": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
         "env": {"MTLORA_TEST_DEVICE": device}, "timeout": 200},
        {"name": "train_step_bf16", "timeout": 60 * scale,
         "cmd": [py, "benchmarks/train_step.py", "--device", device, "--precision", "bf16", *small["train_step"]]},
        {"name": "demo_train_bf16", "timeout": 150 * scale,
         "cmd": [py, "-m", "mtlora.cli", "train", "src/mtlora/configs/demo.yaml", *demo, "--overwrite", "--no-progress"]},
        {"name": "train_step_fp32", "timeout": 45 * scale,
         "cmd": [py, "benchmarks/train_step.py", "--device", device, *small["train_step"]]},
        {"name": "multihead_step", "timeout": 45 * scale,
         "cmd": [py, "benchmarks/multihead_step.py", "--device", device, *small["multihead_step"]]},
        {"name": "meta_step", "timeout": 45 * scale,
         "cmd": [py, "benchmarks/meta_step.py", "--device", device, *small["meta_step"]]},
        {"name": "eval_speed", "timeout": 45 * scale,
         "cmd": [py, "benchmarks/eval_speed.py", "--device", device, *small["eval_speed"]]},
    ]


def _result_line(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            try:
                return json.loads(line[len("RESULT "):])
            except json.JSONDecodeError:
                return None
    return None


def run_step(step: dict, remaining: float) -> dict:
    limit = max(1.0, min(step["timeout"], remaining))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **step.get("env", {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run(step["cmd"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code = "timeout"
        text = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        text += f"\n[killed after {limit:.0f} s]"
    seconds = round(time.perf_counter() - start, 1)
    return {"name": step["name"], "command": " ".join(step["cmd"]), "env": step.get("env", {}), "rc": code,
            "seconds": seconds, "result": _result_line(text), "tail": text[-3000:]}


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_threads": os.cpu_count(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "device_check")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with a tiny model")
    ap.add_argument("--only", action="append", help="run only these steps (repeatable)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: device_check: no CUDA device on this machine; use --dry-run to check the plumbing on the CPU",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(args.out, args.dry_run) if not args.only or s["name"] in args.only]
    started = time.perf_counter()
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": args.dry_run,
              "machine": machine(), "budget_s": BUDGET_S, "steps": []}
    for step in steps:
        remaining = (BUDGET_S * (4 if args.dry_run else 1)) - (time.perf_counter() - started)
        if remaining < 5:
            report["steps"].append({"name": step["name"], "rc": "skipped", "reason": "time budget spent"})
            continue
        result = run_step(step, remaining)
        report["steps"].append(result)
        print(f"{result['name']:<16} rc={result['rc']!s:<8} {result['seconds']:>7.1f} s  "
              f"{json.dumps(result['result']) if result['result'] else ''}", flush=True)
        _write(args.out / "device_check.json", report)  # after every step: a killed run keeps what it did
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    _write(args.out / "device_check.json", report)
    print(f"results: {args.out / 'device_check.json'}")
    return 0 if all(s["rc"] == 0 for s in report["steps"]) else 1


def _write(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
