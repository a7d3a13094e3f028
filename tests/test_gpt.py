"""The GPT core: Llama checkpoint compatibility both ways, padding, causality, KV cache, accounting."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

from aligner.model.attention import decode_attention
from aligner.model.gpt import GPT, GPTConfig, KVCache
from aligner.model.kv_cache import fuse_layer

VOCAB = 64


def make_gpt(seed: int = 0, **kw) -> GPT:
    """A tiny GPT core with every weight perturbed (norm weights away from 1), so a swapped or
    misnamed tensor cannot hide behind the init."""
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model.eval()


def make_llama(tie: bool, seed: int = 0):
    """A tiny transformers Llama, perturbed the same way as make_gpt."""
    model = tiny_llama(
        vocab=VOCAB,
        seed=seed,
        intermediate_size=80,
        max_position_embeddings=128,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.1 if p.ndim == 1 else 0.02))
    return model


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


# --- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_validation():
    c = GPTConfig()
    assert c.intermediate_size == 704  # 8/3 * 256 = 682.7 -> next multiple of 64
    assert c.head_dim == 64
    assert GPTConfig(hidden_size=32, num_attention_heads=4).intermediate_size == 128
    with pytest.raises(ValueError, match="num_key_value_heads"):
        GPTConfig(num_attention_heads=4, num_key_value_heads=3)


def test_from_hf_dict_reads_v4_and_v5_configs_and_rejects_what_it_cannot_run():
    c = GPTConfig(hidden_size=32, num_attention_heads=4, rope_theta=500000.0, eos_token_id=[1, 2])
    d = c.to_hf_dict()
    assert d["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert GPTConfig.from_hf_dict(d) == c
    v4 = {k: v for k, v in d.items() if k != "rope_parameters"} | {"rope_scaling": None, "some_new_key": None}
    assert GPTConfig.from_hf_dict(v4) == c
    with pytest.raises(ValueError, match="some_new_key"):  # a field it does not know might change the model
        GPTConfig.from_hf_dict(v4 | {"some_new_key": 1})
    with pytest.raises(ValueError, match="model_type"):
        GPTConfig.from_hf_dict(d | {"model_type": "mistral"})
    with pytest.raises(ValueError, match="llama3"):
        GPTConfig.from_hf_dict(v4 | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="yarn"):
        GPTConfig.from_hf_dict(d | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(ValueError, match="bias"):
        GPTConfig.from_hf_dict(d | {"attention_bias": True})


# --- checkpoints: GPT core <-> transformers -------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_loads_gpt_checkpoint_with_equal_logits(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = make_gpt(tie_word_embeddings=tie, rope_theta=5000.0, eos_token_id=[1, 2], pad_token_id=0)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [1, 2]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == tie
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    ids = random_ids(3, 17)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_gpt_loads_transformers_checkpoint_with_equal_logits(tmp_path, tie):
    hf = make_llama(tie)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.rope_theta == 5000.0 and model.config.intermediate_size == 80
    assert model.config.tie_word_embeddings == tie
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    ids = random_ids(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
        # left padding through both models' attention masks
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(ids, position_ids=pos, attention_mask=mask)
        theirs = hf(ids, position_ids=pos, attention_mask=mask).logits
        torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_save_load_round_trip(tmp_path):
    model = make_gpt(tie_word_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == model.config
    sd, ld = model.state_dict(), loaded.state_dict()
    assert sd.keys() == ld.keys()
    assert all(torch.equal(sd[k], ld[k]) for k in sd)
    ids = random_ids(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))

    tied = make_gpt()
    tied.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    assert "lm_head.weight" not in load_file(tmp_path / "bf16" / "model.safetensors")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = GPT.from_pretrained(tmp_path / "bf16")
    assert back.lm_head.weight.dtype == torch.bfloat16 and back.lm_head.weight is back.model.embed_tokens.weight
    assert GPT.from_pretrained(tmp_path / "bf16", dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_parameter_names_are_llamas():
    names = set(make_gpt().state_dict())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    for part in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ):
        assert f"model.layers.1.{part}.weight" in names
    assert not any(n.endswith("bias") for n in names)


# --- attention: padding, causality, cache ---------------------------------------------------------


def test_left_padded_logits_equal_unpadded():
    model = make_gpt()
    seqs = [random_ids(1, 11, seed=2)[0], random_ids(1, 6, seed=3)[0], random_ids(1, 1, seed=4)[0]]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, T - len(s) :], mask[i, T - len(s) :] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(ids, position_ids=pos, attention_mask=mask)
        default_pos = model(ids, attention_mask=mask)  # RoPE is relative: same up to rounding
        assert torch.isfinite(padded).all()
        for i, s in enumerate(seqs):
            alone = model(s[None])[0]
            torch.testing.assert_close(padded[i, T - len(s) :], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(default_pos[i, T - len(s) :], alone, atol=1e-4, rtol=0)


def test_future_tokens_do_not_change_earlier_logits():
    model = make_gpt()
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(ids), model(changed)
        mask = torch.ones_like(ids)  # the explicit-mask path, too
        c = model(changed, attention_mask=mask)
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=0, rtol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 1e-4
    torch.testing.assert_close(c, b, atol=1e-5, rtol=0)


def decode_in_steps(model, ids, mask, cache, prefill: int) -> torch.Tensor:
    """Logits of left-padded rows (B, T, V): the first `prefill` tokens in one call, then one token per call."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = [model(ids[:, :prefill], position_ids=pos[:, :prefill], attention_mask=mask[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        steps.append(
            model(ids[:, t : t + 1], position_ids=pos[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
        )
    return torch.cat(steps, 1)


def test_kv_cache_prefill_and_decode_equal_full_forward():
    model = make_gpt()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = KVCache(model.config, batch_size=2, max_len=10)
    with torch.no_grad():
        full = model(ids, position_ids=pos, attention_mask=mask)
        steps = decode_in_steps(model, ids, mask, cache, prefill=6)
        assert cache.length == 10
        torch.testing.assert_close(steps[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="overflow"):
            model(ids[:, :1], cache=cache)
        # no padding: cache with default positions equals the is_causal fast path
        cache = KVCache(model.config, batch_size=2, max_len=10)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 10)]
        torch.testing.assert_close(torch.cat(steps, 1), model(ids), atol=1e-5, rtol=0)


