"""One entry for models and tokenizers: the GPT core (fresh or from a checkpoint) or any HF causal LM.

transformers is imported only here (and in the tokenizer module) inside model/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aligner.config import ModelConfig, resolve_path
from aligner.errors import ConfigError
from aligner.model.gpt import GPT, GPTConfig
from aligner.model.tokenizer import end_of_turn_ids


def vocab_padded(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up for faster matmuls."""
    return (n + multiple - 1) // multiple * multiple


def is_gpt_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a Llama-format checkpoint that the GPT core can load."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    d = json.loads(cfg.read_text())
    return d.get("model_type") == "llama" and not d.get("attention_bias") and not d.get("mlp_bias")


def build_model(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """The policy to train: a fresh GPT core, a GPT-core checkpoint, or an HF model (arch: hf)."""
    if cfg.arch == "hf":
        return load_hf_model(cfg.init_from, trust_remote_code=cfg.trust_remote_code)
    if cfg.init_from:
        path = resolve_path(cfg.init_from)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.init_from: '{cfg.init_from}' is not a checkpoint directory (no config.json)")
        try:
            return GPT.from_pretrained(path)
        except ValueError as e:
            raise ConfigError(f"model.init_from: {e}; set model.arch: hf to load it as a Hugging Face model") from None
    eos = end_of_turn_ids(tokenizer)
    gpt_cfg = GPTConfig(
        vocab_size=vocab_padded(len(tokenizer)),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT(gpt_cfg)


def load_hf_model(name_or_path: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    path = resolve_path(name_or_path)
    target = str(path) if path.exists() else name_or_path
    try:
        return AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ConfigError(f"model.init_from: cannot load '{name_or_path}': {str(e).splitlines()[0]}") from None


def load_model(path: str | Path, arch: str = "auto") -> torch.nn.Module:
    """Load any checkpoint for inference: the GPT core when it can, else transformers."""
    path = resolve_path(path)
    if arch == "gpt" or (arch == "auto" and is_gpt_checkpoint(path)):
        return GPT.from_pretrained(path)
    return load_hf_model(str(path))


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_path(name_or_path)
    target = str(path) if path.exists() else str(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}") from None
    return tok


def has_tokenizer(path: str | Path) -> bool:
    p = resolve_path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def logits_of(output) -> torch.Tensor:
    """Logits from the GPT core (a tensor) or an HF model (an output object)."""
    return output if torch.is_tensor(output) else output.logits
