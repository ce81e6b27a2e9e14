"""``mtlora export``: hand a trained adapter to another stack.

- ``export ADAPTER OUT --merge [--dtype bf16]``: the adapter folded into the base weights, saved as
  a plain Hugging Face model folder that stock ``AutoModelForCausalLM.from_pretrained(OUT)`` loads
  (GPT-2's ``Conv1D`` layers come back as ``Conv1D``). Merging is exact for plain LoRA (and
  Align-LoRA / MeTA-LoRA, which train one) and for multi-head adapters with fixed head weights
  (M-LoRA, ``head_weights``); a learned token router (HydraLoRA, R-LoRA) makes the update depend
  on the input, so that is refused with the reason. The merge runs in fp32 and is rounded to
  ``--dtype`` once at the end.
- ``export ADAPTER OUT``: a clean PEFT folder (``adapter_config.json`` + weights, nothing of ours)
  for plain-LoRA-format adapters, with the base model named portably (a Hub id for the built-in
  alias, never this machine's cache path).

- ``export ADAPTER OUT --per-task``: one stock PEFT LoRA folder per task, ``OUT/<task>/``, from a
  multi-head adapter whose head weights do not depend on the input (``router: task`` or ``mean``,
  M-LoRA, fixed ``head_weights``): ``B_t = sum_i w_{t,i} B_i`` with the shared ``A``; R-LoRA's frozen
  offset joins as ``r`` more columns (rank ``2r``: ``[B_t, -offset_B] [A; offset_A]``), and the
  scaling is folded into B (``lora_alpha = r``). Exact: the same logits as our model run with that
  task id (tested in stock PEFT). A token router weighs heads per token, so it is refused unless
  ``--approximate``: then ``w_t`` is the task's mean router weights over its training tokens (per
  layer), and the command measures the accuracy of the exported adapters beside the original's on
  each task's eval split (printed, and kept in the export's marker and model cards).

Every export writes a model card (``README.md``: base model, method, tasks, the run's metrics, the commands)
and ``mtlora_export.json``, the marker that lets ``--overwrite`` replace an earlier export and
nothing else. The folder is written atomically (temporary folder + rename, the umask's modes).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mtlora.adapters.io import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, atomic_write_dir, read_adapter_config
from mtlora.errors import UserError
from mtlora.models import HUB_NAMES

MARKER = "mtlora_export.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def portable_base_name(base: str | None, override: str | None = None) -> str | None:
    """A base-model name that means the same on another machine: ``override``, a Hub id for our
    aliases, a name that is not a local path as it is, else the local folder's name."""
    if override:
        return override
    if base is None:
        return None
    if base in HUB_NAMES:
        return HUB_NAMES[base]
    path = Path(base).expanduser()
    if path.is_absolute() or path.exists() or base.startswith((".", "~")):
        return path.name
    return base


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(out, "output exists and is not empty; pass --overwrite to replace an earlier export")
        if not (out / MARKER).is_file():
            raise UserError(out, f"not an mtlora export (no {MARKER}); refusing to replace a folder this tool did not create")


def _run_files(adapter_dir: Path) -> tuple[dict | None, Path | None]:
    """The training run's ``results.json`` and ``config.yaml`` beside the adapter (``OUTPUT_DIR/adapter``)."""
    results, config = None, None
    for folder in (adapter_dir, adapter_dir.parent):
        if results is None and (folder / "results.json").is_file():
            try:
                results = json.loads((folder / "results.json").read_text())
            except json.JSONDecodeError:
                results = None
        if config is None and (folder / "config.yaml").is_file():
            config = folder / "config.yaml"
    return results, config


def _metrics_table(results: dict | None) -> str:
    evals = (results or {}).get("evals") or []
    if not evals:
        return "No evaluation was found beside the adapter (`results.json` of the training run).\n"
    last = evals[-1]
    lines = ["| task | metric | n | score (%) |", "|---|---|---|---|"]
    for task, metrics in sorted(last.get("per_task", {}).items()):
        for metric in ("acc", "acc_norm", "exact_match"):
            if metric in metrics:
                lines.append(f"| {task} | {metric} | {int(metrics.get('n', 0))} | {100 * metrics[metric]:.1f} |")
    macro = last.get("macro", {})
    if "primary" in macro:
        lines.append(f"| macro | primary | {macro.get('n_tasks', '')} | {100 * macro['primary']:.1f} |")
    return f"Evaluated at step {last.get('step', '?')} of the training run (`mtlora eval`'s metrics):\n\n" + "\n".join(lines) + "\n"