def test_cache_with_fused_weights_decodes_like_the_plain_layers():
    model = make_gpt()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        fused = KVCache(model.config, batch_size=2, max_len=10, model=model)
        assert all(f is not None for f in fused.fused)
        torch.testing.assert_close(
            decode_in_steps(model, ids, mask, fused, prefill=5),
            decode_in_steps(model, ids, mask, KVCache(model.config, 2, 10), prefill=5),
            atol=1e-5,
            rtol=0,
        )
        hidden = torch.randn(3, 32)
        torch.testing.assert_close(fused.logits(model, hidden), model.lm_head(hidden), atol=1e-5, rtol=0)
    # a layer whose projections compute more than their weight (LoRA, quantized) keeps its own forward
    model.model.layers[0].self_attn.k_proj = torch.nn.Sequential(model.model.layers[0].self_attn.k_proj)
    assert fuse_layer(model.model.layers[0]) is None and fuse_layer(model.model.layers[1]) is not None
    model.lm_head = torch.nn.Sequential(model.lm_head)  # so does such a head
    cache = KVCache(model.config, batch_size=2, max_len=10, model=model)
    assert cache.head is None
    torch.testing.assert_close(cache.logits(model, hidden), model.lm_head(hidden), atol=0, rtol=0)


@pytest.mark.parametrize("heads,kv", [(4, 4), (4, 2), (6, 1)])
def test_decode_attention_equals_sdpa(heads, kv):
    """The decoding step's batched-matmul attention: SDPA's numbers (grouped query heads included) for one
    query over cache slices read in place, with masked key positions."""
    torch.manual_seed(0)
    B, S, hd = 5, 11, 16
    q = torch.randn(B, heads, 1, hd)
    cache_k, cache_v = torch.randn(B, kv, 20, hd), torch.randn(B, kv, 20, hd)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # the views the KV cache hands out
    bias = torch.zeros(B, 1, 1, S)
    bias[0, ..., :4] = float("-inf")  # left padding of row 0
    bias[3, ..., 2:5] = float("-inf")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=heads != kv)
    torch.testing.assert_close(decode_attention(q, k, v, bias), ref, atol=1e-6, rtol=1e-5)


def test_return_hidden_feeds_lm_head():
    model = make_gpt()
    ids = random_ids(2, 5)
    with torch.no_grad():
        hidden = model(ids, return_hidden=True)
        assert hidden.shape == (2, 5, 32)
        torch.testing.assert_close(model.lm_head(hidden), model(ids), atol=0, rtol=0)


# --- accounting -----------------------------------------------------------------------------------


def test_num_params_and_flops():
    tied, untied = make_gpt(), make_gpt(tie_word_embeddings=False)
    D, V, F, L, kv = 32, VOCAB, 128, 2, 16  # kv = 2 heads * head_dim 8
    per_layer = D * D + 2 * D * kv + D * D + 3 * D * F + 2 * D
    body = L * per_layer + D
    assert tied.num_params() == V * D + body
    assert untied.num_params() == 2 * V * D + body
    assert tied.num_params(exclude_embeddings=True) == body
    assert tied.flops_per_token(64) == 6 * (body + V * D) + 12 * L * D * 64
    assert untied.flops_per_token(64) == tied.flops_per_token(64)


def test_gqa_decoding_through_sdpa_with_gpu_strides(monkeypatch):
    """The decoding branch GPUs take (grouped query heads through SDPA), run here on the CPU: with SDPA
    returning its output in another memory layout, as CUDA's kernels do (the same values, strides of a
    transposed tensor), padded batched decoding still equals the full forward. `.view` on that output
    raised "view size is not compatible with input tensor's size and stride" on a GPU."""
    import aligner.model.attention as attention

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def cuda_like(*args, **kw):
        out = sdpa(*args, **kw)  # (B, heads, T, hd) -> the same values laid out as (B, T, heads, hd)
        return out.transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(attention, "matmul_decoding", lambda device: False)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", cuda_like)
    for heads, kv in [(4, 2), (4, 1)]:
        model = make_gpt(num_attention_heads=heads, num_key_value_heads=kv)
        ids = random_ids(3, 10)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            full = model(ids, position_ids=pos, attention_mask=mask)
            for cache in (KVCache(model.config, 3, 10), KVCache(model.config, 3, 10, model=model)):  # plain, fused
                steps = decode_in_steps(model, ids, mask, cache, prefill=4)
                torch.testing.assert_close(steps[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)
