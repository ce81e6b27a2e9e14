"""Training loops: the report generator (teacher forcing) and the manipulator (cycle loss).

Both loops are plain and short on purpose; they sample batches from tensors built once from
phantoms, show progress with rich, and return a small history for the results file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

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
    opt = torch.optim.AdamW(gen.parameters(), lr=lr, weight_decay=0.01)
    gen.train()
    g = torch.Generator(device=device).manual_seed(seed)
    losses: list[float] = []
    t0, c0 = time.time(), time.process_time()
    done = 0
    with _progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        while (at := _schedule(done, steps, c0, max_seconds)) is not None:
            idx = torch.randint(len(phantoms), (batch_size,), generator=g, device=device)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(at, steps, lr)
            loss = gen.loss(augment(x[idx], gen.cfg.aug_noise, g), tokens[idx], labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            done += 1
            bar.update(task, completed=at + 1, info=f"loss {np.mean(losses[-20:]):.3f}")
    gen.eval()
    return {"steps": done, "max_steps": steps, "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
            "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}


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
    opt = torch.optim.AdamW(manip.parameters(), lr=lr, weight_decay=0.0)
    manip.train()
    hist: dict[str, list[float]] = {}
    t0, c0 = time.time(), time.process_time()
    texts = list(base) if base is not None else [write_report(p.findings) for p in phantoms]
    findings = [label_report(t) for t in texts]
    done = 0
    with _progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        while (at := _schedule(done, steps, c0, max_seconds)) is not None:
            idx = rng.integers(len(phantoms), size=batch_size)
            reports, base_reports, ident = [], [], []
            for i in idx:
                f = findings[int(i)]
                e = None if rng.random() < identity_frac else random_edit(f, rng)
                reports.append(edit_text(texts[int(i)], e) if e else texts[int(i)])
                base_reports.append(texts[int(i)])
                ident.append(e is None)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(at, steps, lr)
            cond = manip.encode_reports(reports, base_reports)
            batch = x_all[torch.from_numpy(idx).to(device)]
            losses = manipulator_losses(manip, gen, batch, reports, cond, torch.tensor(ident, device=device), weights)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(manip.parameters(), 1.0)
            opt.step()
            for k, v in losses.items():
                hist.setdefault(k, []).append(float(v.detach()))
            done += 1
            bar.update(task, completed=at + 1, info=f"cycle {np.mean(hist['cycle'][-20:]):.2f} l1 {np.mean(hist['l1'][-20:]):.4f}")
    manip.eval()
    out = {k: float(np.mean(v[-50:])) for k, v in hist.items()}
    out.update(steps=done, max_steps=steps, seconds=time.time() - t0, cpu_seconds=time.process_time() - c0)
    return out


def generator_reports(gen: ReportGenerator, phantoms: Sequence[Phantom]) -> list[str]:
    """The reports G writes for ``phantoms`` (what the manipulator's edits start from)."""
    return gen.generate(images_tensor(phantoms, device_of(gen)))
