"""MeTA-LoRA: the batched meta-iteration equals a sequential deep-copy MAML reference; end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mtlora.adapters import inject_adapters, make_adapter_config
from mtlora.config import MetaConfig, load_config
from mtlora.data.collate import TaskCollator
from mtlora.data.example import Example
from mtlora.errors import UserError
from mtlora.meta import (
    MetaSampler,
    collate_slots,
    kshot_pools,
    lora_parameters,
    meta_gradients,
    per_task_losses,
    reference_meta_gradients,
    train_meta,
)
from mtlora.objectives import supervised_lm_loss
from mtlora.testing import save_tiny_model, tiny_model

N_TASKS = 3


def _examples(task: str, count: int) -> list[Example]:
    words = ["cat", "dog", "fox", "sky", "mat", "sun", "man", "water"]
    out = []
    for i in range(count):
        w = words[(i * 3 + len(task)) % len(words)]
        if task == "t0":
            out.append(Example(task, f"Is the {w} happy?", "yes" if i % 2 else "no"))
        elif task == "t1":
            out.append(Example(task, f"Question: what is {i} + 1? Answer:", str(i + 1)))
        else:
            out.append(Example(task, f"Premise: the {w} sat on the mat. Hypothesis:", f"the {w} was tired"))
    return out


def _setup(seed: int = 0, targets=("q_proj", "v_proj", "up_proj", "down_proj"), dropout: float = 0.0):
    """Tiny Llama with LoRA (dropout 0 unless given) whose B is random, so every gradient is non-trivial."""
    model, tok = tiny_model("llama")
    inject_adapters(model, make_adapter_config("lora", r=2, alpha=4, dropout=dropout, target_modules=list(targets)))
    torch.manual_seed(seed)
    with torch.no_grad():
        for a, b in lora_parameters(model).values():
            a.normal_(0, 0.3)
            b.normal_(0, 0.3)
    model.train()
    tasks = [f"t{i}" for i in range(N_TASKS)]
    collator = TaskCollator(tok, tasks, max_length=48)
    # uneven sizes: task i has i+1 support rows and 2 query rows, answers of different lengths
    groups = [(_examples(t, 6)[: i + 1], _examples(t, 6)[3:5]) for i, t in enumerate(tasks)]
    return model, collator, groups


def _theta(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


def _batched_step(model, collator, groups, meta, optimizer):
    support = collate_slots(collator, [s for s, _ in groups])
    query = collate_slots(collator, [q for _, q in groups])
    optimizer.zero_grad(set_to_none=True)
    meta_gradients(model, support, query, meta)
    optimizer.step()


def _reference_step(model, collator, groups, meta, optimizer):
    episodes = [(collator(s), collator(q)) for s, q in groups]
    optimizer.zero_grad(set_to_none=True)
    reference_meta_gradients(model, episodes, meta)
    optimizer.step()


@pytest.mark.parametrize(
    "second_order,aggregation,inner_steps",
    [(False, "mean", 1), (False, "weighted", 2), (False, "sum", 2), (True, "mean", 2), (True, "weighted", 1)],
)
def test_one_meta_iteration_equals_sequential_deep_copy_reference(second_order, aggregation, inner_steps):
    meta = MetaConfig(inner_steps=inner_steps, inner_lr=0.5, aggregation=aggregation, second_order=second_order)
    results = []
    for step in (_batched_step, _reference_step):
        model, collator, groups = _setup()
        before = _theta(model)
        # Adam's first step is ~lr * sign(g): eps keeps it well-conditioned for near-zero gradient entries
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, eps=1e-3)
        step(model, collator, groups, meta, opt)
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((before, _theta(model), grads))
    (b0, after_batched, g_batched), (b1, after_ref, g_ref) = results
    for k in b0:
        torch.testing.assert_close(b0[k], b1[k])
        torch.testing.assert_close(g_batched[k], g_ref[k], atol=1e-5, rtol=1e-4)
        # float32 reassociation (the reference's plain LoRA layers use the fused grad_x = g (W0 + s B A))
        # reaches the update as ~lr / eps x the gradient's rounding: ~1e-6 here
        torch.testing.assert_close(after_batched[k], after_ref[k], atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(after_batched[k], b0[k]) for k in b0)


def test_second_order_differs_from_first_order():
    """The create_graph path really differentiates through the inner step (not a silent first order)."""
    grads = []
    for second_order in (False, True):
        model, collator, groups = _setup()
        meta = MetaConfig(inner_lr=0.5, second_order=second_order)
        meta_gradients(model, collate_slots(collator, [s for s, _ in groups]),
                       collate_slots(collator, [q for _, q in groups]), meta)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert (grads[0] - grads[1]).abs().max() > 1e-4 * grads[0].abs().max()


def test_meta_step_moves_theta_by_the_query_gradient_at_theta_i():
    """With outer SGD: theta' = theta - beta * mean_i grad L_q,i(theta_i), theta_i = theta - alpha grad L_s,i.

    A port that writes theta_i into the model before the meta step would end at theta_i - beta * g,
    which the last assertion rules out.
    """
    alpha, beta = 0.5, 0.1
    model, collator, groups = _setup()
    theta = _theta(model)
    meta = MetaConfig(inner_lr=alpha)
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=beta)
    _batched_step(model, collator, groups, meta, sgd)
    after = _theta(model)

    # by hand, one task at a time, on explicit tensors
    expected = {k: v.clone() for k, v in theta.items()}
    adapted_mean = {k: torch.zeros_like(v) for k, v in theta.items()}
    params = dict((k, p) for k, p in model.named_parameters() if p.requires_grad)
    for support, query in groups:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(theta[k])
        g_s = torch.autograd.grad(supervised_lm_loss(model, collator(support))[0], list(params.values()))
        with torch.no_grad():
            for (k, p), g in zip(params.items(), g_s, strict=True):
                p.sub_(alpha * g)
                adapted_mean[k] += p / N_TASKS
        g_q = torch.autograd.grad(supervised_lm_loss(model, collator(query))[0], list(params.values()))
        for k, g in zip(params, g_q, strict=True):
            expected[k] -= beta * g / N_TASKS
    for k in theta:
        torch.testing.assert_close(after[k], expected[k], atol=1e-6, rtol=1e-5)
    moved = {k: after[k] - theta[k] for k in theta}
    assert any(m.abs().max() > 1e-4 for m in moved.values())
    wrong_point = {k: adapted_mean[k] - (theta[k] - expected[k]) for k in theta}
    assert any((after[k] - wrong_point[k]).abs().max() > 1e-4 for k in theta)


def test_per_task_losses_are_each_tasks_own_mean():
    model, collator, groups = _setup()
    batch = collate_slots(collator, [q for _, q in groups])
    losses, counts = per_task_losses(model, batch, N_TASKS, stacked=None)
    for i, (_, query) in enumerate(groups):
        torch.testing.assert_close(losses[i], supervised_lm_loss(model, collator(query))[0], atol=1e-6, rtol=1e-6)
    assert counts.sum() == (batch["labels"][:, 1:] != -100).sum()


def _distinct(task: str, count: int) -> list[Example]:
    return [Example(task, f"{task} question {i}?", f"answer {i}") for i in range(count)]


def test_kshot_pools_are_drawn_per_seed_disjoint_and_validated():
    examples = [ex for t in ("t0", "t1") for ex in _distinct(t, 20)]
    meta = MetaConfig(k=10, support_fraction=0.6, support_size=3, query_size=2, tasks_per_iter=2)
    pools = kshot_pools(examples, meta, seed=0)
    assert [p.task for p in pools] == ["t0", "t1"]
    for pool in pools:
        task_examples = _distinct(pool.task, 20)
        assert len(pool.support) == 6 and len(pool.query) == 4
        assert not set(pool.support) & set(pool.query)
        assert set(pool.support) | set(pool.query) <= set(task_examples)
    again = kshot_pools(examples, meta, seed=0)
    assert [(p.support, p.query) for p in again] == [(p.support, p.query) for p in pools]  # same seed, same pool
    drawn = [frozenset(ex for p in kshot_pools(examples, meta, seed=s) for ex in p.support + p.query) for s in range(5)]
    assert len(set(drawn)) == 5  # every seed draws its own k-shot data
    first_k = frozenset(ex for t in ("t0", "t1") for ex in _distinct(t, 20)[:10])
    assert any(d != first_k for d in drawn)  # not the first k in the given order
    # a task's pool depends on the seed and the task only, not on the other tasks
    alone = kshot_pools(_distinct("t1", 20), MetaConfig(k=10, support_fraction=0.6, support_size=3,
                                                         query_size=2, tasks_per_iter=1), seed=0)
    assert alone[0].support == pools[1].support
    a, b = MetaSampler(pools, meta, seed=1), MetaSampler(pools, meta, seed=1)
    b.load_state_dict(a.state_dict())
    first = a.sample()
    assert first == b.sample()
    assert all(len(s) == 3 and len(q) == 2 and not set(s) & set(q) for s, q in first)
    with pytest.raises(UserError, match="query_size"):
        kshot_pools(examples, MetaConfig(k=10, support_fraction=0.6, query_size=5, tasks_per_iter=2))
    with pytest.raises(UserError, match="tasks_per_iter"):
        kshot_pools(examples, MetaConfig(k=10, support_size=2, query_size=2, tasks_per_iter=3))
    with pytest.raises(UserError, match="inner_steps"):
        MetaConfig(inner_steps=0)
    with pytest.raises(UserError, match="pool_seed"):
        MetaConfig(pool_seed=-1)


def test_meta_gradients_with_dropout_estimate_the_reference_expectation():
    """Dropout > 0 (the bench uses 0.1): masks are drawn in both stages, and averaged over draws the
    batched meta-gradient agrees with the sequential deep-copy reference's, within Monte Carlo error.
    A mask applied to the wrong rows, shared across stages or mis-rescaled would move the mean."""
    meta = MetaConfig(inner_lr=0.5)
    draws = {"batched": [], "reference": []}
    for name in draws:
        model, collator, groups = _setup(dropout=0.3)
        support = collate_slots(collator, [s for s, _ in groups])
        query = collate_slots(collator, [q for _, q in groups])
        episodes = [(collator(s), collator(q)) for s, q in groups]
        params = [p for p in model.parameters() if p.requires_grad]
        for seed in range(40):
            torch.manual_seed(1000 + seed)
            for p in params:
                p.grad = None
            if name == "batched":
                meta_gradients(model, support, query, meta)
            else:
                reference_meta_gradients(model, episodes, meta)
            draws[name].append(torch.cat([p.grad.flatten() for p in params]))
    b, r = torch.stack(draws["batched"]).double(), torch.stack(draws["reference"]).double()
    assert all(torch.isfinite(b).all() for b in (b, r))
    assert (b[0] - b[1]).abs().max() > 1e-3 * b[0].abs().max()  # dropout is live: draws differ
    n = b.shape[0]
    d2 = ((b.mean(0) - r.mean(0)) ** 2).sum()
    expected_d2 = (b.var(0) + r.var(0)).sum() / n  # E[d2] when both estimate the same mean
    assert d2 < 2.0 * expected_d2, (d2.item(), expected_d2.item())
    # and the test can tell: the dropout-free gradient is not within that error
    model, collator, groups = _setup(dropout=0.0)
    meta_gradients(model, collate_slots(collator, [s for s, _ in groups]),
                   collate_slots(collator, [q for _, q in groups]), meta)
    g0 = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]).double()
    assert ((b.mean(0) - g0) ** 2).sum() > 2.0 * expected_d2


def _task_file(path: Path) -> Path:
    rows = [
        {"task": "sentiment", "prompt": f"Review: the cat {w} the mat. Positive or negative?", "answer": a,
         "choices": ["negative", "positive"]}
        for w, a in [("loves", "positive"), ("hates", "negative"), ("likes", "positive"), ("bites", "negative")] * 3
    ] + [
        {"task": "qa", "prompt": f"Question: what is {i} + 1? Answer:", "answer": str(i + 1),
         "choices": [str(i + 1), str(i + 2)]}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_train_meta_end_to_end_saves_a_peft_loadable_adapter_and_resumes(tmp_path, monkeypatch, dropout):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model(tmp_path / "tiny", "llama")
    data = _task_file(tmp_path / "tasks.jsonl")
    overrides = [
        f"model={model_dir}", f"tasks=[{data}]", "method=meta_lora", "adapter.r=4", f"adapter.dropout={dropout}",
        "adapter.target_modules=[q_proj,up_proj]", "meta.k=8", "meta.support_size=2", "meta.query_size=2",
        "meta.tasks_per_iter=2", "meta.iterations=4", "meta.inner_lr=0.1", "meta.outer_lr=0.01",
        "train.save_every=2", "data.max_eval_per_task=2", "data.max_length=48",
    ]
    full = train_meta(load_config(None, [*overrides, f"output_dir={tmp_path / 'full'}"]), progress=False)
    assert full["steps"] == 4 and len(full["history"]) == 4 and full["evals"][-1]["step"] == 4
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in full["history"])

    # a run interrupted right after its iteration-2 checkpoint, then resumed, ends bit for bit the same
    import mtlora.train

    original = mtlora.train.save_checkpoint

    def save_then_crash(run, optimizer, scheduler, sampler, state, out, dist=None):
        original(run, optimizer, scheduler, sampler, state, out, dist)
        if state.step == 2:
            raise KeyboardInterrupt

    cfg = load_config(None, [*overrides, f"output_dir={tmp_path / 'resumed'}"])
    monkeypatch.setattr(mtlora.train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_meta(cfg, progress=False)
    monkeypatch.setattr(mtlora.train, "save_checkpoint", original)
    resumed = train_meta(cfg, resume=True, progress=False)
    assert resumed["steps"] == 4 and [h["step"] for h in resumed["history"]] == [1, 2, 3, 4]

    from safetensors.torch import load_file

    w_full = load_file(Path(full["adapter"]) / "adapter_model.safetensors")
    w_resumed = load_file(Path(resumed["adapter"]) / "adapter_model.safetensors")
    assert w_full.keys() == w_resumed.keys()
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)
    assert all(w_full[k].abs().max() > 0 for k in w_full if "lora_B" in k)  # B left its zero init

    from mtlora.train import load_trained

    ours, tok, extra = load_trained(full["adapter"])
    assert extra["method"] == "meta_lora"
    batch = tok(["Question: what is 3 + 1? Answer: 4"], return_tensors="pt")
    fresh = AutoModelForCausalLM.from_pretrained(model_dir)
    theirs = peft.PeftModel.from_pretrained(fresh, full["adapter"]).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, ours(**batch).logits, atol=1e-5, rtol=1e-5)
