"""One entry for models and tokenizers: the GPT core (fresh or from a checkpoint) or any HF causal LM,
full-parameter or with LoRA / QLoRA adapters (peft + bitsandbytes).

transformers, peft and bitsandbytes are imported only here (and the tokenizer module) inside model/,
lazily, so `import aligner.losses` stays light. A checkpoint that holds an adapter
(adapter_config.json) loads as its base model with the adapter merged in.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from aligner.config import LoRAConfig, ModelConfig, resolve_path
from aligner.errors import AlignerError, ConfigError
from aligner.model.gpt import GPT, GPTConfig
from aligner.model.tokenizer import end_of_turn_ids
from aligner.registry import final_of


def vocab_padded(n: int, multiple: int = 64) -> int:
    """Embedding rows for a tokenizer of n tokens, rounded up for faster matmuls."""
    return (n + multiple - 1) // multiple * multiple


@contextlib.contextmanager
def loading(source, what: str = "model.init_from"):
    """Errors while reading a model from disk or the Hub (a missing or truncated file, a config that does not
    fit its weights, an unknown architecture) become one line naming `what` and the source."""
    try:
        yield
    except AlignerError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, ImportError) as e:
        raise ConfigError(f"{what}: cannot load '{source}': {' '.join(str(e).split()) or type(e).__name__}") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":  # safetensors' own error: a damaged file
            raise
        raise ConfigError(f"{what}: '{source}' has a damaged weights file ({str(e).splitlines()[0]})") from None


def core_mismatch(path: str | Path) -> str | None:
    """Why the GPT core cannot run the checkpoint in `path` exactly, or None when it can (a Llama
    config.json every field of which it implements: `GPTConfig.from_hf_dict` checks them one by one)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return f"{path} has no config.json"
    try:
        GPTConfig.from_hf_dict(json.loads(cfg.read_text()))
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def is_gpt_checkpoint(path: str | Path) -> bool:
    """True when `path` holds a Llama-format checkpoint that the GPT core runs exactly."""
    return core_mismatch(path) is None


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "name" or "org/name"


def locate(name_or_path: str | Path, what: str = "model.init_from") -> str:
    """A model source as transformers takes it: an existing local directory (its path), or a Hugging Face
    Hub name. A path that exists nowhere is a one-line error; for a run directory of this toolkit
    (runs/<stage>/final) it names the command that writes it."""
    name = str(name_or_path)
    path = resolve_path(name)
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"{what}: '{name}' is a file; give a checkpoint directory or a Hugging Face model name")
    first = Path(name).parts[0] if Path(name).parts else name
    local = name.startswith((".", "/", "~")) or resolve_path(first).is_dir() or not _HUB_ID.fullmatch(name)
    if not local:
        return name  # a Hub name: transformers downloads it (or says why not)
    stage = final_of(name)
    if stage:  # runs/<stage>/final is written by `aligner <stage>`
        hint = f"; run `aligner {stage}` first (it writes {name}), or set {what} to a checkpoint or Hub model"
    else:
        hint = f"; set {what} to a checkpoint directory or a Hugging Face model name"
    raise ConfigError(f"{what}: '{name}' does not exist{hint}")


def resolve_dtype(name: str, loaded: bool = True) -> torch.dtype:
    """model.dtype as a torch dtype. auto: bf16 for a loaded model on a GPU with bf16 (half the memory of
    fp32; bf16 autocast computes in bf16 anyway), fp32 on CPUs and for a fresh model (pretraining from
    scratch keeps fp32 master weights)."""
    if name == "auto":
        gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if loaded and gpu_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def uses_core(cfg: ModelConfig) -> bool:
    """Whether the recipe's model is the GPT core: a fresh one, `arch: gpt`, or (`arch: auto`) a local
    checkpoint the core runs exactly. Everything else goes through transformers."""
    if cfg.arch == "hf":
        return False
    if not cfg.init_from or cfg.arch == "gpt":
        return True
    return resolve_path(cfg.init_from).is_dir() and is_gpt_checkpoint(resolve_path(cfg.init_from))


