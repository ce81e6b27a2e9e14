"""The ``mtlora`` command line (typer + rich).

Every command turns a ``UserError`` into one line on stderr, ``error: <file>[:<line>]: <what>``,
and exit code 2, without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mtlora.errors import USER_ERROR_EXIT_CODE, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-task LoRA fine-tuning on stock transformers.")
data_app = typer.Typer(no_args_is_help=True, help="Check user task files.")
app.add_typer(data_app, name="data")
console = Console()



def _quiet_libraries() -> None:
    """Hide the per-tensor progress bars transformers prints while loading weights."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@app.command("tasks")
def tasks_command() -> None:
    """List the built-in tasks with their train/eval sizes."""
    from mtlora.data.tasks import list_tasks, task_size

    table = Table(title="built-in tasks (train/eval split by a stable hash of each example)")
    for col in ("task", "kind", "train", "eval", "source"):
        table.add_column(col, justify="right" if col in ("train", "eval") else "left")
    for spec in list_tasks():
        size = task_size(spec.name)
        table.add_row(spec.name, spec.kind, str(size["train"]), str(size["eval"]), spec.source)
    console.print(table)


@app.command("models")
def models_command(
    model: Annotated[str | None, typer.Argument(help="a local HF model folder: list its adaptable modules")] = None,
) -> None:
    """Which module names each tested model family uses for LoRA's target roles (q_proj ... down_proj)."""
    from mtlora.models import MODULE_NAMES, ROLES

    table = Table(title="target_modules roles per family (each tested with every method)")
    groups = (("q_proj, k_proj, v_proj", ROLES[:3]), *((role, (role,)) for role in ROLES[3:]))
    for col, _ in (("family", ()), *groups):
        table.add_column(col, overflow="fold")
    for family, names in MODULE_NAMES.items():
        cells = [", ".join(dict.fromkeys(n for role in roles for n in names[role])) or "-" for _, roles in groups]
        table.add_row(family, *cells)
    console.print(table)
    console.print("Fused modules serve every role they contain; `all-linear` adapts every linear layer "
                  "(GPT-2's Conv1D included) except the output head.")
    if model is not None:
        from mtlora.adapters import find_target_modules
        from mtlora.models import load_model

        _quiet_libraries()
        lm, _ = load_model(model)
        found = find_target_modules(lm, "all-linear")
        console.print(f"{model} ({lm.config.model_type}): {len(found)} adaptable modules: "
                      f"{sorted({n.rsplit('.', 1)[-1] for n in found})}")


@data_app.command("check")
def data_check(file: Annotated[Path, typer.Argument(help="a JSONL task file")]) -> None:
    """Validate a JSONL task file without loading a model; print its size and task counts."""
    from mtlora.data.jsonl import check_task_file

    summary = check_task_file(file)
    console.print(f"[green]ok[/green] {file}")
    console.print_json(json.dumps(summary))


