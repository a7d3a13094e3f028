"""One entry for models and tokenizers: the GPT core (fresh or from a checkpoint) or any HF causal LM,
full-parameter or with LoRA / QLoRA adapters (peft + bitsandbytes).

transformers, peft and bitsandbytes are imported only here (and the tokenizer module) inside model/,
lazily, so `import aligner.losses` stays light. A checkpoint that holds an adapter
(adapter_config.json) loads as its base model with the adapter merged in.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from aligner.config import LoRAConfig, ModelConfig, resolve_path
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
    """Load any checkpoint for inference: the GPT core when it can, else transformers; adapters merged."""
    path = resolve_path(path)
    if (path / "adapter_config.json").is_file():
        return load_adapter_model(path, merge=True)
    if arch == "gpt" or (arch == "auto" and is_gpt_checkpoint(path)):
        return GPT.from_pretrained(path)
    return load_hf_model(str(path))


# --- LoRA / QLoRA ------------------------------------------------------------------------------------


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every linear projection except the output head: LoRA's "all-linear"."""
    names = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if is_linear and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model: torch.nn.Module, cfg: LoRAConfig, base_path: str | None = None) -> torch.nn.Module:
    """Wrap `model` with trainable LoRA adapters (peft); base weights are frozen.

    Works for the GPT core (a plain nn.Module to peft) and HF models. `base_path` is recorded in the
    adapter config so a saved adapter knows which weights it applies to.
    """
    from peft import LoraConfig, get_peft_model

    targets = linear_module_names(model) if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [t for t in targets if t not in present]
    if unknown or not targets:
        raise ConfigError(
            f"lora.target_modules: no module named {', '.join(unknown) or '(none)'} in the model "
            f"(linear projections: {', '.join(linear_module_names(model))}; or use all-linear)"
        )
    if base_path:
        model.name_or_path = base_path  # peft records it as the adapter's base_model_name_or_path
    config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        task_type=None if isinstance(model, GPT) else "CAUSAL_LM",
        base_model_name_or_path=base_path,
    )
    return get_peft_model(model, config)


def load_adapter_model(path: str | Path, merge: bool = False) -> torch.nn.Module:
    """A saved adapter on its base model (read from adapter_config.json), optionally merged into it."""
    from peft import PeftModel

    path = resolve_path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path:
        raise ConfigError(f"{path}/adapter_config.json does not say which base model the adapter belongs to")
    # apply_lora gives the GPT core a plain PeftModel (no task type) and HF models a causal-LM one
    base = load_model(base_path, arch="hf" if config.get("task_type") == "CAUSAL_LM" else "gpt")
    model = PeftModel.from_pretrained(base, str(path))
    return model.merge_and_unload() if merge else model


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


def base_config(model: torch.nn.Module):
    """The config of the model inside any wrappers (DDP's .module, peft's base model)."""
    while hasattr(model, "module"):
        model = model.module
    return model.config


def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids=None) -> torch.Tensor:
    """Logits (B, T, V) of the GPT core or an HF model, wrapped or not; position_ids may pack rows."""
    if isinstance(base_config(model), GPTConfig):
        return model(input_ids, position_ids=position_ids)
    # no cache and no attention mask: transformers reads restarting position_ids as packed documents
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export_merged(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Merge the adapter of `checkpoint` into its base model (loaded in full precision, also for QLoRA)
    and write a full HF-format model plus tokenizer to `out_dir`, atomically."""
    import shutil

    src = resolve_path(checkpoint)
    if not (src / "adapter_config.json").is_file():
        raise ConfigError(f"'{checkpoint}' holds no LoRA adapter (adapter_config.json); it is already a full model")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"'{out_dir}' exists and is not empty; pass --overwrite to replace it")
    model = load_adapter_model(src, merge=True)
    tmp = out.with_name(f".tmp_{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    if has_tokenizer(src):
        load_tokenizer(src).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
