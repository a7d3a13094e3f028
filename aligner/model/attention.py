"""The GPT core's attention: grouped-query attention (Ainslie et al. 2023) over RoPE-rotated queries and keys,
through SDPA, with the masks it needs (left padding, padding-free packed documents, a KV cache) and the
one-token decoding step.

Shapes: B batch, T new tokens, S attended key positions (cached + new), H query heads, KV key/value
heads, hd head size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from aligner.model.rope import apply_rope

if TYPE_CHECKING:
    from aligner.model.gpt import GPTConfig
    from aligner.model.kv_cache import FusedWeights, KVCache


def packed_document_ids(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of every token of padding-free packed rows, or None when no row is packed.

    A new document starts wherever the position does not follow the previous one (positions restart
    at 0 for each packed example), the same rule transformers uses, so both see the same documents.
    """
    first = position_ids[:, :1] - 1
    starts = torch.diff(position_ids, prepend=first, dim=-1) != 1  # (B, T)
    docs = starts.cumsum(-1)  # (B, T)
    return None if bool((docs[:, -1] == 0).all()) else docs


def build_attn_mask(
    q_len: int,
    past_len: int,
    padding_mask: torch.Tensor | None,
    device,
    document_ids: torch.Tensor | None = None,
    branch_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean attention mask (B or 1, 1, T, S), True = may attend; None = plain causal.

    Query i sits at key slot past_len + i and sees keys j <= past_len + i that are not padding and,
    for packed rows (`document_ids`, (B, T), no cache), that belong to the same document. `branch_ids`
    (B, T) make a document a shared prefix (0) followed by branches (1, 2, ...) that each continue the
    prefix on their own: a token sees the prefix and its own branch, never another branch (a chosen and a
    rejected reply after their common prompt, in one pass).
    None lets SDPA use `is_causal=True` (no cache, no padding, no packing).
    """
    if padding_mask is None and past_len == 0 and document_ids is None:
        return None
    q_idx = torch.arange(past_len, past_len + q_len, device=device)[:, None]  # (T, 1)
    k_idx = torch.arange(past_len + q_len, device=device)[None, :]  # (1, S)
    mask = (k_idx <= q_idx)[None, None]  # (1, 1, T, S)
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])  # (B, 1, T, T)
    if branch_ids is not None:
        key_branch = branch_ids[:, None, None, :]  # (B, 1, 1, T)
        mask = mask & ((key_branch == 0) | (key_branch == branch_ids[:, None, :, None]))
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]  # (B, 1, T, S)
        # a padding query still sees itself: SDPA returns NaN for a row with nothing to attend to
        mask = mask | (k_idx == q_idx)
    return mask


def decode_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (B, 1, 1, S) of one new token per row over every key: 0 where `attention_mask`
    (B, S) is 1 and on the new token itself (the last key), -inf elsewhere. The same values as
    `build_attn_mask` for one query, in three operations instead of a dozen (log(1) = 0, log(0) = -inf)."""
    keep = attention_mask.to(dtype, copy=True)
    keep[:, -1] = 1
    return keep.log()[:, None, None, :]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Attention of one new token per row: q (B, H, 1, hd) over cached k, v (B, KV, S, hd) under an
    additive bias (B, 1, 1, S); returns (B, H, 1, hd). The query heads of each key/value head are that
    head's rows of one batched matmul (scores = bias + q k^T / sqrt(hd), softmax, @ v), which on the CPU
    beats SDPA's flash kernel at a single query (benchmarks/rollout_throughput.py: ~10% more tokens/s).
    The keys and values are read in place (the cache's slices reshape without a copy)."""
    B, H, _, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    G = H // KV
    grouped = q.reshape(B * KV, G, hd)  # (B * KV, G, hd): query head h belongs to key/value head h // G
    bias = bias.expand(B, KV, G, S).reshape(B * KV, G, S)
    scores = torch.baddbmm(bias, grouped, k.reshape(B * KV, S, hd).transpose(1, 2), alpha=hd**-0.5)  # (B*KV, G, S)
    return torch.bmm(scores.softmax(-1), v.reshape(B * KV, S, hd)).reshape(B, H, 1, hd)


def matmul_decoding(device: torch.device) -> bool:
    """Whether one-token decoding uses `decode_attention` (batched matmuls: faster on the CPU) rather than
    SDPA (GPUs). A function, so that tests can run the GPU branch on the CPU."""
    return device.type == "cpu"


class Attention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        D = config.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, fused: FusedWeights | None = None):
        B, T, _ = x.shape
        if fused is not None:  # decoding: one matmul for q, k and v, and one RoPE call for q and k
            qkv = (x @ fused.qkv).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim)
            qk = apply_rope(qkv[:, :, : self.n_heads + self.n_kv], cos, sin, heads_dim=2)
            q = qk[:, :, : self.n_heads].transpose(1, 2)  # (B, H, T, hd)
            k = qk[:, :, self.n_heads :].transpose(1, 2)  # (B, KV, T, hd)
            v = qkv[:, :, self.n_heads + self.n_kv :].transpose(1, 2)  # (B, KV, T, hd)
        else:
            q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
            k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
            v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd)
        gqa = self.n_heads != self.n_kv  # SDPA shares each key/value head among its query heads, no copy
        if T == 1 and cache is not None and mask is not None and matmul_decoding(x.device):  # additive mask
            y = decode_attention(q, k, v, mask)
        elif gqa and T == 1 and mask is not None:
            # one new token: the query heads of a key/value head become that head's queries, a plain
            # attention that SDPA runs faster than enable_gqa (same numbers: each query head still sees
            # only its own key/value head, under the same (B, 1, 1, S) mask). SDPA's output strides differ
            # between kernels (CUDA's are not those of a contiguous tensor): reshape, never view
            grouped = q.reshape(B, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # (B, KV, H / KV, hd)
            y = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask)  # (B, KV, H / KV, hd)
            y = y.reshape(B, self.n_heads, T, self.head_dim)  # (B, H, 1, hd)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd)
        return self.o_proj(y)
