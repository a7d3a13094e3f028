"""QLoRA (bitsandbytes NF4 base + LoRA) on the GPT core and a transformers Llama, on the CPU.

The trap: on CPUs with AVX-512 BF16, bitsandbytes repacks a 4-bit
weight for inference the first time the layer runs in eval mode without grad, and from then on LoRA
adapters on it get zero gradients. These tests train after an eval pass and a generation, and check
that the guard keeps the repacking from happening even where bitsandbytes believes the CPU has
AVX-512 BF16 (the machine running the tests may not).
"""

import pytest
import torch
from conftest import sft_recipe

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (bitsandbytes)")

from aligner.config import LoRAConfig, ModelConfig, load_recipe  # noqa: E402
from aligner.model.forward import causal_lm_logits  # noqa: E402
from aligner.model.load import load_model  # noqa: E402
from aligner.model.quant import build_qlora_model  # noqa: E402
from aligner.rollout.engine import SamplingParams  # noqa: E402
from aligner.rollout.torch_engine import TorchEngine  # noqa: E402

QLORA = LoRAConfig(
    enabled=True, r=4, alpha=8, dropout=0.0, quantize="nf4", compute_dtype="bf16"
)  # as QLoRA prescribes


def qlora_model(bases, arch: str):
    from transformers import AutoTokenizer

    path = bases / ("gpt" if arch == "gpt" else "llama")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    return build_qlora_model(ModelConfig(init_from=str(path), arch=arch), QLORA, tok), tok, path


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_adapters_train_after_eval_and_generate_base_frozen(bases, tmp_path, arch):
    from aligner.trainers.setup import sft_tokenizer
    from aligner.trainers.sft import SFTTrainer, encode_conversations

    model, tok, path = qlora_model(bases, arch)
    layers = four_bit_layers(model)
    assert len(layers) == 14  # q, k, v, o, gate, up, down in each of 2 blocks
    wrappers = [m for m in model.modules() if type(m).__module__.startswith("peft.tuners.lora.bnb")]
    assert len(wrappers) == 14  # peft's LoRA layers for 4-bit bases, not its generic ones
    assert all(m.compute_dtype == torch.bfloat16 and m.weight.quant_type == "nf4" for m in layers)
    assert all(m.weight.compress_statistics for m in layers)  # double quantization
    base = {id(m): (m.weight.data.clone(), m.weight.quant_state.absmax.clone()) for m in layers}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)

    # an eval pass and a generation first: the sequence that used to silence the adapters' gradients
    ids = torch.randint(2, 300, (2, 12))
    model.eval()
    with torch.no_grad():
        causal_lm_logits(model, ids)
    TorchEngine(model, pad_id=tok.pad_token_id).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))
    model.train()

    recipe = load_recipe(sft_recipe(tmp_path, path, arch, lora={"enabled": True, "quantize": "nf4"}))
    train, _, _ = encode_conversations(recipe, sft_tokenizer(recipe))
    trainer = SFTTrainer(recipe, model, tok, train)
    trainer.train_step(0)
    trainer.train_step(1)  # A's gradient is zero on step 1 (B starts at zero); both move by step 2
    for n, p in model.named_parameters():
        if n in lora:
            assert not torch.equal(p.detach(), lora[n]), f"{n} did not change"
    for m in layers:
        data, absmax = base[id(m)]
        assert torch.equal(m.weight.data, data) and torch.equal(m.weight.quant_state.absmax, absmax)
        assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)


def test_guard_stops_cpu_repacking_where_bitsandbytes_would_do_it(bases, monkeypatch):
    import bitsandbytes.nn.modules as bnb_modules

    # a lone 4-bit layer on a CPU that claims AVX-512 BF16: eval + no_grad repacks it (the trap's first half)
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer = layer.to("cpu").eval()
    assert layer.support_avx512bf16_for_cpu
    try:
        with torch.no_grad():
            layer(torch.randn(2, 64))
    except Exception:  # the repacked layout may have no kernel on this CPU: it was repacked all the same
        pass
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)

    # the same claim while building QLoRA models: the guard clears the flag, so nothing is repacked
    for arch in ("gpt", "hf"):
        model, _, _ = qlora_model(bases, arch)
        layers = four_bit_layers(model)
        assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
        model.eval()
        with torch.no_grad():
            causal_lm_logits(model, torch.randint(2, 300, (1, 8)))
        assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_qlora_sft_and_export_through_the_cli(bases, tmp_path, capsys):
    from aligner.cli import main

    recipe = sft_recipe(tmp_path, bases / "gpt", lora={"enabled": True, "quantize": "nf4", "r": 4, "alpha": 8})
    assert main(["sft", str(recipe), "--accuracy_items", "0"]) == 0
    assert "QLoRA," in capsys.readouterr().out
    final = tmp_path / "runs" / "s" / "final"
    assert (final / "adapter_model.safetensors").is_file()
    # export merges the adapter into the full-precision base, not into 4-bit weights
    assert main(["export", str(final), str(tmp_path / "merged")]) == 0
    merged = load_model(tmp_path / "merged").eval()
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    base = load_model(bases / "gpt").eval()
    ids = torch.randint(2, 300, (2, 16))
    with torch.no_grad():
        assert not torch.allclose(causal_lm_logits(merged, ids), causal_lm_logits(base, ids), atol=1e-4)
