"""One entry for models and tokenizers: the GPT core (fresh or from a checkpoint) or any HF causal LM,
full-parameter or with LoRA / QLoRA adapters (peft + bitsandbytes).

transformers, peft and bitsandbytes are imported only here (and the tokenizer module) inside model/,
lazily, so `import aligner.losses` stays light. A checkpoint that holds an adapter
(adapter_config.json) loads as its base model with the adapter merged in.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
from pathlib import Path

import torch

from aligner.config import LoRAConfig, ModelConfig, resolve_path
from aligner.errors import AlignerError, ConfigError
from aligner.model.gpt import GPT, GPTConfig
from aligner.model.tokenizer import end_of_turn_ids


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
    parts = Path(name).parts
    stage = parts[-2] if len(parts) >= 2 and parts[-1] == "final" else None
    if stage in STAGE_COMMANDS:
        hint = f"; run `aligner {stage}` first (it writes {name}), or set {what} to a checkpoint or Hub model"
    else:
        hint = f"; set {what} to a checkpoint directory or a Hugging Face model name"
    raise ConfigError(f"{what}: '{name}' does not exist{hint}")


STAGE_COMMANDS = ("pretrain", "sft", "rm", "dpo", "grpo", "ppo")  # runs/<stage>/final is written by `aligner <stage>`


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


def _bitsandbytes():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("lora.quantize nf4 (QLoRA) needs bitsandbytes: pip install 'aligner[qlora]'") from None
    return bnb


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN has native bf16 kernels (AVX-512 BF16 / AMX). On AVX2-only CPUs bf16
    matmuls are emulated and several times slower than fp32, so autocast would hurt."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _compute_dtype(cfg: LoRAConfig) -> torch.dtype:
    """bf16 as QLoRA prescribes, except under `auto` on CPUs without native bf16 (AVX2-only), where
    bf16 matmuls are emulated and about ten times slower than fp32."""
    if cfg.compute_dtype == "auto":
        fast = torch.cuda.is_available() or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32


def _quant_device() -> torch.device:
    import os

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (REFERENCE.md, LoRA / QLoRA).

    On CPUs with AVX-512 BF16, bitsandbytes' Linear4bit converts its weight in place, the first time
    it runs in eval mode without grad (an eval pass, generation), to a layout whose kernel has no
    autograd; from then on LoRA adapters on that layer get zero gradients without any error. The
    conversion is gated by a per-layer flag, which this clears on every 4-bit layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantize_linear_4bit(model: torch.nn.Module, cfg: LoRAConfig, device: torch.device) -> torch.nn.Module:
    """Replace every linear projection of a plain nn.Module (the GPT core) except the output head by a
    bitsandbytes NF4 Linear4bit holding the same weights, quantized on `device`."""
    bnb = _bitsandbytes()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=_compute_dtype(cfg),
            compress_statistics=cfg.double_quant,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data.float().contiguous(),
            requires_grad=False,
            quant_type="nf4",
            compress_statistics=cfg.double_quant,
            module=q,
        )
        if lin.bias is not None:
            q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to(device)  # Params4bit quantizes when first moved to a device
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    model.to(device)
    model.is_loaded_in_4bit = True  # peft wraps 4-bit layers with its bnb LoRA layers only when this is set
    return model


def build_qlora_model(model_cfg: ModelConfig, cfg: LoRAConfig, tokenizer) -> torch.nn.Module:
    """QLoRA: the base model frozen in 4-bit NF4 (double quantization, bf16 compute) plus LoRA adapters."""
    return apply_lora(build_quantized_model(model_cfg, cfg, tokenizer), cfg, base_path=adapter_base(model_cfg))


def adapter_base(model_cfg: ModelConfig) -> str | None:
    """What an adapter records as its base model: the absolute path of a local model, or the Hub name."""
    if not model_cfg.init_from:
        return None
    source = locate(model_cfg.init_from)
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def build_quantized_model(model_cfg: ModelConfig, cfg: LoRAConfig, tokenizer) -> torch.nn.Module:
    """The base model frozen in 4-bit NF4 (QLoRA's half before the adapters)."""
    bnb = _bitsandbytes()  # noqa: F841 (fail early with the install hint)
    device = _quant_device()
    if not uses_core(model_cfg):
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=_compute_dtype(cfg),
        )
        kw = {} if model_cfg.attn_implementation == "auto" else {"attn_implementation": model_cfg.attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(
            locate(model_cfg.init_from),
            quantization_config=quant,
            device_map={"": device},
            dtype=torch.float32,
            trust_remote_code=model_cfg.trust_remote_code,
            **kw,
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = quantize_linear_4bit(build_model(model_cfg, tokenizer), cfg, device)
    keep_4bit_layers_trainable(model)
    return model


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


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's .module and peft's wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (GPT core, HF models,
    reward/value models over either; through DDP and peft wrappers). Non-reentrant, so frozen
    embeddings under LoRA need no input-grad hook."""
    inner = _innermost(model)
    if hasattr(inner, "policy"):  # PPO's policy + critic
        for part in (inner.policy, getattr(inner, "critic", None)):
            if part is not None:
                enable_gradient_checkpointing(part)
        return
    gpt = inner if isinstance(inner, GPT) else getattr(inner, "_gpt", None)
    if gpt is not None:
        gpt.gradient_checkpointing = True
        return
    body = inner if hasattr(inner, "gradient_checkpointing_enable") else getattr(inner, "model", None)
    if body is None or not hasattr(body, "gradient_checkpointing_enable"):
        raise ConfigError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
    body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward has a parameter `name` (transformers' arguments change across releases)."""
    return name in _forward_parameters(type(model))


def skips_head(model: torch.nn.Module) -> bool:
    """Whether a transformers model's forward can compute the LM head on the last positions only."""
    return forward_takes(model, "logits_to_keep")


def fused_head(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight when log-probs may be computed from the final hidden states with it
    (`linear_token_logprobs`): a plain bias-free Linear head with no logit soft-capping or scaling and a
    forward that can skip the head (GPT core: return_hidden; transformers: logits_to_keep). Else None."""
    inner = _innermost(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None  # e.g. a LoRA-wrapped or quantized head: the full path applies it properly
    cfg = inner.config
    if isinstance(cfg, GPTConfig):
        return head.weight
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head.weight if skips_head(inner) else None


def causal_lm_token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids=None, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob (B, T) fp32 of each label (0 where labels == IGNORE_INDEX) under the model, wrapped or not.

    Where the head allows (`fused_head`), the model runs without its LM head and the head and log-softmax
    run together over the label positions only, in chunks (no (B, T, V) logits, forward or backward);
    otherwise from the full logits, chunked in fp32.
    """
    from aligner.losses import IGNORE_INDEX, linear_token_logprobs, token_logprobs

    weight = fused_head(model)
    if weight is None:
        logits = causal_lm_logits(model, input_ids, position_ids)
        if temperature != 1.0:
            logits = logits.float() / temperature
        return token_logprobs(logits, labels) * (labels != IGNORE_INDEX)
    if isinstance(base_config(model), GPTConfig):
        hidden = model(input_ids, position_ids=position_ids, return_hidden=True)
    else:  # the head runs on one position only; the last hidden state is the final norm's output
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
    return linear_token_logprobs(hidden, weight, labels, temperature)


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
