"""Align-LoRA: statistics grouped by explicit task ids, gradients on every A (with checkpointing and
accumulation), alignment that actually aligns, PEFT load + merge, config, plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import align_repo_port as repo
import pytest
import torch

from mtlora.adapters import (
    LoraLinear,
    adapter_layers,
    inject_adapters,
    make_adapter_config,
    merge_adapters,
    save_adapter,
    trainable_parameters,
)
from mtlora.config import AlignConfig, load_config
from mtlora.data.collate import TaskCollator
from mtlora.data.example import Example
from mtlora.data.samplers import make_batch_sampler
from mtlora.errors import UserError
from mtlora.objectives.align import (
    AlignObjective,
    capture_features,
    inter_task_kl,
    mmd_loss,
    mmd_loss_per_position,
    plot_align_history,
    symmetric_kl,
    task_statistics,
)
from mtlora.objectives.lm import IGNORE_INDEX, supervised_hidden
from mtlora.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]

# four "tasks" with distinct vocabularies, so their adapter features differ
TEXTS = {
    0: [
        "the cat sat on the mat",
        "the lazy dog is tired and warm",
        "the quick brown fox jumps",
        "the cat is happy",
    ],
    1: [
        "Question: Which gas do plants absorb?",
        "Question: Is the sky blue?",
        "Question: Which fox?",
        "Question: A B",
    ],
    2: ["0 1 2 3 4 5 6 7 8 9", "9 8 7 + 6 = 5", "1 + 2 = 3 ; 4", "7 7 7 : 0 0"],
    3: [
        "Premise: The man turned on the faucet.",
        "Hypothesis: Water flowed.",
        "Premise: spout",
        "Hypothesis: dog",
    ],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Toy tensors: one intra-op thread is several times faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(tok, rows: list[tuple[int, str]]) -> dict[str, torch.Tensor]:
    enc = tok([text for _, text in rows], return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
    for i in range(len(rows)):
        end = int(enc["attention_mask"][i].sum())
        labels[i, end - 2 : end] = enc["input_ids"][i, end - 2 : end]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
        "task_ids": torch.tensor([t for t, _ in rows]),
    }


def _mixed_batch(tok, which: int = 0, tasks=(0, 1, 2, 3)) -> dict[str, torch.Tensor]:
    rows = [(t, TEXTS[t][(which + j) % 4]) for j in range(2) for t in tasks]
    return _batch(tok, rows)


def _model(dropout: float = 0.0, seed: int = 0):
    model, tok = tiny_model("llama")
    torch.manual_seed(seed)
    inject_adapters(
        model, make_adapter_config("lora", r=4, alpha=8, dropout=dropout, target_modules="all-linear")
    )
    return model, tok


def _a_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in trainable_parameters(model)
        if "lora_A" in n
    }


# --- statistics and distances ----------------------------------------------------------------------
def test_rows_are_grouped_by_explicit_task_ids_and_padding_is_masked():
    torch.manual_seed(0)
    task_ids = torch.tensor([2, 0, 1, 0, 2, 1])  # not contiguous: chunking by position would mix them
    feats = [torch.randn(6, 5, 3), torch.randn(6, 5, 2)]
    mask = torch.ones(6, 5)
    mask[1, 3:] = 0
    mask[4, 2:] = 0
    stats = task_statistics(feats, task_ids, mask)
    x = torch.cat(feats, -1)
    for t in range(3):
        rows = [i for i in range(6) if task_ids[i] == t]
        toks = torch.cat([x[i][mask[i].bool()] for i in rows])
        torch.testing.assert_close(stats.sum[t], toks.sum(0))
        torch.testing.assert_close(stats.sumsq[t], (toks**2).sum(0))
        assert stats.count[t] == toks.shape[0]
    assert stats.layer_of_channel.tolist() == [0, 0, 0, 1, 1]

    kl = inter_task_kl(feats, task_ids, mask)
    poisoned = [f.clone() for f in feats]
    for f in poisoned:
        f[mask == 0] = 1e6  # padding content must not matter
    torch.testing.assert_close(inter_task_kl(poisoned, task_ids, mask), kl)
    perm = torch.tensor([5, 3, 0, 1, 4, 2])  # moving rows with their ids changes nothing
    torch.testing.assert_close(inter_task_kl([f[perm] for f in feats], task_ids[perm], mask[perm]), kl)
    swapped = task_ids.clone()
    swapped[[0, 1]] = swapped[[1, 0]]  # relabelling rows does
    assert not torch.allclose(inter_task_kl(feats, swapped, mask), kl)


def test_symmetric_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu_p, mu_q = torch.randn(7), torch.randn(7)
    var_p, var_q = torch.rand(7) + 0.1, torch.rand(7) + 0.1
    p = torch.distributions.Normal(mu_p, var_p.sqrt())
    q = torch.distributions.Normal(mu_q, var_q.sqrt())
    expected = 0.5 * (torch.distributions.kl_divergence(p, q) + torch.distributions.kl_divergence(q, p))
    torch.testing.assert_close(symmetric_kl(mu_p, var_p, mu_q, var_q), expected)


def test_pooled_kl_and_pair_reduction_match_a_direct_computation():
    torch.manual_seed(1)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    feats = [torch.randn(6, 4, 3) + task_ids.view(-1, 1, 1), torch.randn(6, 4, 3)]
    eps = 1e-5
    per_layer_pairs = []
    for f in feats:
        groups = [f[task_ids == t].reshape(-1, 3) for t in range(3)]
        mus = [g.mean(0) for g in groups]
        vs = [g.var(0, unbiased=False) + eps for g in groups]
        per_layer_pairs.append(
            torch.stack(
                [symmetric_kl(mus[i], vs[i], mus[j], vs[j]).sum() for i, j in [(0, 1), (0, 2), (1, 2)]]
            )
        )
    pairs = torch.stack(per_layer_pairs)  # (L, P)
    torch.testing.assert_close(inter_task_kl(feats, task_ids, None, eps=eps), pairs.mean(1).mean())
    torch.testing.assert_close(
        inter_task_kl(feats, task_ids, None, eps=eps, reduction="sum"), pairs.sum(1).mean()
    )


def test_per_position_statistics_match_a_direct_computation():
    torch.manual_seed(2)
    task_ids = torch.tensor([1, 0, 1, 0])
    feats = [torch.randn(4, 3, 2)]
    mask = torch.ones(4, 3)
    mask[2, 2] = 0  # task 1 has a single row at position 2: that position is left out
    eps = 1e-5
    vals = []
    for pos in range(2):
        x = feats[0].double()  # exact reference: few rows per position make the variances small
        g0, g1 = x[task_ids == 0, pos], x[task_ids == 1, pos]
        vals.append(
            symmetric_kl(
                g0.mean(0), g0.var(0, unbiased=False) + eps, g1.mean(0), g1.var(0, unbiased=False) + eps
            ).sum()
        )
    got = inter_task_kl(feats, task_ids, mask, statistics="per_position", eps=eps)
    torch.testing.assert_close(got, torch.stack(vals).mean().float(), rtol=1e-4, atol=1e-6)


def test_reduce_fn_sums_statistics_of_processes_like_one_big_batch():
    """The data-parallel hook: summing (sum, sumsq, count) over two halves == the whole batch."""
    torch.manual_seed(3)
    task_ids = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3])
    feats = [torch.randn(8, 5, 4)]
    mask = torch.ones(8, 5)
    mask[6, 3:] = 0
    full = inter_task_kl(feats, task_ids, mask)
    other = task_statistics([feats[0][4:]], task_ids[4:], mask[4:], num_tasks=4)

    def all_reduce(stats):
        stats.sum, stats.sumsq, stats.count = (
            stats.sum + other.sum,
            stats.sumsq + other.sumsq,
            stats.count + other.count,
        )
        return stats

    half = inter_task_kl([feats[0][:4]], task_ids[:4], mask[:4], num_tasks=4, reduce_fn=all_reduce)
    torch.testing.assert_close(half, full)


def test_mmd_is_zero_for_equal_groups_and_matches_a_naive_estimate():
    torch.manual_seed(4)
    same = torch.randn(1, 6, 3).expand(4, 6, 3).contiguous()
    ids = torch.tensor([0, 1, 0, 1])
    assert mmd_loss([same], ids, tokens_per_task=100).abs() < 1e-5

    x, y = torch.randn(5, 3), torch.randn(5, 3) + 1.0
    feats = [torch.stack([x, y]).contiguous()]  # row 0 task 0, row 1 task 1
    got = mmd_loss(feats, torch.tensor([0, 1]), relative=False, bandwidths=[0.5, 2.0], tokens_per_task=100)

    def k(a, b):
        d2 = torch.cdist(a, b) ** 2
        return sum(torch.exp(-d2 / (2 * s)) for s in (0.5, 2.0))

    naive = k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()
    torch.testing.assert_close(got, naive)
    assert got > 0.1
    assert mmd_loss(feats, torch.tensor([0, 1]), tokens_per_task=3) is not None  # subsampled still works


def _repo_groups(n_tasks=3, rows=4, positions=5, r=3, seed=0):
    """Features in the released code's layout: rows of task k contiguous, no padding."""
    torch.manual_seed(seed)
    groups = [torch.randn(rows, positions, r) * (1 + k) + k for k in range(n_tasks)]
    ids = torch.arange(n_tasks).repeat_interleave(rows)
    return groups, torch.cat(groups), ids


