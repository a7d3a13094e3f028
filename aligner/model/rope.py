"""Rotary position embeddings (Su et al. 2021, RoFormer), in Llama's half-split layout: the cos / sin tables of
given positions and their application to queries and keys. Shared by the GPT core and its KV cache."""

from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos and sin tables (B, T, hd) for the given positions, in Llama's half-split layout."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)  # (hd/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_dim: int = 1) -> torch.Tensor:
    """Rotate (B, heads, T, hd) queries or keys (or (B, T, heads, hd) with heads_dim=2); cos/sin are (B, T, hd)."""
    cos, sin = cos.unsqueeze(heads_dim), sin.unsqueeze(heads_dim)  # (B, 1, T, hd) or (B, T, 1, hd)
    return x * cos + rotate_half(x) * sin
