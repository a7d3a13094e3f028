"""The fused LM-head log-probs (no (B, T, V) logits) equal the full-logits path: values and gradients."""

from __future__ import annotations

import pytest
import torch

from aligner.logprobs import IGNORE_INDEX, linear_token_logprobs, token_logprobs
from aligner.model.forward import causal_lm_logits, causal_lm_token_logprobs, fused_head
from aligner.model.gpt import GPT, GPTConfig


def _labels(B=3, T=11, V=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 7:] = IGNORE_INDEX  # padding
    return labels


def test_linear_token_logprobs_matches_log_softmax_by_hand():
    torch.manual_seed(0)
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 6, 0], [IGNORE_INDEX, 3, 3, 4, 5]])
    got = linear_token_logprobs(h, w, labels, temperature=0.7)
    ref = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ref = ref * (labels != IGNORE_INDEX)
    assert torch.allclose(got.double(), ref, atol=1e-6)
    assert float(got[0, 2].detach()) == 0.0 and float(got[1, 0].detach()) == 0.0
    g = torch.randn(2, 5, dtype=torch.float64)
    gh, gw = torch.autograd.grad((got.double() * g).sum(), (h, w))
    rh, rw = torch.autograd.grad((ref * g).sum(), (h, w))
    assert torch.allclose(gh, rh, atol=1e-5) and torch.allclose(gw, rw, atol=1e-5)


def test_chunks_cover_every_row(monkeypatch):
    import aligner.logprobs as losses

    monkeypatch.setattr(losses, "_chunk_rows", lambda vocab: 3)  # many chunks, a ragged last one
    torch.manual_seed(1)
    h = torch.randn(20, 6, requires_grad=True)
    w = torch.randn(9, 6, requires_grad=True)
    labels = torch.randint(0, 9, (20,))
    got = linear_token_logprobs(h, w, labels)
    ref = torch.log_softmax(h @ w.T, -1).gather(-1, labels[:, None]).squeeze(-1)
    assert torch.allclose(got, ref, atol=1e-5)
    got.sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref.sum().backward()
    assert torch.allclose(gh, h.grad, atol=1e-5) and torch.allclose(gw, w.grad, atol=1e-5)


def _gpt(tie: bool):
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    return GPT(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("make", [lambda: _gpt(True), lambda: _gpt(False), _llama], ids=["gpt-tied", "gpt", "llama"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_model_logprobs_and_grads_equal_full_logits(make, bf16):
    model = make()
    assert fused_head(model) is not None
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(2))
    labels = _labels()
    mask = labels != IGNORE_INDEX
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def full():
        with cast:
            logits = causal_lm_logits(model, ids)
        return token_logprobs(logits.float() / 0.9, labels) * mask

    def fused():
        with cast:
            return causal_lm_token_logprobs(model, ids, labels, temperature=0.9)

    results = []
    for fn in (full, fused):
        model.zero_grad()
        logps = fn()
        (logps * mask).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (ref, ref_grads), (got, got_grads) = results
    tol = 3e-2 if bf16 else 1e-5
    assert torch.allclose(got, ref, atol=tol, rtol=0)
    for name, g in ref_grads.items():
        scale = float(g.abs().max()) + 1e-8
        assert float((got_grads[name] - g).abs().max()) <= tol * max(1.0, scale), name


def test_lora_head_falls_back_to_full_logits():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert fused_head(model) is None  # the adapter on the head must be applied: full logits
    ids, labels = torch.randint(0, 300, (3, 11)), _labels()
    got = causal_lm_token_logprobs(model, ids, labels)
    ref = token_logprobs(causal_lm_logits(model, ids), labels) * (labels != IGNORE_INDEX)
    assert torch.allclose(got, ref, atol=1e-5)
    plain = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    assert fused_head(plain) is not None


@pytest.mark.parametrize("make", [lambda: _gpt(True), _llama], ids=["gpt", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(make):
    from aligner.model.forward import enable_gradient_checkpointing

    ids, labels = torch.randint(0, 300, (3, 11)), _labels()
    grads = []
    for checkpointing in (False, True):
        model = make().train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        causal_lm_token_logprobs(model, ids, labels).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(grads[1][name], g, atol=1e-6), name