def test_repo_kl_statistics_match_a_port_of_the_released_code():
    """statistics: per_position, variance: unbiased, eps: 1e-8 is custom.py's KL_Trainer loss."""
    layers = [_repo_groups(seed=s) for s in range(2)]
    ours = inter_task_kl(
        [x for _, x, _ in layers], layers[0][2], statistics="per_position", unbiased=True, eps=1e-8
    )
    theirs = repo.representation_loss([g for g, _, _ in layers], repo.kl_loss)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    biased = inter_task_kl([x for _, x, _ in layers], layers[0][2], statistics="per_position", eps=1e-8)
    assert not torch.allclose(biased, theirs, rtol=1e-3)  # the variance convention matters here


def test_repo_mmd_kernel_matches_a_port_of_the_released_code():
    layers = [_repo_groups(seed=s, r=2) for s in range(2)]
    ours = mmd_loss_per_position([x * 0.01 for _, x, _ in layers], layers[0][2])
    theirs = repo.representation_loss([[g * 0.01 for g in gs] for gs, _, _ in layers], repo.maximum_mean_discrepancy)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert ours > 0.1
    # padding masked: a padded position does not count, so padding rows with junk changes nothing
    feats, ids = layers[0][1], layers[0][2]
    padded = torch.cat([feats, torch.full((feats.shape[0], 2, feats.shape[2]), 7.0)], dim=1)
    mask = torch.cat([torch.ones(feats.shape[:2]), torch.zeros(feats.shape[0], 2)], dim=1)
    torch.testing.assert_close(mmd_loss_per_position([padded * 0.01], ids, mask), mmd_loss_per_position([feats * 0.01], ids))
    assert mmd_loss_per_position([feats], torch.zeros_like(ids)) is None


