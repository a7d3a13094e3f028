"""Tiny random models of the real architectures users bring, built from their configs: Llama-3 (llama3 RoPE
scaling, tied embeddings as in Llama-3.2-1B), Qwen2 (q/k/v biases), Gemma-2 (attention and final logit soft
caps, alternating sliding-window layers, scaled embeddings) and Mistral (sliding window), each saved with a
small BPE tokenizer carrying its family's chat template (prompts/*.jinja), as a Hub download would be."""

from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama3", "qwen2", "gemma2", "mistral")
TEMPLATE = {"llama3": "llama3", "qwen2": "qwen", "gemma2": "gemma", "mistral": "mistral"}
MODEL_CLASS = {
    "llama3": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "mistral": "MistralForCausalLM",
}


def tiny_config(family: str, vocab: int, tok):
    import transformers

    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return transformers.LlamaConfig(**common, rope_parameters=rope, tie_word_embeddings=True)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if family == "gemma2":
        return transformers.Gemma2Config(
            **common,
            head_dim=8,
            query_pre_attn_scalar=8,
            sliding_window=16,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        )
    return transformers.MistralConfig(**common, sliding_window=32)


def write_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """A random `family` causal LM (under 1M parameters) and its tokenizer, saved in `directory`."""
    import transformers
    from conftest import chat_tokenizer

    from aligner.model.load import vocab_padded

    tok = chat_tokenizer(TEMPLATE[family])
    config = tiny_config(family, vocab_padded(len(tok)), tok)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASS[family])(config)
    directory = Path(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
