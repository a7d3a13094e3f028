"""QLoRA's half before the adapters: a base model frozen in 4-bit NF4 (bitsandbytes, double quantization,
bf16 compute where bf16 is fast), for the GPT core and transformers models alike.

bitsandbytes is imported only here, lazily, with an install hint when it is missing.
"""

from __future__ import annotations

import torch

from aligner.config import LoRAConfig, ModelConfig
from aligner.errors import ConfigError
from aligner.model.load import adapter_base, apply_lora, build_model, locate, uses_core


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
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (QLoRA, Dettmers et al. 2023, on the CPU).

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
