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

from .generator import CXRReportGenerator, cosine_lr, freeze
from .manipulator import Manipulator, manipulator_losses, pad_tokens
from .phantoms import Phantom
from .reports import random_edit, write_report


def images_tensor(phantoms: Sequence[Phantom]) -> torch.Tensor:
    return torch.from_numpy(np.stack([p.image for p in phantoms]))[:, None]


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
) -> dict:
    """Teacher-forced cross-entropy on canonical reports of the phantoms' true findings."""
    torch.manual_seed(seed)
    x = images_tensor(phantoms)
    tokens = pad_tokens([gen.tokenizer.encode(write_report(p.findings)) for p in phantoms])
    opt = torch.optim.AdamW(gen.parameters(), lr=lr, weight_decay=0.01)
    gen.train()
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.time()
    with _progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        for step in range(steps):
            idx = torch.randint(len(phantoms), (batch_size,), generator=g)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr)
            loss = gen.loss(x[idx], tokens[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(task, advance=1, info=f"loss {np.mean(losses[-20:]):.3f}")
    gen.eval()
    return {"steps": steps, "final_loss": float(np.mean(losses[-50:])), "seconds": time.time() - t0}


def train_manipulator(
    manip: Manipulator,
    gen: CXRReportGenerator,
    phantoms: Sequence[Phantom],
    steps: int,
    batch_size: int = 24,
    lr: float = 2e-3,
    identity_frac: float = 0.25,
    weights: dict[str, float] | None = None,
    seed: int = 0,
    desc: str = "manipulator",
    progress: bool = True,
) -> dict:
    """Train M against the frozen generator G with cycle + proximity + identity losses.

    Each example is a phantom x with its canonical report t and either a random edit t' (cycle
    loss: G(x + M(x, t')) should say t') or, with probability ``identity_frac``, t' = t (identity
    loss: M(x, t) should be ~0).
    """
    freeze(gen)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x_all = images_tensor(phantoms)
    opt = torch.optim.AdamW(manip.parameters(), lr=lr, weight_decay=0.0)
    manip.train()
    hist: dict[str, list[float]] = {}
    t0 = time.time()
    with _progress(progress) as bar:
        task = bar.add_task(desc, total=steps, info="")
        for step in range(steps):
            idx = rng.integers(len(phantoms), size=batch_size)
            reports, ident = [], []
            for i in idx:
                f = phantoms[int(i)].findings
                e = None if rng.random() < identity_frac else random_edit(f, rng)
                reports.append(write_report(e.apply(f) if e else f))
                ident.append(e is None)
            tok = pad_tokens([gen.tokenizer.encode(r) for r in reports])
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, steps, lr)
            cond = manip.encode_reports(reports)
            losses = manipulator_losses(manip, gen, x_all[torch.from_numpy(idx)], tok, cond, torch.tensor(ident), weights)
            opt.zero_grad(set_to_none=True)
            losses["total"].backward()
            torch.nn.utils.clip_grad_norm_(manip.parameters(), 1.0)
            opt.step()
            for k, v in losses.items():
                hist.setdefault(k, []).append(float(v.detach()))
            bar.update(task, advance=1, info=f"cycle {np.mean(hist['cycle'][-20:]):.2f} l1 {np.mean(hist['l1'][-20:]):.4f}")
    manip.eval()
    out = {k: float(np.mean(v[-50:])) for k, v in hist.items()}
    out.update(steps=steps, seconds=time.time() - t0)
    return out
