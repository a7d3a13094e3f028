"""The GPT core's decoding state: a preallocated KV cache and, per layer, fused projection weights.

cache = KVCache(model.config, batch_size, max_len, model=model)   # one per generation
logits = model(prompt_ids, cache=cache)                          # prefill, then one token at a time
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from aligner.model.gpt import GPT, Block, GPTConfig


@dataclass
class FusedWeights:
    """One layer's q/k/v and gate/up projection weights, concatenated so that decoding runs two
    matmuls where the layer has five (a copy: valid while the model's weights do not change)."""

    qkv: torch.Tensor  # (H * hd + 2 * KV * hd, D)
    qkv_sizes: tuple[int, int, int]
    gate_up: torch.Tensor  # (2 * F, D)


def fuse_layer(block: Block) -> FusedWeights | None:
    """The fused weights of a block whose projections are plain nn.Linear layers, else None (a LoRA or
    quantized layer computes more than its weight, so it keeps its own forward)."""
    attn, mlp = block.self_attn, block.mlp
    if any(type(m) is not nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)):
        return None
    w = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    return FusedWeights(
        qkv=torch.cat(w).detach(),
        qkv_sizes=tuple(t.shape[0] for t in w),
        gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
    )


class KVCache:
    """Preallocated keys and values, (B, KV, max_len, hd) per layer, filled left to right.

    One forward writes its T new positions into every layer, then `GPT.forward` advances `length`.
    Works for a prefill of many tokens and for decoding one token at a time. Given `model`, the cache
    also holds each layer's fused projection weights (`FusedWeights`), so a cache must not outlive
    an optimizer step of that model: make a new one per generation, as the torch engine does.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int,
        device=None,
        dtype=torch.float32,
        model: GPT | None = None,
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far
        self.fused = [fuse_layer(block) for block in model.model.layers] if model is not None else None

    def fused_weights(self, layer_idx: int) -> FusedWeights | None:
        """Layer `layer_idx`'s fused projection weights, or None (no model given, or a layer that keeps its own)."""
        return self.fused[layer_idx] if self.fused is not None else None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store new (B, KV, T, hd) keys/values after the cached ones; return all (B, KV, S, hd)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, max_len is {self.max_len}")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
