"""The weights a rollout engine is synced with: streamed under Hugging Face names, one tensor at a time and
without copies, LoRA adapters merged only while the stream is read (no vLLM needed)."""

import torch

from aligner.config import LoRAConfig
from aligner.rollout.vllm_engine import iter_hf_weights


def tiny_gpt():
    from aligner.model.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    )


def test_the_stream_is_the_parameters_themselves_under_llama_names():
    model = tiny_gpt()
    params = dict(model.state_dict())
    stream = iter_hf_weights(model)
    name, first = next(stream)
    assert name.startswith("model.") and first.data_ptr() == params[name].data_ptr()  # no copy
    names = [name] + [n for n, _ in stream]
    assert "model.layers.0.self_attn.q_proj.weight" in names and len(names) == len(params)


def test_lora_is_merged_while_streaming_and_unmerged_after():
    from aligner.model.load import apply_lora

    model = tiny_gpt()
    q = "model.layers.0.self_attn.q_proj.weight"
    before = model.state_dict()[q].clone()
    peft = apply_lora(model, LoRAConfig(enabled=True, r=2, alpha=4.0, dropout=0.0, target_modules=["q_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # a non-zero adapter
    live = peft.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    copied = {}
    for name, t in iter_hf_weights(peft):
        copied[name] = t.clone()  # what a consumer copies while the stream runs
    assert not any("lora_" in n or "base_layer" in n for n in copied) and q in copied
    assert not torch.allclose(copied[q], before)  # base + (alpha / r) B A while streaming
    assert torch.allclose(live, before, atol=1e-6)  # unmerged again (to rounding)
    abandoned = iter_hf_weights(peft)
    next(abandoned)
    abandoned.close()  # a consumer that stops early: unmerged all the same
    assert torch.allclose(live, before, atol=1e-6)
