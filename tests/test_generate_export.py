"""After training: ``mtlora generate`` and ``mtlora export`` (merged model, clean PEFT folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_jsonl
from transformers import AutoModelForCausalLM

from mtlora.config import load_config
from mtlora.train import load_trained, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: toy models want one thread


def _train(root: Path, model_dir: Path, tasks: list[Path], method: str) -> Path:
    adapter = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    if method != "lora":
        adapter["num_heads"] = 2
    out = root / method
    cfg = load_config(None, [
        f"model={model_dir}", f"method={method}", f"tasks=[{tasks[0]},{tasks[1]}]", f"output_dir={out}",
        f"adapter={adapter}", "data.max_length=48", "data.max_eval_per_task=4", "train.batch_size=4",
        "train.max_steps=3", "train.lr=5e-2",
    ])
    train(cfg, overwrite=True, progress=False)
    return out / "adapter"


def _task_files(root: Path) -> list[Path]:
    """The two small multiple-choice tasks of conftest's ``task_files``, for a module-scoped fixture."""
    sentiment = [
        {"prompt": f"Review: the cat {w} the mat. Positive or negative?", "answer": a, "choices": ["negative", "positive"]}
        for w, a in [("loves", "positive"), ("hates", "negative"), ("likes", "positive"), ("bites", "negative")] * 4
    ]
    qa = [
        {"prompt": f"Question: what is {i} + 1? Answer:", "answer": str(i + 1), "choices": [str(i + 1), str(i + 2)]}
        for i in range(16)
    ]
    return [write_jsonl(root / "sentiment.jsonl", sentiment), write_jsonl(root / "qa.jsonl", qa)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    tasks = _task_files(root)
    return {m: _train(root, tiny_model_dir, tasks, m) for m in ("lora", "mlora", "rlora")}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.tensor([[5, 9, 2, 14, 7, 3]])


# ------------------------------------------------------------------------------------------ generate


def _greedy_reference(model, tok, text: str, n: int) -> str:
    """Greedy decoding by full forwards, no cache, no padding: the definition."""
    ids = tok.encode(text, add_special_tokens=False)
    new = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True)


def test_generate_prompt_is_greedy_decoding_of_the_adapter(runs, monkeypatch, capsys):
    model, tok, _ = load_trained(runs["lora"])
    want = _greedy_reference(model, tok, "The quick brown", 6)
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(runs["lora"]), "--prompt", "The quick brown",
                             "--max-new-tokens", "6", "--device", "cpu")
    assert code == 0, err
    assert out == want + "\n"


def test_generate_file_is_batched_and_matches_one_by_one(runs, tmp_path, monkeypatch, capsys):
    prompts = ["The quick brown", "Question: what is 3 + 1? Answer:", "the cat", "Is the sky blue?"]
    lines = [{"prompt": p, "task": "qa"} for p in prompts[:2]] + [{"prompt": p} for p in prompts[2:]]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(runs["lora"]), "--file", str(path),
                             "--max-new-tokens", "5", "--batch-size", "4", "--task", "sentiment")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert [r["task"] for r in rows] == ["qa", "qa", "sentiment", "sentiment"]
    model, tok, _ = load_trained(runs["lora"])
    assert [r["completion"] for r in rows] == [_greedy_reference(model, tok, p, 5) for p in prompts]


def test_generate_sampling_is_seeded(runs, monkeypatch, capsys):
    args = ("generate", str(runs["lora"]), "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "5")
    first = run_cli(monkeypatch, capsys, *args, "--seed", "1")[1]
    again = run_cli(monkeypatch, capsys, *args, "--seed", "1")[1]
    greedy = run_cli(monkeypatch, capsys, *args[:-2])[1]
    assert first == again and first != greedy


@pytest.mark.parametrize("args, message", [
    (("--prompt", "x", "--task", "nope"), "unknown task 'nope'"),
    (("--prompt", "x", "--chat"), "no chat template"),
    ((), "exactly one of --prompt"),
    (("--prompt", "x", "--device", "cuda:7"), "cuda:7 requested but this machine"),
])
def test_generate_user_errors_are_one_line(runs, monkeypatch, capsys, args, message):
    if "cuda" in " ".join(args) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    code, _, err = run_cli(monkeypatch, capsys, "generate", str(runs["lora"]), *args)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_generate_runs_a_plain_model(tiny_model_dir, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(tiny_model_dir), "--prompt", "the", "--max-new-tokens", "3")
    assert code == 0, err


# -------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("method", ["lora", "mlora"])
def test_export_merge_loads_in_stock_transformers_with_the_same_logits(runs, tmp_path, monkeypatch, capsys, method):
    out = tmp_path / "merged"
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs[method]), str(out), "--merge")
    assert code == 0, err
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted, _, _ = load_trained(runs[method])
    torch.testing.assert_close(_logits(stock, IDS), _logits(adapted, IDS), atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in stock.named_parameters())
    card = (out / "README.md").read_text()
    assert f"method: {method}" in card and "library_name: transformers" in card