def model_card(*, base_name: str | None, method: str, tasks: list[str], results: dict | None, merged: bool,
               dtype: str, train_command: str | None, export_command: str | None) -> str:
    library = "transformers" if merged else "peft"
    front = ["---", f"library_name: {library}"]
    if base_name:
        front.append(f"base_model: {base_name}")
    front += ["tags:", *(f"- {tag}" for tag in dict.fromkeys(["mtlora", method, "lora"])), "---", ""]
    kind = "the base model with the adapter merged into its weights" if merged else "a LoRA adapter (PEFT format)"
    load = (
        '```python\nfrom transformers import AutoModelForCausalLM\nmodel = AutoModelForCausalLM.from_pretrained("PATH")\n```\n'
        if merged else
        f'```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n'
        f'base = AutoModelForCausalLM.from_pretrained("{base_name or "BASE_MODEL"}")\n'
        f'model = PeftModel.from_pretrained(base, "PATH")\n```\n'
    )
    body = [
        f"# {method} fine-tune{f' of {base_name}' if base_name else ''}",
        "",
        f"This folder holds {kind}, trained with mtlora.",
        "",
        f"- base model: {base_name or 'unknown'}",
        f"- method: {method}",
        f"- tasks: {', '.join(tasks) if tasks else 'unknown'}",
        f"- weights: {dtype}",
        "",
        "## Metrics",
        "",
        _metrics_table(results),
        "## How it was made",
        "",
        f"Training: `{train_command}` (the run's config is `training_config.yaml`)." if train_command
        else "Training: the run's config was not found beside the adapter.",
        "",
        f"Export: `{export_command}`." if export_command else "",
        "",
        "## Load it",
        "",
        load,
    ]
    return "\n".join(front + body)


def export(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    merge: bool = False,
    dtype: str = "fp32",
    base: str | None = None,
    base_name: str | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Write the export of ``adapter_dir`` to ``out`` (see the module doc); returns ``out``."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    if dtype not in DTYPES:
        raise UserError("--dtype", f"expected one of {list(DTYPES)}, got {dtype!r}")
    config, extra = read_adapter_config(adapter_dir)
    method = extra.get("method", config.method)
    if not merge and config.method != "lora":
        raise UserError(
            adapter_dir,
            f"{config.method} adapters have no PEFT equivalent (several B heads per layer); export --merge "
            "works where merging is exact (mlora, fixed head_weights), otherwise run them with mtlora",
        )
    _check_out(out, overwrite)
    results, config_file = _run_files(adapter_dir)
    tasks = list(extra.get("task_names") or [])
    portable = portable_base_name(base or extra.get("base_model"), base_name)
    train_command = "mtlora train training_config.yaml" if config_file is not None else None
    card = model_card(base_name=portable, method=method, tasks=tasks, results=results, merged=merge, dtype=dtype,
                      train_command=train_command, export_command=command)
    marker = {"adapter": str(adapter_dir.resolve()), "merged": merge, "dtype": dtype, "method": method,
              "base_model": portable}

    if merge:
        from mtlora.adapters import adapter_layers, unload
        from mtlora.train import load_trained

        model, tokenizer, _ = load_trained(adapter_dir, base=base, device="cpu", precision="fp32")
        reasons = [(name, layer.can_merge()) for name, layer in adapter_layers(model)]
        refused = [(name, why) for name, why in reasons if why is not None]
        if refused:
            name, why = refused[0]
            raise UserError(adapter_dir, f"cannot export --merge: merging is not exact ({name}: {why})")
        model = unload(model, merge=True)
        model.to(DTYPES[dtype])
        if portable:
            model.config._name_or_path = portable

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            _write_common(tmp, card, marker, config_file)
    else:
        peft_cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
        peft_cfg["base_model_name_or_path"] = portable
        peft_cfg["inference_mode"] = True
        tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
        tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in tensors.items()}

        def write(tmp: Path) -> None:
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_cfg, indent=2) + "\n")
            _write_common(tmp, card, marker, config_file)

    atomic_write_dir(out, write)
    return out