# --- gradients, checkpointing, accumulation ------------------------------------------------------------
def _enable_checkpointing(model, reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


@pytest.mark.parametrize(
    "loss, checkpointing, accum",
    [("kl", False, 1), ("kl", True, 1), ("kl", False, 2), ("kl", True, 2), ("mmd", False, 2)],
)
def test_alignment_gives_every_a_a_gradient(loss, checkpointing, accum):
    """B = 0 at init, so the LM loss alone gives A no gradient: any gradient on A is the alignment's."""
    grads = {}
    for lam in (0.0, 1.0):
        model, tok = _model()
        if checkpointing:
            _enable_checkpointing(model, reentrant=False)
        model.train()
        objective = AlignObjective(AlignConfig(loss=loss, lam=lam))
        for micro in range(accum):
            loss_value, logs = objective(model, _mixed_batch(tok, which=micro))
            (loss_value / accum).backward()
            assert logs["align_skipped"] == 0.0 and logs["align_loss"] > 0
        grads[lam] = _a_grads(model)
    assert len(grads[1.0]) == len(list(adapter_layers(model)))
    assert all(g.abs().sum() == 0 for g in grads[0.0].values())  # the control: this test can fail
    assert all(g.abs().sum() > 0 for g in grads[1.0].values()), [
        n for n, g in grads[1.0].items() if g.abs().sum() == 0
    ]


def test_checkpoint_recomputation_never_captures():
    model, tok = _model()
    _enable_checkpointing(model, reentrant=False)
    model.train()
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    for _, layer in adapter_layers(model):
        layer.register_forward_pre_hook(count)
    captured: list = []
    h, _ = supervised_hidden(model, _mixed_batch(tok), capture=captured)
    n_layers = len(list(adapter_layers(model)))
    assert calls["n"] == n_layers
    (h.sum() + sum(phi.sum() for _, phi in captured)).backward()
    assert calls["n"] > n_layers  # recomputation did happen (a hook would have fired twice) ...
    assert len(captured) == n_layers  # ... but nothing was captured again
    assert len({name for name, _ in captured}) == n_layers


def test_reentrant_checkpointing_is_an_error_not_a_constant():
    model, tok = _model()
    _enable_checkpointing(model, reentrant=True)
    model.train()
    with pytest.raises(RuntimeError, match="no gradient.*use_reentrant"):
        AlignObjective(AlignConfig(lam=0.2))(model, _mixed_batch(tok))


def test_micro_steps_do_not_leak_features():
    model, tok = _model()
    model.eval()
    objective = AlignObjective(AlignConfig(lam=0.5))
    b1, b2 = _mixed_batch(tok, 0, tasks=(0, 1)), _mixed_batch(tok, 1, tasks=(2, 3))
    alone, _ = objective(model, b2)
    objective(model, b1)
    after, logs = objective(model, b2)
    torch.testing.assert_close(after, alone)
    assert logs["align_tasks"] == 2.0


def test_fewer_than_two_tasks_is_skipped_and_counted_or_an_error():
    model, tok = _model()
    model.train()
    one_task = _batch(tok, [(1, TEXTS[1][0]), (1, TEXTS[1][1])])
    objective = AlignObjective(AlignConfig(lam=0.2))
    loss, logs = objective(model, one_task)
    assert logs["align_skipped"] == 1.0 and logs["align_loss"] == 0.0
    torch.testing.assert_close(loss, logs["lm_loss"])
    objective(model, _mixed_batch(tok))
    assert (objective.skipped, objective.calls) == (1, 2)
    with pytest.raises(UserError, match="require_all_steps"):
        AlignObjective(AlignConfig(lam=0.2, require_all_steps=True))(model, one_task)


def test_task_balanced_sampler_batches_are_never_skipped():
    model, tok = _model()
    model.train()
    examples = [
        Example(task=f"t{t}", prompt=text, answer="yes") for t, texts in TEXTS.items() for text in texts
    ]
    collator = TaskCollator(tok, [f"t{t}" for t in TEXTS], max_length=32)
    sampler = make_batch_sampler(
        "task_balanced", [ex.task for ex in examples], batch_size=4, tasks_per_batch=2
    )
    objective = AlignObjective(AlignConfig(lam=0.2, require_all_steps=True))
    for indices in list(sampler)[:3]:
        _, logs = objective(model, collator([examples[i] for i in indices]))
        assert logs["align_tasks"] == 2.0
    assert objective.skipped == 0


# --- the point of it all ------------------------------------------------------------------------------
VARIANTS = {
    "kl_pooled": AlignConfig(loss="kl"),
    "kl_repo": AlignConfig(loss="kl", statistics="per_position", variance="unbiased", eps=1e-8),
    "mmd_pooled": AlignConfig(loss="mmd"),
    "mmd_repo": AlignConfig(loss="mmd", mmd_kernel="repo"),
}


def _own_measure(cfg: AlignConfig, feats, batch) -> float:
    ids, mask = batch["task_ids"], batch["attention_mask"]
    if cfg.loss == "kl":
        return float(inter_task_kl(feats, ids, mask, statistics=cfg.statistics, eps=cfg.eps,
                                   unbiased=cfg.variance == "unbiased"))
    if cfg.mmd_kernel == "repo":
        return float(mmd_loss_per_position(feats, ids, mask))
    return float(mmd_loss(feats, ids, mask, bandwidths=cfg.mmd_bandwidths, relative=cfg.mmd_relative,
                          tokens_per_task=cfg.mmd_tokens_per_task))


def _train(lam: float, steps: int = 10, variant: str = "kl_pooled") -> tuple[float, float]:
    """(held-out pooled inter-task KL, held-out value of the variant's own alignment loss)."""
    model, tok = _model(dropout=0.0, seed=0)
    model.train()
    cfg = dataclasses.replace(VARIANTS[variant], lam=lam)
    objective = AlignObjective(cfg)
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(model, _mixed_batch(tok, which=step % 2))
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = _mixed_batch(tok, which=3)
    with torch.no_grad():
        feats = capture_features(model, held_out)
    kl = float(inter_task_kl(feats, held_out["task_ids"], held_out["attention_mask"]))
    return kl, _own_measure(cfg, feats, held_out)


def test_alignment_shrinks_inter_task_kl_on_held_out_batch():
    plain, aligned = _train(0.0)[0], _train(1.0)[0]
    assert aligned < 0.5 * plain, (aligned, plain)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_lowers_its_own_alignment_loss(variant):
    """Trained with lambda > 0, every option (ours and the released code's) lowers the distance it
    optimises, measured on a held-out batch, against the same run with lambda = 0."""
    plain, aligned = _train(0.0, variant=variant)[1], _train(1.0, variant=variant)[1]
    assert aligned < 0.8 * plain, (variant, aligned, plain)


def test_trained_adapter_loads_in_peft_and_merges(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = _model()
    model.train()
    objective = AlignObjective(AlignConfig(lam=0.5))
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-2)
    for step in range(3):
        optimizer.zero_grad()
        objective(model, _mixed_batch(tok, step))[0].backward()
        optimizer.step()
    model.eval()
    batch = _mixed_batch(tok)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        ours = model(**inputs).logits
        save_adapter(model, tmp_path / "adapter")
        fresh, _ = tiny_model("llama")
        peft_model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
        torch.testing.assert_close(peft_model(**inputs).logits, ours, atol=1e-5, rtol=1e-5)
        base, _ = tiny_model("llama")
        assert not torch.allclose(base(**inputs).logits, ours, atol=1e-4)  # training moved the adapter
        merge_adapters(model)
        assert all(layer.merged for _, layer in adapter_layers(model) if isinstance(layer, LoraLinear))
        torch.testing.assert_close(model(**inputs).logits, ours, atol=1e-5, rtol=1e-5)


# --- config, trainer hook-up, plot ------------------------------------------------------------------
def test_config_file_and_overrides_build_the_objective():
    from mtlora.train import build_objective

    config = load_config(ROOT / "configs" / "align_lora.yaml")
    assert config.method == "align_lora" and config.data.sampler == "task_balanced"
    objective = build_objective(config)
    assert (
        isinstance(objective, AlignObjective)
        and objective.config.loss == "kl"
        and objective.config.lam == 0.2
    )
    config = load_config(ROOT / "configs" / "align_lora.yaml", ["align.loss=mmd", "align.lambda=0.5"])
    assert (config.align.loss, config.align.lam) == ("mmd", 0.5)
    assert config.to_dict()["align"]["lambda"] == 0.5
    with pytest.raises(UserError, match="align.loss"):
        load_config(None, ["method=align_lora", "align.loss=cosine"])
    with pytest.raises(UserError, match="lambda"):
        load_config(None, ["align.lambda=-1"])


def test_plot_align_history_writes_a_png_atomically(tmp_path):
    history = [
        {"step": s, "loss": 3.0 / s, "lm_loss": 2.0 / s, "align_loss": 1.0 / s, "inter_task_kl": 1.0 / s}
        for s in range(1, 6)
    ]
    path = plot_align_history(history, tmp_path / "plots" / "align.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["align.png"]


def test_trainer_runs_align_lora_with_checkpointing_accumulation_and_balanced_batches(
    tmp_path, tiny_model_dir, task_files
):
    """End to end through ``mtlora.train.train``: per-step logs, no skipped micro-batch, a PEFT adapter."""
    import json

    import yaml

    from mtlora.train import train

    out = tmp_path / "run"
    cfg = {
        "model": str(tiny_model_dir),
        "method": "align_lora",
        "tasks": [str(t) for t in task_files],
        "output_dir": str(out),
        "adapter": {
            "r": 4,
            "alpha": 8,
            "dropout": 0.1,
            "target_modules": ["gate_proj", "up_proj", "down_proj"],
        },
        "data": {"max_length": 48, "max_eval_per_task": 2, "sampler": "task_balanced", "tasks_per_batch": 2},
        "train": {
            "batch_size": 4,
            "grad_accum": 2,
            "lr": 1e-2,
            "max_steps": 3,
            "save_every": 3,
            "gradient_checkpointing": True,
        },
        "align": {"loss": "kl", "lambda": 0.5, "require_all_steps": True},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "align.yaml"
    path.write_text(yaml.safe_dump(cfg))
    summary = train(load_config(path), progress=False)
    history = summary["history"]
    assert len(history) == 3
    for row in history:
        assert row["align_skipped"] == 0.0 and row["align_tasks"] == 2.0
        assert row["align_loss"] > 0 and row["inter_task_kl"] > 0
        assert row["loss"] == pytest.approx(row["lm_loss"] + 0.5 * row["align_loss"], rel=1e-4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    png = plot_align_history(history, out / "align_history.png")
    assert png.stat().st_size > 0


@pytest.mark.parametrize("kw, where", [({"variance": "sample"}, "align.variance"), ({"mmd_kernel": "rbf"}, "align.mmd_kernel")])
def test_new_options_are_validated(kw, where):
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        AlignConfig(**kw)
    with pytest.raises(UserError, match=where.replace(".", r"\.")):
        load_config(None, [f"align.{k}={v}" for k, v in kw.items()])