def test_export_merge_bf16(runs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "merged16"
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(out), "--merge", "--dtype", "bf16")
    assert code == 0, err
    stock = AutoModelForCausalLM.from_pretrained(out)
    assert stock.dtype == torch.bfloat16
    adapted, _, _ = load_trained(runs["lora"])
    # bf16 keeps 8 bits of mantissa: logits agree to ~1e-2 of their scale on this toy model
    got, want = _logits(stock, IDS), _logits(adapted, IDS)
    assert (got - want).abs().max() <= 0.05 * (1 + want.abs().max())


def test_export_merge_refuses_a_learned_router(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["rlora"]), str(tmp_path / "m"), "--merge")
    assert code == 2 and "merging is not exact" in err and "router" in err
    assert not (tmp_path / "m").exists()


def test_export_peft_folder_with_model_card(runs, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from peft import PeftModel

    out = tmp_path / "peft"
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "adapter_config.json", "adapter_model.safetensors", "mtlora_export.json", "training_config.yaml"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_model_dir.name  # portable: no path of this machine
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    adapted, _, _ = load_trained(runs["lora"])
    torch.testing.assert_close(_logits(peft_model, IDS), _logits(adapted, IDS), atol=1e-5, rtol=1e-5)
    card = (out / "README.md").read_text()
    results = json.loads((runs["lora"].parent / "results.json").read_text())
    acc = results["evals"][-1]["per_task"]["qa"]["acc"]
    assert f"base_model: {tiny_model_dir.name}" in card and "method: lora" in card
    assert "tasks: qa, sentiment" in card and f"| qa | acc | 4 | {100 * acc:.1f} |" in card
    assert "mtlora train training_config.yaml" in card and "mtlora export" in card


def test_export_peft_refuses_multi_head_and_guards_the_output(runs, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["rlora"]), str(tmp_path / "x"))
    assert code == 2 and "no PEFT equivalent" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(mine), "--overwrite")
    assert code == 2 and "refusing to replace" in err and (mine / "notes.txt").read_text() == "keep me"
    out = tmp_path / "again"
    assert run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(out))[0] == 0
    assert run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(out))[0] == 2  # exists
    assert run_cli(monkeypatch, capsys, "export", str(runs["lora"]), str(out), "--overwrite")[0] == 0


def test_portable_base_names():
    from mtlora.export import portable_base_name

    assert portable_base_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_base_name("/home/me/models/my-llama") == "my-llama"
    assert portable_base_name("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert portable_base_name("/x/y", override="org/name") == "org/name"


def test_generate_chat_uses_the_tokenizer_template(tmp_path, monkeypatch, capsys):
    from mtlora.models import load_model
    from mtlora.testing import save_tiny_model

    folder = save_tiny_model(tmp_path / "chat-llama")
    model, tok = load_model(folder)
    tok.chat_template = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(folder)
    templated = "<|endoftext|>user: the cat\nassistant:"
    ids = tok.encode(templated, add_special_tokens=False)
    new = []
    for _ in range(4):  # greedy by full forwards from the templated prompt
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        new.append(nxt)
    code, out, err = run_cli(monkeypatch, capsys, "generate", str(folder), "--prompt", "the cat", "--chat",
                             "--max-new-tokens", "4")
    assert code == 0, err
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"
    plain = run_cli(monkeypatch, capsys, "generate", str(folder), "--prompt", "the cat", "--max-new-tokens", "4")[1]
    assert plain != out  # so the comparison above could tell the template from no template
