"""Loss functions: pure torch, no model or trainer state.

Each loss returns `(loss, stats)`. Losses that are averaged over tokens come in *sum* form: they
return the sum over loss tokens, and the training loop divides by the number of loss tokens in the
whole accumulated (and, across processes, global) batch. That makes the gradient independent of how
a batch is split into micro-batches (transformers #37766), which a plain per-micro-batch mean is not.

Importing this module must not import transformers, peft or vllm.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Log-probability of each label under `logits`, computed in fp32.

    logits: (B, T, V) scores for the token at each position; labels: (B, T) token ids (any value
    where the position is not used; IGNORE_INDEX is fine). Returns (B, T) fp32 log-probs.
    Rows are processed in chunks so the fp32 (B, T, V) log-softmax is never held at once.
    """
    safe = labels.clamp(min=0)
    flat_logits = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    flat_labels = safe.reshape(-1)  # (B*T,)
    out = torch.empty(flat_labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, flat_labels.numel(), chunk_size):
        rows = flat_logits[start : start + chunk_size].float()
        picked = rows.gather(-1, flat_labels[start : start + chunk_size, None]).squeeze(-1)
        out[start : start + chunk_size] = picked - torch.logsumexp(rows, dim=-1)
    return out.view_as(labels)


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over loss tokens (SFT and pretraining).

    logits: (B, T, V) predictions for position t+1 made at position t, i.e. already aligned with
    `labels` (B, T), where labels == IGNORE_INDEX marks tokens outside the loss (prompt, padding).
    Returns (sum of token NLL in nats, {"tokens": number of loss tokens}). Divide by the number of
    loss tokens of the whole accumulated batch to get the token-mean cross-entropy.
    """
    mask = labels != IGNORE_INDEX
    nll = -token_logprobs(logits, labels)  # (B, T)
    loss = (nll * mask).sum()
    return loss, {"tokens": int(mask.sum())}