def per_task_lora(tensors: dict[str, torch.Tensor], config, task_names: list[str],
                  mean_weights: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, dict]:
    """``{task: PEFT LoRA tensors}`` of a multi-head adapter with input-independent head weights, or
    (``mean_weights``: task -> layer -> (N,)) with a token router's per-task mean weights."""
    router = getattr(config, "router", None)
    fixed = config.fixed_weights() if hasattr(config, "fixed_weights") else None
    if router in ("token", "task+token") and fixed is None and mean_weights is None:
        raise UserError("--per-task", f"router: {router} weighs the heads per token, so a per-task adapter would "
                                      "be an approximation; pass --approximate to build it and measure it, or "
                                      "train with router: task or mean for an exact export")
    layers = sorted({k.rsplit(".lora_B", 1)[0] for k in tensors if k.endswith(".lora_B")})
    if not layers:
        raise UserError("--per-task", "no multi-head layers in this adapter (a plain LoRA is one adapter already)")
    scale = float(config.scaling)
    out: dict[str, dict] = {}
    for t, task in enumerate(task_names):
        state = {}
        for layer in layers:
            heads = tensors[f"{layer}.lora_B"].double()  # (N, d_out, r)
            if mean_weights is not None and fixed is None:
                w = mean_weights[task][layer.removeprefix(PEFT_PREFIX)].double()
            elif f"{layer}.task_router" in tensors:
                w = torch.softmax(tensors[f"{layer}.task_router"].double()[t], dim=-1)
            else:
                w = torch.tensor(fixed, dtype=torch.float64)
            a = tensors[f"{layer}.lora_A.weight"].double()
            b = scale * torch.einsum("n,nor->or", w, heads)
            if f"{layer}.offset_A" in tensors:
                a = torch.cat([a, tensors[f"{layer}.offset_A"].double()])
                b = torch.cat([b, -scale * tensors[f"{layer}.offset_B"].double()], dim=1)
            state[f"{layer}.lora_A.weight"] = a.float().contiguous()
            state[f"{layer}.lora_B.weight"] = b.float().contiguous()
        out[task] = state
    return out


def _approximate(adapter_dir: Path, base: str | None, tasks: list[str], max_per_task: int, echo):
    """A token router's per-task mean weights over the run's training tokens, and the eval examples."""
    from mtlora.analysis import router_weights_by_task
    from mtlora.config import load_config
    from mtlora.data.tasks import load_tasks
    from mtlora.train import load_trained, training_examples

    _, config_file = _run_files(adapter_dir)
    if config_file is None:
        raise UserError(adapter_dir, "--approximate needs the training run's config.yaml beside the adapter "
                                     "(its tasks give the training tokens to average the router over)")
    run_config = load_config(config_file)
    model, tokenizer, _ = load_trained(adapter_dir, base=base)
    train_rows = [ex for ex in training_examples(run_config)]
    by_task: dict[str, list] = {}
    for ex in train_rows:
        if len(by_task.setdefault(ex.task, [])) < max_per_task:
            by_task[ex.task].append(ex)
    echo(f"averaging the router over {sum(map(len, by_task.values()))} training examples "
         f"({max_per_task} per task at most)")
    weights = router_weights_by_task(model, tokenizer, [ex for t in tasks for ex in by_task.get(t, [])],
                                     task_ids={t: i for i, t in enumerate(tasks)})
    missing = [t for t in tasks if t not in weights]
    if missing:
        raise UserError(adapter_dir, f"no training examples of task {missing[0]!r} in the run's config")
    evals = load_tasks(run_config.tasks, "eval", max_per_task)
    return model, tokenizer, weights, evals