def build_model(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    """The policy to train: a fresh GPT core, a GPT-core checkpoint, or any HF causal LM (see `uses_core`)."""
    dtype = resolve_dtype(cfg.dtype, loaded=bool(cfg.init_from))
    if cfg.init_from and (Path(locate(cfg.init_from)) / "adapter_config.json").is_file():
        # a LoRA run's checkpoint: its adapter merged into its base is the model to start from (and the
        # reference of DPO/GRPO/PPO); an adapter trained on top records this checkpoint as its base
        return load_adapter_model(locate(cfg.init_from), merge=True, dtype=cfg.dtype)
    if not uses_core(cfg):
        return load_hf_model(cfg.init_from, cfg.trust_remote_code, dtype, cfg.attn_implementation)
    if cfg.init_from:
        path = Path(locate(cfg.init_from))
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.init_from: '{cfg.init_from}' is not a checkpoint directory (no config.json)")
        with loading(cfg.init_from):
            return GPT.from_pretrained(path, dtype=dtype)
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
    return GPT(gpt_cfg).to(dtype)


def load_hf_model(
    name_or_path: str,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "auto",
    what: str = "model.init_from",
):
    """Any causal LM through transformers' AutoModelForCausalLM; errors are one line naming `what` and the source."""
    from transformers import AutoModelForCausalLM

    target = locate(name_or_path, what)
    kw = {} if attn_implementation == "auto" else {"attn_implementation": attn_implementation}
    with loading(name_or_path, what):  # missing files, offline, unknown architecture, bad kernel name, damaged weights
        return AutoModelForCausalLM.from_pretrained(target, dtype=dtype, trust_remote_code=trust_remote_code, **kw)


def load_model(
    path: str | Path, arch: str = "auto", dtype: str = "auto", attn_implementation: str = "auto"
) -> torch.nn.Module:
    """Load any checkpoint for inference (eval, generate, chat; the base of an adapter): the GPT core for a
    local checkpoint it runs exactly (`arch: auto`), else transformers; adapters are merged in."""
    source = locate(path, "checkpoint")
    local = Path(source)
    if local.is_dir() and (local / "adapter_config.json").is_file():
        return load_adapter_model(local, merge=True, dtype=dtype)
    if arch == "gpt" or (arch == "auto" and local.is_dir() and is_gpt_checkpoint(local)):
        mismatch = core_mismatch(local) if local.is_dir() else f"'{source}' is not a local directory"
        if mismatch is not None:
            raise ConfigError(f"{source}: --arch gpt, but the GPT core cannot run it exactly ({mismatch}); use auto")
        with loading(source, "checkpoint"):
            return GPT.from_pretrained(local, dtype=resolve_dtype(dtype))
    return load_hf_model(
        source, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation, what="checkpoint"
    )


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

    Works for the GPT core and scalar-head models (plain nn.Modules to peft) and HF models. A model's
    `head_names` (a reward or value head) are trained in full and saved with the adapter. `base_path`
    is recorded in the adapter config so a saved adapter knows which weights it applies to.
    """
    from peft import LoraConfig, get_peft_model

    heads = list(getattr(model, "head_names", ()))
    targets = linear_module_names(model) if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    targets = [t for t in targets if t not in heads]
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
        modules_to_save=heads or None,
        task_type=None if isinstance(model, GPT) or heads else "CAUSAL_LM",  # peft's LM wrapper for HF LMs only
        base_model_name_or_path=base_path,
    )
    return get_peft_model(model, config)


def adapter_base(model_cfg: ModelConfig) -> str | None:
    """What an adapter records as its base model: the absolute path of a local model, or the Hub name."""
    if not model_cfg.init_from:
        return None
    source = locate(model_cfg.init_from)
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def load_adapter_model(path: str | Path, merge: bool = False, dtype: str = "auto") -> torch.nn.Module:
    """A saved adapter on its base model (read from adapter_config.json; the base may itself be an adapter
    checkpoint, merged in turn), optionally merged into it."""
    from peft import PeftModel

    path = resolve_path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    base_path = config.get("base_model_name_or_path")
    if not base_path:
        raise ConfigError(f"{path}/adapter_config.json does not say which base model the adapter belongs to")
    # apply_lora gives the GPT core a plain PeftModel (no task type) and HF models a causal-LM one
    base = load_model(base_path, arch="hf" if config.get("task_type") == "CAUSAL_LM" else "gpt", dtype=dtype)
    with loading(path, "checkpoint"):
        model = PeftModel.from_pretrained(base, str(path))
    return model.merge_and_unload() if merge else model


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, what: str = "tokenizer"):
    """The tokenizer of a checkpoint directory or Hub model; a missing one is a one-line error naming it."""
    from transformers import AutoTokenizer

    target = locate(name_or_path, what)
    if Path(target).is_dir() and not has_tokenizer(target):
        raise ConfigError(f"'{name_or_path}' holds no tokenizer (tokenizer.json or tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{name_or_path}': {str(e).splitlines()[0]}") from None
    return tok


def has_tokenizer(path: str | Path) -> bool:
    p = resolve_path(path)
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


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
