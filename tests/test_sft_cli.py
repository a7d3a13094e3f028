"""`aligner sft` end to end on tiny local models (GPT core and a transformers Llama), full and LoRA;
`aligner export`; and bad inputs (one line, exit code 2, no run directory written)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import launch_two_processes, sft_recipe

from aligner.cli import main
from aligner.config import LoRAConfig, load_recipe
from aligner.model.forward import causal_lm_logits
from aligner.model.load import apply_lora, load_adapter_model, load_model


def test_sft_gpt_core_full(bases, tmp_path, capsys):
    assert main(["sft", str(sft_recipe(tmp_path, bases / "gpt"))]) == 0
    out = capsys.readouterr().out
    assert "48 conversations -> 48 examples" in out and "tokens in the loss" in out
    assert "held-out accuracy" in out and "full," in out
    final = tmp_path / "runs" / "s" / "final"
    assert (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file()
    acc = json.loads((tmp_path / "runs" / "s" / "accuracy.json").read_text())
    assert acc["n"] == 8 and 0 <= acc["ci95"][0] <= acc["accuracy"] <= acc["ci95"][1] <= 1
    steps = [json.loads(x) for x in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3] and "eval/loss" in steps[-1]


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_lora_trains_adapters_only_and_exports(bases, tmp_path, capsys, arch):
    base = bases / ("gpt" if arch == "gpt" else "llama")
    recipe = sft_recipe(tmp_path, base, arch, lora={"enabled": True, "r": 4, "alpha": 8})
    assert main(["sft", str(recipe)]) == 0
    assert "LoRA," in capsys.readouterr().out
    final = tmp_path / "runs" / "s" / "final"
    assert (final / "adapter_model.safetensors").is_file() and not (final / "model.safetensors").exists()
    from safetensors.torch import load_file

    adapter = load_file(final / "adapter_model.safetensors")
    assert any("lora_B" in k for k in adapter) and all(
        float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k
    )  # B starts at zero: every B moved
    # export merges into a full model that loads without peft and computes what base + adapter computes
    assert main(["export", str(final), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged")
    with_adapter = load_adapter_model(final).eval()
    ids = torch.randint(2, 300, (2, 16))
    with torch.no_grad():
        a = causal_lm_logits(merged.eval(), ids)
        b = causal_lm_logits(with_adapter, ids)
    assert torch.allclose(a, b, atol=1e-5)
    base_model = load_model(base).eval()
    with torch.no_grad():
        assert not torch.allclose(causal_lm_logits(base_model, ids), a, atol=1e-4)
    assert main(["export", str(final), str(tmp_path / "merged")]) == 2  # refuses to overwrite


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_lora_leaves_base_weights_unchanged(bases, tmp_path, arch):
    """After an eval pass and a generation, a train step moves every adapter weight and no base weight."""
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine
    from aligner.trainers.setup import sft_tokenizer
    from aligner.trainers.sft import SFTTrainer, encode_conversations

    base_dir = bases / ("gpt" if arch == "gpt" else "llama")
    recipe = load_recipe(sft_recipe(tmp_path, base_dir, arch, lora={"enabled": True}))
    tok = sft_tokenizer(recipe)
    train, _, _ = encode_conversations(recipe, tok)
    model = apply_lora(load_model(base_dir, arch=arch), LoRAConfig(enabled=True, r=4, alpha=8))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    model.eval()
    with torch.no_grad():
        causal_lm_logits(model, torch.randint(2, 300, (2, 12)))
    TorchEngine(model, pad_id=tok.pad_token_id).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    model.train()
    trainer = SFTTrainer(recipe, model, tok, train)
    trainer.train_step(0)
    trainer.train_step(1)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n
        else:
            assert not torch.equal(p, lora[n]), n


def test_unknown_lora_target_is_a_clear_error(bases, tmp_path, capsys):
    recipe = sft_recipe(tmp_path, bases / "gpt", lora={"enabled": True, "target_modules": ["qkv"]})
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: no module named qkv" in err and "q_proj" in err


# --- bad inputs ------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "Final answer: 4"}]}


@pytest.mark.parametrize(
    "rows, extra, message",
    [
        ([{"question": "q", "reply": "r"}], {}, "fit no known format"),
        ([{"instruction": "q", "answer": "a"}], {"format": "alpaca"}, "format alpaca needs column(s) output"),
        ([GOOD, {"messages": []}], {}, "row 2: empty conversation"),
        ([GOOD, {"messages": [{"role": "user", "content": "hi"}]}], {}, "row 2: conversation has no assistant turn"),
        ([GOOD, {"messages": [{"role": "bot", "content": "hi"}]}], {}, "row 2: message 0 has role 'bot'"),
    ],
)
def test_bad_datasets(bases, tmp_path, capsys, rows, extra, message):
    data = write_jsonl(tmp_path / "d.jsonl", rows * 3)
    recipe = sft_recipe(tmp_path, bases / "gpt", data={"source": str(data), "num_eval_rows": None, **extra})
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_overlong_examples_error_or_count(bases, tmp_path, capsys):
    long = {"messages": [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "y " * 50}]}
    data = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 20 + [long])
    recipe = sft_recipe(tmp_path, bases / "gpt", data={"source": str(data), "seq_len": 64}, sft={"overlong": "error"})
    assert main(["sft", str(recipe)]) == 2
    assert "row 21" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    assert main(["sft", str(recipe), "--overlong", "drop", "--accuracy_items", "0"]) == 0
    assert "1 dropped as longer than the max length" in capsys.readouterr().out


def test_template_without_system_role(bases, tmp_path, capsys):
    recipe = sft_recipe(tmp_path, bases / "gpt", sft={"chat_template": "mistral"})
    assert main(["sft", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "row 1: chat template: Mistral [INST] template has no system role" in err


@pytest.mark.slow
def test_two_process_lora_sft_matches_single_process(bases, tmp_path):
    """accelerate launch, 2 CPU processes, LoRA + packing: the first step's loss equals one process with
    the same global batch (packed rows differ per process; the loss is normalised over both)."""
    recipe = sft_recipe(
        tmp_path, bases / "gpt", lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, sft={"accuracy_items": 0}
    )
    assert main(["sft", str(recipe), "--train.name", "one", "--micro_batch_size", "8", "--max_steps", "2"]) == 0
    proc = launch_two_processes(
        ["sft", str(recipe), "--train.name", "two", "--micro_batch_size", "4", "--max_steps", "2"]
    )

    def losses(name):
        rows = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows}

    one, two = losses("one"), losses("two")
    assert two[1] == pytest.approx(one[1], abs=1e-5) and two[2] == pytest.approx(one[2], abs=1e-4)
    assert (tmp_path / "runs" / "two" / "final" / "adapter_model.safetensors").is_file()
    assert proc.stdout.count("checkpoint:") == 1