def _measure(model, tokenizer, adapters: dict[str, dict], peft_cfgs: dict[str, dict], evals, tasks, base, echo):
    """Accuracy per task: the original adapter beside its exported per-task approximation."""
    from mtlora.adapters import inject_adapters, make_adapter_config
    from mtlora.adapters.io import load_adapter_weights
    from mtlora.evaluate import evaluate
    from mtlora.models import load_model

    original = evaluate(model, tokenizer, evals, progress=False, task_names=tasks).per_task
    rows = {}
    for task in tasks:
        exs = [ex for ex in evals if ex.task == task]
        if not exs:
            continue
        plain, _ = load_model(base)
        cfg = peft_cfgs[task]
        inject_adapters(plain, make_adapter_config("lora", r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0,
                                                   target_modules=cfg["target_modules"]))
        with tempfile.TemporaryDirectory() as tmp:
            save_file(adapters[task], str(Path(tmp) / WEIGHTS_NAME))
            load_adapter_weights(plain, tmp)
        exported = evaluate(plain.eval(), tokenizer, exs, progress=False).per_task[task]
        metric = "acc" if "acc" in exported else "exact_match"
        rows[task] = {"metric": metric, "n": len(exs), "original": original[task][metric],
                      "exported": exported[metric]}
        echo(f"{task}: {metric} original {100 * rows[task]['original']:.1f}, exported "
             f"{100 * rows[task]['exported']:.1f} (n = {len(exs)}, eval split)")
    return rows


def export_per_task(adapter_dir: str | Path, out: str | Path, *, base: str | None = None,
                    base_name: str | None = None, overwrite: bool = False, command: str | None = None,
                    approximate: bool = False, max_per_task: int = 64, echo=print) -> Path:
    """``OUT/<task>/``: one stock PEFT LoRA folder per task (see the module doc); returns ``out``."""
    adapter_dir, out = Path(adapter_dir), Path(out)
    config, extra = read_adapter_config(adapter_dir)
    tasks = list(extra.get("task_names") or [])
    if not tasks:
        raise UserError(adapter_dir, "no task_names saved with this adapter; per-task export needs them")
    _check_out(out, overwrite)
    tensors = load_file(str(adapter_dir / WEIGHTS_NAME))
    mean_weights = measured = None
    if approximate and getattr(config, "router", None) in ("token", "task+token") and config.fixed_weights() is None:
        model, tokenizer, mean_weights, evals = _approximate(adapter_dir, base, tasks, max_per_task, echo)
    per_task = per_task_lora(tensors, config, tasks, mean_weights)
    source = json.loads((adapter_dir / CONFIG_NAME).read_text())
    portable = portable_base_name(base or extra.get("base_model"), base_name)
    results, config_file = _run_files(adapter_dir)
    method = extra.get("method", config.method)

    peft_cfgs = {}
    for task, state in per_task.items():
        rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
        peft_cfgs[task] = {
                "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": portable,
                "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "use_rslora": False,
                "target_modules": sorted({k.split(".")[-3] for k in state}), "bias": "none",
                "fan_in_fan_out": source.get("fan_in_fan_out", False), "init_lora_weights": True,
                "inference_mode": True, "modules_to_save": None,
            }
    if mean_weights is not None:
        measured = _measure(model, tokenizer, per_task, peft_cfgs, evals, tasks,
                            base or extra.get("base_model") or "smollm2-135m", echo)

    def write(tmp: Path) -> None:
        for task, state in per_task.items():
            folder = tmp / task
            folder.mkdir()
            save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt"})
            (folder / CONFIG_NAME).write_text(json.dumps(peft_cfgs[task], indent=2) + "\n")
            card = model_card(base_name=portable, method=f"{method} (task {task})", tasks=[task], results=results,
                              merged=False, dtype="fp32", train_command=None, export_command=command)
            if measured and task in measured:
                m = measured[task]
                card += (f"\nApproximation of a token router by its mean weights on this task's training tokens: "
                         f"{m['metric']} {100 * m['exported']:.1f} here vs {100 * m['original']:.1f} for the "
                         f"original adapter (eval split, n = {m['n']}).\n")
            (folder / "README.md").write_text(card)
        marker = {"adapter": str(adapter_dir.resolve()), "per_task": list(per_task), "method": method,
                  "base_model": portable, "exact": mean_weights is None, "measured": measured}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    atomic_write_dir(out, write)
    return out


def _write_common(tmp: Path, card: str, marker: dict[str, Any], config_file: Path | None) -> None:
    (tmp / "README.md").write_text(card)
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if config_file is not None:
        shutil.copyfile(config_file, tmp / "training_config.yaml")
