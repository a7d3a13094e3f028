"""The GPT core's decoding state: a preallocated KV cache and, per layer, fused projection weights.

cache = KVCache(model.config, batch_size, max_len, model=model)   # one per generation
logits = model(prompt_ids, cache=cache)                          # prefill, then one token at a time
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from aligner.model.rope import rope_cos_sin

if TYPE_CHECKING:
    from aligner.model.gpt import GPT, Block, GPTConfig


@dataclass
class FusedWeights:
    """One layer's q/k/v and gate/up projection weights, concatenated and transposed, so that decoding
    runs two matmuls where the layer has five, each `x @ w` on a (D, out) matrix (on the CPU ~1.3x
    faster than `F.linear` on the (out, D) layout at decoding's few rows). A copy: valid while the
    model's weights do not change."""

    qkv: torch.Tensor  # (D, H * hd + 2 * KV * hd)
    gate_up: torch.Tensor  # (D, 2 * F)


def fuse_layer(block: Block) -> FusedWeights | None:
    """The fused weights of a block whose projections are plain nn.Linear layers, else None (a LoRA or
    quantized layer computes more than its weight, so it keeps its own forward)."""
    attn, mlp = block.self_attn, block.mlp
    if any(type(m) is not nn.Linear for m in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)):
        return None
    w = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    return FusedWeights(
        qkv=torch.cat(w).detach().t().contiguous(),
        gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().t().contiguous(),
    )


def transposed_head(model: GPT) -> torch.Tensor | None:
    """The LM head's weight as a (D, V) matrix for `hidden @ head`, on the CPU (where that layout is
    faster; a GPU gains nothing for the copy's memory). None elsewhere, and for a head that is not a
    plain nn.Linear (e.g. one given LoRA adapters)."""
    head = model.lm_head
    if type(head) is not nn.Linear or head.weight.device.type != "cpu":
        return None
    return head.weight.detach().t().contiguous()


class KVCache:
    """Preallocated keys and values, (B, KV, max_len, hd) per layer, filled left to right.

    One forward writes its T new positions into every layer, then `GPT.forward` advances `length`.
    Works for a prefill of many tokens and for decoding one token at a time. With `whole` (the default on
    the CPU for caches below fp32), decoding attends over all max_len positions, the unfilled ones masked
    out: the keys stay one contiguous tensor, where a slice of them would be copied by the CPU's bf16
    batched matmuls at every layer and step (more than a third of bf16 decoding's time). Given `model`, the cache
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
        whole: bool | None = None,
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        cpu = torch.device(device or "cpu").type == "cpu"
        self.whole = (cpu and dtype != torch.float32) if whole is None else whole
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled so far
        self.fused = [fuse_layer(block) for block in model.model.layers] if model is not None else None
        self.head = transposed_head(model) if model is not None else None  # (D, V), for `logits`
        self.config = config
        self.rope_table = self._rope_table(dtype)  # RoPE's cos and sin (max_len, hd) of every position

    def _rope_table(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:

        positions = torch.arange(self.max_len, device=self.keys[0].device)[None]  # (1, max_len)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
        return cos[0], sin[0]

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin (B, T, hd) at `position_ids` (each below max_len), looked up in the cache's
        table: the very values `rope_cos_sin` computes, without its dozen small operations per step."""
        if self.rope_table[0].dtype != dtype:  # a model in another dtype than the cache's
            self.rope_table = self._rope_table(dtype)
        cos, sin = self.rope_table
        return cos[position_ids], sin[position_ids]

    def fused_weights(self, layer_idx: int) -> FusedWeights | None:
        """Layer `layer_idx`'s fused projection weights, or None (no model given, or a layer that keeps its own)."""
        return self.fused[layer_idx] if self.fused is not None else None

    def logits(self, model: GPT, hidden: torch.Tensor) -> torch.Tensor:
        """model.lm_head(hidden), through the transposed copy of the head when the cache holds one."""
        return hidden @ self.head if self.head is not None else model.lm_head(hidden)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store new (B, KV, T, hd) keys/values after the cached ones; return all (B, KV, S, hd): the filled
        S positions, or when decoding (T = 1) into a `whole` cache all max_len of them (see `decode_mask`)."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: {end} positions needed, max_len is {self.max_len}")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        if self.whole_step(k.shape[2]):
            return self.keys[layer_idx], self.values[layer_idx]
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def whole_step(self, new: int) -> bool:
        """Whether a forward of `new` tokens attends over every position (decoding into a `whole` cache)."""
        return self.whole and new == 1 and self.length > 0

    def decode_mask(self, bias: torch.Tensor) -> torch.Tensor:
        """A decoding step's additive mask (B, 1, 1, S) over the filled positions, widened to every position
        that `update` returns (`whole_step`): -inf over the unfilled ones."""
        return torch.nn.functional.pad(bias, (0, self.max_len - bias.shape[-1]), value=float("-inf"))

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows `index` (a 1-D tensor of row numbers), in that order."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0
