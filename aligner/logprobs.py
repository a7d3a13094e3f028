"""Log-probability primitives every floor above uses: pure torch, no model, data or trainer code.

    token_logprobs          log p(label) from logits (B, T, V), chunked in fp32
    linear_token_logprobs   the same from final hidden states and the LM head's weight, the head and the
                            log-softmax fused (no (B, T, V) logits, forward or backward)
    summed_logps            each row's log-probs summed over its loss tokens (and their number); by document
                            for packed rows
    masked_mean             a mean over the positions of a 0/1 mask
    kl_estimate             per-token KL(policy || reference) from sampled tokens (k1, k3)

IGNORE_INDEX (-100) marks positions whose labels are not used; every module reads it from here.
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


def _chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one (rows, V) fp32 block is about 32 MiB."""
    return max(16, (32 << 20) // (4 * vocab))


class _LinearLogprobs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T / temperature)[label] chunk by chunk; backward recomputes each chunk's
    logits, so no (N, V) tensor is ever held: memory O(chunk x V) instead of O(N x V)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature: float, compute_dtype: torch.dtype):
        n, vocab = hidden.size(0), weight.size(0)
        step = _chunk_rows(vocab)
        w = weight.to(compute_dtype)
        out = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, step):
            logits = (hidden[s : s + step].to(compute_dtype) @ w.T).float() / temperature  # (rows, V)
            lse[s : s + step] = torch.logsumexp(logits, dim=-1)
            out[s : s + step] = logits.gather(-1, labels[s : s + step, None]).squeeze(-1) - lse[s : s + step]
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.temperature, ctx.compute_dtype = temperature, compute_dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        t, cd = ctx.temperature, ctx.compute_dtype
        step = _chunk_rows(weight.size(0))
        w = weight.to(cd)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        for s in range(0, hidden.size(0), step):
            h = hidden[s : s + step].to(cd)
            g = grad_out[s : s + step].float()
            probs = torch.exp((h @ w.T).float() / t - lse[s : s + step, None])  # softmax, (rows, V)
            d = probs.mul_(-g[:, None])  # d logp[label] / d logits = onehot - softmax
            d.scatter_add_(-1, labels[s : s + step, None], g[:, None])
            d = (d / t).to(cd)
            if grad_h is not None:
                grad_h[s : s + step] = (d @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (d.T @ h).float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each label under logits = hidden @ weight.T / temperature, without materialising
    the logits: the LM head and the log-softmax run together in chunks of rows, forward and backward.

    hidden: (..., D) final hidden states; weight: (V, D) the LM head; labels: (...) token ids, IGNORE_INDEX
    where not needed (those rows are skipped entirely and get log-prob 0). Returns (...) fp32 log-probs.
    The matmuls run in the autocast dtype when autocast is on (as the LM head would), the softmax in fp32.
    """
    dev = hidden.device.type
    compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    keep = (labels != IGNORE_INDEX).reshape(-1)
    idx = keep.nonzero().squeeze(-1)
    rows = hidden.reshape(-1, hidden.size(-1)).index_select(0, idx)  # (N, D): loss rows only
    with torch.autocast(dev, enabled=False):
        picked = _LinearLogprobs.apply(rows, weight, labels.reshape(-1)[idx], float(temperature), compute_dtype)
    out = torch.zeros(keep.numel(), dtype=torch.float32, device=hidden.device)
    return out.index_put((idx,), picked).view(labels.shape)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over all elements, or along `dim`)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's estimators):
    k1 = logp - ref (unbiased, can be negative); k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, >= 0)."""
    if kind == "k1":
        return logps - ref_logps
    if kind == "k3":
        d = ref_logps - logps
        return torch.exp(d) - d - 1
    raise ValueError(f"KL estimator must be k1 or k3, got '{kind}'")


def summed_logps(token_logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((B,), (B,)): each row's log-probs (B, T) summed over its loss tokens, and their number."""
    mask = labels != IGNORE_INDEX
    return (token_logps * mask).sum(-1), mask.sum(-1).to(token_logps.dtype)


def summed_logps_by_doc(
    token_logps: torch.Tensor, labels: torch.Tensor, doc_ids: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`summed_logps` for packed rows: ((n,), (n,)) sums and counts of loss tokens per document, where
    doc_ids (R, T) holds each position's document index (-1 for padding)."""
    mask = (labels != IGNORE_INDEX) & (doc_ids >= 0)
    docs = doc_ids[mask]
    sums = torch.zeros(n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, docs, token_logps[mask])
    counts = torch.bincount(docs, minlength=n).to(token_logps.dtype)
    return sums, counts
