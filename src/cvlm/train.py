"""Training loops: the report generator (teacher forcing) and the manipulator (cycle loss).

Both loops are plain and short on purpose; they sample batches from tensors built once from
phantoms, show progress with rich, and return a small history for the results file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from .devices import device_of
from .generator import CXRReportGenerator, ReportGenerator, augment, cosine_lr, freeze, pad_tokens
from .manipulator import Manipulator, manipulator_losses
from .phantoms import Phantom
from .report_text import edit_text, label_report, random_edit, report_vector, write_report


def images_tensor(phantoms: Sequence[Phantom], device: torch.device | str | None = None) -> torch.Tensor:
    """The phantoms' images as one (N, 1, S, S) batch on ``device`` (the CPU by default)."""
    x = torch.from_numpy(np.stack([p.image for p in phantoms]))[:, None]
    return x if device is None else x.to(device)


def _schedule(step: int, steps: int, t0: float, max_seconds: float | None) -> int | None:
    """The step at which the learning-rate schedule stands, or ``None`` when training must stop.

    Training runs ``steps`` steps or until ``max_seconds`` of this process's CPU time have passed
    (``time.process_time``: on a machine shared with other work the same budget buys the same
    training, where wall time would buy less the busier the machine is), whichever
    comes first; the cosine schedule follows whichever is further along, so a run cut short by
    its time budget still anneals its learning rate instead of stopping at full rate."""
    if step >= steps:
        return None
    if max_seconds is None:
        return step
    frac = (time.process_time() - t0) / max(max_seconds, 1e-9)
    if frac >= 1.0:
        return None
    return max(step, int(frac * steps))


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), disable=not enabled, transient=False,
    )  # fmt: skip


def _fit(
    module: torch.nn.Module, step_losses: Callable[[], dict[str, torch.Tensor]], steps: int, lr: float,
    weight_decay: float, max_seconds: float | None, desc: str, progress: bool,
    info: Callable[[dict[str, list[float]]], str],
) -> tuple[dict[str, list[float]], dict]:
    """The loop both trainings share: AdamW on ``module``'s trainable parameters, a cosine learning
    rate, gradient clipping at 1, the step and time budget of ``_schedule`` and a progress bar.

    ``step_losses()`` draws one batch and returns named losses; ``"total"`` is the one minimised.
    Returns the per-step history of every loss and the run's counts and times."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    module.train()
    hist: dict[str, list[float]] = {}
    t0, c0 = time.time(), time.process_time()
    done = 0
    with _progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        while (at := _schedule(done, steps, c0, max_seconds)) is not None:
            losses = step_losses()
            for group in opt.param_groups:
                group["lr"] = cosine_lr(at, steps, lr)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            for k, v in losses.items():
                hist.setdefault(k, []).append(float(v.detach()))
            done += 1
            bar.update(task, completed=at + 1, info=info(hist))
    module.eval()
    return hist, {"steps": done, "max_steps": steps, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}


def train_generator(
    gen: CXRReportGenerator,
    phantoms: Sequence[Phantom],
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    desc: str = "generator",
    progress: bool = True,
    max_seconds: float | None = None,
) -> dict:
    """Teacher-forced cross-entropy on canonical reports of the phantoms' true findings (plus the
    generator's auxiliary finding loss); at most ``steps`` steps and ``max_seconds`` seconds.
    The data go once to the generator's device and batches are drawn there (the random stream is
    the device's own, so a CUDA run draws other batches than a CPU run of the same seed)."""
    torch.manual_seed(seed)
    device = device_of(gen)
    x = images_tensor(phantoms, device)
    texts = [write_report(p.findings) for p in phantoms]
    tokens = pad_tokens([gen.tokenizer.encode(t) for t in texts], device)
    labels = torch.tensor([report_vector(t) for t in texts], dtype=torch.float32).to(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def step_losses() -> dict[str, torch.Tensor]:
        idx = torch.randint(len(phantoms), (batch_size,), generator=g, device=device)
        return {"total": gen.loss(augment(x[idx], gen.cfg.aug_noise, g), tokens[idx], labels[idx])}

    hist, run = _fit(gen, step_losses, steps, lr, 0.01, max_seconds, desc, progress,
                     info=lambda h: f"loss {np.mean(h['total'][-20:]):.3f}")
    losses = hist.get("total", [])
    return {"final_loss": float(np.mean(losses[-50:])) if losses else float("nan"), **run}


def train_manipulator(
    manip: Manipulator,
    gen: ReportGenerator,
    phantoms: Sequence[Phantom],
    steps: int,
    batch_size: int = 24,
    lr: float = 2e-3,
    identity_frac: float = 0.25,
    weights: dict[str, float] | None = None,
    seed: int = 0,
    desc: str = "manipulator",
    progress: bool = True,
    max_seconds: float | None = None,
    base: Sequence[str] | None = None,
) -> dict:
    """Train M against the frozen generator G with cycle + proximity + identity losses.

    Each example is a phantom x with its report t and either a random edit t' (cycle loss:
    G(x + M(x, t')) should say t') or, with probability ``identity_frac``, t' = t (identity loss:
    M(x, t) should be ~0). ``base`` gives the report t of each phantom; the demo passes the reports
    *G itself writes* for the training images (``generator_reports``), as at evaluation, where
    edits are applied to G's own text (``edit_text``). Without it, the canonical reports of the
    phantoms' true findings are used. At most ``steps`` steps and ``max_seconds`` seconds.
    """
    freeze(gen)
    manip.loss_weights = dict(weights or {})
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = device_of(manip)
    x_all = images_tensor(phantoms, device)
    texts = list(base) if base is not None else [write_report(p.findings) for p in phantoms]
    findings = [label_report(t) for t in texts]

    def step_losses() -> dict[str, torch.Tensor]:
        idx = rng.integers(len(phantoms), size=batch_size)
        reports, base_reports, ident = [], [], []
        for i in idx:
            f = findings[int(i)]
            e = None if rng.random() < identity_frac else random_edit(f, rng)
            reports.append(edit_text(texts[int(i)], e) if e else texts[int(i)])
            base_reports.append(texts[int(i)])
            ident.append(e is None)
        cond = manip.encode_reports(reports, base_reports)
        batch = x_all[torch.from_numpy(idx).to(device)]
        return manipulator_losses(manip, gen, batch, reports, cond, torch.tensor(ident, device=device), weights)

    hist, run = _fit(manip, step_losses, steps, lr, 0.0, max_seconds, desc, progress,
                     info=lambda h: f"cycle {np.mean(h['cycle'][-20:]):.2f} l1 {np.mean(h['l1'][-20:]):.4f}")
    return {**{k: float(np.mean(v[-50:])) for k, v in hist.items()}, **run}


def generator_reports(gen: ReportGenerator, phantoms: Sequence[Phantom]) -> list[str]:
    """The reports G writes for ``phantoms`` (what the manipulator's edits start from)."""
    return gen.generate(images_tensor(phantoms, device_of(gen)))