@app.command("train")
def train_command(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. train.lr=1e-4")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the output folder's checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    num_processes: Annotated[
        int, typer.Option(help="data-parallel processes: re-launches itself via accelerate launch")
    ] = 1,
) -> None:
    """Train an adapter as the config says (LoRA, HydraLoRA, R-LoRA, M-LoRA, Align-LoRA, MeTA-LoRA)."""
    from mtlora.config import load_config

    cfg = load_config(config, overrides or [])
    from mtlora.methods import get_method

    if get_method(cfg.method).single_process and (num_processes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UserError("method", f"{cfg.method} trains in one process; data parallelism covers the other methods")
    if num_processes > 1 and "WORLD_SIZE" not in os.environ:
        from mtlora.distributed import relaunch_train

        flags = [f"--{'' if on else 'no-'}{name}" for name, on in (("progress", progress),)]
        flags += [f"--{name}" for name, on in (("resume", resume), ("overwrite", overwrite)) if on]
        raise typer.Exit(relaunch_train(num_processes, [str(config), *(overrides or []), *flags]))
    _quiet_libraries()
    from mtlora.interrupts import Interrupted
    from mtlora.train import train

    try:
        summary = train(cfg, resume=resume, overwrite=overwrite, progress=progress)
    except Interrupted as exc:
        if exc.checkpoint_step is not None:
            command = " ".join(["mtlora", "train", str(config), *(overrides or []), "--resume"])
            exc.message = f"{exc.message}; resume with: {command}"
        raise
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under accelerate launch, rank 0 alone reports
    _print_eval(summary["evals"][-1] if summary.get("evals") else None)
    console.print(f"adapter: {summary['adapter']}")


def _print_eval(report: dict | None, base: dict | None = None) -> None:
    if report is None:
        return
    from mtlora.evaluate import EvalReport, render_table

    tuned = EvalReport.from_dict({k: v for k, v in report.items() if k != "step"})
    other = EvalReport.from_dict({k: v for k, v in base.items() if k != "step"}) if base else None
    if other is None:
        console.print(render_table(tuned))
    else:
        console.print(render_table(other, tuned, labels=("base", "fine-tuned")))


@app.command("eval")
def eval_command(
    tasks: Annotated[list[str], typer.Argument(help="built-in task names and/or JSONL task files")],
    model: Annotated[str, typer.Option(help="base model alias or local HF folder")] = "smollm2-135m",
    adapter: Annotated[Path | None, typer.Option(help="adapter folder to evaluate")] = None,
    split: Annotated[str, typer.Option(help="eval | train | all (built-in tasks)")] = "eval",
    max_per_task: Annotated[int | None, typer.Option(help="cap examples per task")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="for open-answer tasks")] = 16,
    output: Annotated[Path | None, typer.Option(help="write metrics JSON here")] = None,
    progress: Annotated[bool, typer.Option()] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16")] = "fp32",
) -> None:
    """Evaluate the base model or an adapter: acc / acc_norm (multiple choice), exact match (open)."""
    from mtlora.data.tasks import load_tasks
    from mtlora.evaluate import evaluate, render_table

    if split not in ("eval", "train", "all"):
        raise UserError("--split", f"expected eval, train or all, got {split!r}")
    for name, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens),
                        ("--max-per-task", max_per_task)):
        if value is not None and value < 1:
            raise UserError(name, f"expected an integer >= 1, got {value}")
    if output is not None:
        _check_writable_file(output)
    examples = load_tasks(tasks, split, max_per_task)
    from mtlora.models import resolve_device, resolve_precision

    resolve_device(device), resolve_precision(precision)  # bad values fail before the model loads
    if not examples:
        raise UserError(" ".join(map(str, tasks)), f"no examples in the {split!r} split; try --split all")
    _quiet_libraries()
    task_names = None
    if adapter is not None:
        from mtlora.train import load_trained

        lm, tokenizer, extra = load_trained(adapter, base=None if model == "smollm2-135m" else model,
                                            device=device, precision=precision)
        task_names = extra.get("task_names")
        unseen = sorted({ex.task for ex in examples} - set(task_names or []))
        if task_names and unseen:
            if getattr(lm.mtlora_config, "router", None) in ("task", "task+token"):
                raise UserError(adapter, f"routes by task and was trained on {task_names}; it does not know "
                                         f"{unseen[0]!r}")
            task_names = None  # unseen tasks: ids matter only to task-routed adapters (above)
    else:
        from mtlora.models import load_model

        lm, tokenizer = load_model(model, device=device, precision=precision)
    from mtlora.evaluate import NonFiniteScoreError

    try:
        report = evaluate(lm, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, task_names=task_names)
    except NonFiniteScoreError as exc:
        raise UserError(adapter if adapter is not None else model, str(exc)) from None
    console.print(render_table(report))
    if output is not None:
        from mtlora.fileio import atomic_write_text

        atomic_write_text(output, report.to_json())
        console.print(f"metrics: {output}")


def _check_writable_file(path: Path) -> None:
    """Fail before any work when an output file cannot be written (its folder is created now)."""
    if path.is_dir():
        raise UserError(path, "is a folder; expected a file path for the metrics JSON")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UserError(path, f"cannot write here: {parent} is a file")
    from mtlora.fileio import probe_writable

    try:
        probe_writable(path.parent)
    except OSError as exc:
        raise UserError(path, f"cannot write here ({exc.strerror or exc})") from None


