"""The loop's optimisation settings: precision (bf16 autocast where it is fast, fp16 with accelerate's
gradient scaler), the accelerator, AdamW's weight-decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator

from aligner.model.quant import cpu_has_fast_bf16


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs and CPUs with fast bf16, fp16 on older GPUs, else fp32; otherwise as asked."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"


def make_accelerator(precision: str) -> Accelerator:
    # bf16 autocast is applied by the loop itself (accelerate would cast every output, logits
    # included, back to fp32); fp16 needs accelerate's gradient scaler.
    # cpu=True on machines without an accelerator makes a multi-process launch use gloo on the CPU.
    # DeepSpeed runs on CPUs through its own CPU accelerator: not with cpu=True (which turns DeepSpeed off), and
    # with the gloo backend named (else accelerate counts one process on every rank)
    from aligner.trainers import zero

    no_accelerator = not torch.cuda.is_available() and not torch.backends.mps.is_available()
    mixed = "fp16" if precision == "fp16" else "no"
    if zero.requested() and no_accelerator:
        from accelerate.utils import InitProcessGroupKwargs

        return Accelerator(mixed_precision=mixed, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(mixed_precision=mixed, cpu=no_accelerator)


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 1/warmup to 1, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; do not decay norms, biases or embeddings (nor a head tied to them)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # no empty group (DeepSpeed drops them, the schedule would not)