@app.command("demo")
def demo_command(
    output_dir: Annotated[Path, typer.Option(help="where results, chart and adapter go")] = Path("runs/demo"),
    overwrite: Annotated[bool, typer.Option(help="replace an existing output folder")] = True,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of the demo config")] = None,
    progress: Annotated[bool, typer.Option()] = True,
) -> None:
    """LoRA on SmolLM2-135M over 4 short built-in tasks (<= 10 min on 2 CPU cores): base vs fine-tuned."""
    from mtlora.demo import run_demo

    _quiet_libraries()
    result = run_demo(output_dir, overrides or [], overwrite=overwrite, progress=progress)
    _print_eval(result["fine_tuned"], base=result["base"])
    console.print(f"results: {result['paths']['results']}\nchart: {result['paths']['chart']}\n"
                  f"adapter: {result['paths']['adapter']}")


@app.command("analyze")
def analyze_command(
    adapter: Annotated[Path, typer.Argument(help="a multi-head adapter folder")],
    out: Annotated[Path | None, typer.Option(help="where tables and heat maps go (default ADAPTER/analysis)")] = None,
    task: Annotated[list[str] | None, typer.Option(help="task (name or JSONL) for per-task router weights")] = None,
    base_model: Annotated[str | None, typer.Option(help="base model (default: the adapter's)")] = None,
    split: Annotated[str, typer.Option()] = "eval",
    max_per_task: Annotated[int, typer.Option()] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "cpu",
) -> None:
    """Head cosine similarity per layer and per-task router weights: tables + heat-map PNGs."""
    from mtlora.analysis import analyze_adapter
    from mtlora.models import resolve_device

    resolve_device(device)  # a bad or absent device fails before any work
    _quiet_libraries()
    out_dir = out or adapter / "analysis"
    analyze_adapter(adapter, out_dir, base_model=base_model, tasks=task, split=split, max_per_task=max_per_task,
                    device=device)
    console.print(f"analysis: {out_dir}")


@app.command("bench")
def bench_cli(
    config: Annotated[Path, typer.Argument(
        help="bench YAML (e.g. configs/bench/cpu.yaml), or a grid's results.json with --report")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. seeds=[0]")] = None,
    budgets: Annotated[bool, typer.Option(help="only count each method's trainable parameters")] = False,
    report: Annotated[bool, typer.Option(help="run nothing: rewrite the outputs from the finished cells")] = False,
    only: Annotated[list[str] | None, typer.Option(help="run only these methods (repeatable)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars (in-process cells)")] = True,
    protocol: Annotated[str | None, typer.Option(
        help="evaluate every finished cell again under this protocol (generate_extract: the papers' scripts) "
             "and add it to the table; trains nothing")] = None,
    max_per_task: Annotated[int | None, typer.Option(help="with --protocol: eval examples per task")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="with --protocol: generation budget")] = 16,
) -> None:
    """Run a grid of methods x seeds: results.json, table.md (paired intervals), chart.png (resumable; exit 1 if a
    cell failed)."""
    import shlex

    from mtlora.bench import bench_command

    _quiet_libraries()
    command = shlex.join(["mtlora", "bench", str(config), *(overrides or []),
                          *(a for m in only or [] for a in ("--only", m)), *(["--report"] if report else []),
                          *([f"--protocol={protocol}"] if protocol else []),
                          *([f"--max-per-task={max_per_task}"] if protocol and max_per_task is not None else []),
                          *([f"--max-new-tokens={max_new_tokens}"] if protocol else [])])
    code = bench_command(config, overrides or [], budgets_only=budgets, report_only=report, only=only,
                         progress=progress, protocol=protocol, max_per_task=max_per_task, max_new_tokens=max_new_tokens,
                         echo=lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True),
                         command=command)
    if code:
        sys.exit(code)


@app.command("generate")
def generate_command(
    source: Annotated[str, typer.Argument(help="an adapter folder, or a base model alias / HF folder")],
    prompt: Annotated[str | None, typer.Option(help="one prompt")] = None,
    file: Annotated[Path | None, typer.Option(help='JSONL prompts: {"prompt": ..., "task": ...} per line')] = None,
    task: Annotated[str | None, typer.Option(help="task name for task-aware adapters (default for --file lines)")] = None,
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    temperature: Annotated[float, typer.Option(help="0: greedy; > 0: sampling")] = 0.0,
    chat: Annotated[bool, typer.Option(help="wrap prompts in the tokenizer's chat template")] = False,
    batch_size: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    base: Annotated[str | None, typer.Option(help="base model of an adapter (default: the adapter's)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16")] = "fp32",
) -> None:
    """Complete prompts with an adapter or a model: greedy by default, batched over a prompts file (JSONL out)."""
    from mtlora.generate import Prompt, generate, load_for_generation, read_prompts
    from mtlora.models import resolve_device, resolve_precision

    if (prompt is None) == (file is None):
        raise UserError("generate", "expected exactly one of --prompt TEXT or --file prompts.jsonl")
    prompts = [Prompt(prompt)] if prompt is not None else read_prompts(file)
    resolve_device(device), resolve_precision(precision)  # bad values fail before the model loads
    _quiet_libraries()
    model, tokenizer, task_names = load_for_generation(source, base=base, device=device, precision=precision)
    texts = generate(model, tokenizer, prompts, task=task, task_names=task_names, max_new_tokens=max_new_tokens,
                     temperature=temperature, batch_size=batch_size, chat=chat, seed=seed)
    if prompt is not None:
        print(texts[0])
        return
    for p, text in zip(prompts, texts, strict=True):
        print(json.dumps({"prompt": p.text, "task": p.task or task, "completion": text}))


@app.command("export")
def export_command(
    adapter: Annotated[Path, typer.Argument(help="a trained adapter folder")],
    out: Annotated[Path, typer.Argument(help="the folder to write")],
    merge: Annotated[bool, typer.Option(help="fold the adapter into the base: a full HF model folder")] = False,
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | fp16 weights in the export")] = "fp32",
    base: Annotated[str | None, typer.Option(help="base model to merge into (default: the adapter's)")] = None,
    base_name: Annotated[str | None, typer.Option(help="base model name written into the export (e.g. a Hub id)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier export in OUT")] = False,
    per_task: Annotated[bool, typer.Option(help="one PEFT LoRA folder per task, OUT/<task>/ (exact routers only)")] = False,
    approximate: Annotated[bool, typer.Option(help="--per-task of a token router: mean router weights per task, "
                                              "measured against the original on each task's eval split")] = False,
    max_per_task: Annotated[int, typer.Option(help="--approximate: examples per task to average over and to evaluate")] = 64,
) -> None:
    """Export an adapter: a clean PEFT folder with a model card, (--merge) a merged full model, or
    (--per-task) one PEFT LoRA per task of a task-routed multi-head adapter."""
    import shlex

    from mtlora.export import export, export_per_task

    _quiet_libraries()
    command = shlex.join(["mtlora", "export", str(adapter), str(out), *(["--merge"] if merge else []),
                          *(["--per-task"] if per_task else []), *(["--dtype", dtype] if dtype != "fp32" else [])])
    if per_task:
        if merge:
            raise UserError("--per-task", "exports adapters; it does not go with --merge")
        if max_per_task < 1:
            raise UserError("--max-per-task", f"expected an integer >= 1, got {max_per_task}")
        path = export_per_task(adapter, out, base=base, base_name=base_name, overwrite=overwrite, command=command,
                               approximate=approximate, max_per_task=max_per_task,
                               echo=lambda text: console.print(text, markup=False, highlight=False))
        console.print(f"per-task adapters: {', '.join(sorted(p.name for p in path.iterdir() if p.is_dir()))} in {path}")
        return
    path = export(adapter, out, merge=merge, dtype=dtype, base=base, base_name=base_name, overwrite=overwrite,
                  command=command)
    console.print(f"{'merged model' if merge else 'adapter'}: {path}")


def main() -> None:
    """Console entry point. Exit codes: 0 done, 1 a bug (traceback) or a diverged run, 2 a user error
    (one line), 130 / 143 interrupted by SIGINT / SIGTERM (one line naming the last checkpoint)."""
    from mtlora.interrupts import Interrupted, raise_on_sigterm

    raise_on_sigterm()
    try:
        code = app(standalone_mode=False)
        if code == 130:  # typer turns Ctrl-C into Exit(130), which comes back as a return value
            print("interrupted", file=sys.stderr)
        sys.exit(code if isinstance(code, int) else 0)  # so does typer.Exit(n)
    except UserError as exc:
        print(f"error: {exc.format()}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    except SystemExit:
        raise
    except Interrupted as exc:
        print(f"{exc.message}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(USER_ERROR_EXIT_CODE)
        from mtlora.evaluate import NonFiniteScoreError
        from mtlora.train import TrainingDiverged

        if isinstance(exc, (TrainingDiverged, NonFiniteScoreError)):
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
