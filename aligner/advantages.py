"""Advantages and KL terms for online RL (PPO, GRPO): pure torch, no model code.

Shapes: per-token tensors are (B, T) over completion positions with a 0/1 `mask` (1 on completion
tokens, 0 on padding after EOS). GAE: Schulman et al. 2016, eq. 16; group advantages: Shao et al. 2024
(DeepSeekMath), eq. 3 and Dr. GRPO (Liu et al. 2025) for the unscaled variant.
"""

from __future__ import annotations

import torch

from aligner.logprobs import masked_mean


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as TRL and OpenRLHF); masked-out
    entries come back as 0. shift_mean=False keeps the mean (for rewards)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = ((x - mean) ** 2 * mask).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) per row, right to left:
    delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last completion token),
    A_t = delta_t + gamma lam A_{t+1}; returns R_t = A_t + V_t. Returns (advantages, returns), 0 off-mask."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # padding positions pass the future through unchanged (they sit after the last token anyway)
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, a, next_adv)
    return adv, (adv + values) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """GRPO advantages of (N*G,) rewards, grouped G per prompt in order: r - mean(group), divided by the
    group's std (scale "group"), the whole batch's std ("batch") or nothing ("none", Dr. GRPO).
    A group whose rewards are all equal gets advantage 0 (no signal), never a division by zero."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)  # (N, G)
    equal = (r == r[:, :1]).all(-1, keepdim=True)  # (N, 1); exactly 0 there, not the mean's rounding error
    centred = (r - r.mean(-1, keepdim=True)).masked_fill(equal, 0.0)
    if scale == "group":
        centred = centred / (r.std(-1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (rewards.float().std() + eps)
    elif scale != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got '{scale}'")
    return centred.view(-1)


class AdaptiveKLController:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        error = min(max(kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
        return self.beta


def normalize(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(x - mean) / (std + eps) over every entry (RLOO's optional advantage normalisation)."""
    x = x.float()
    return (x - x.mean()) / ((x.std() if x.numel() > 1 else x.new_zeros(())) + eps)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantages of (N*k,) rewards, grouped k per prompt in order (Ahmadian et al. 2024, eq. 5;
    Kool et al. 2019): A_i = r_i - 1/(k-1) sum_{j != i} r_j, each completion's baseline the mean reward of
    the other k - 1 completions of its prompt (= k/(k-1) (r_i - mean of the group))."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} >= 2")
    r = rewards.float().view(-1, group_size)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).view(-1)


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """Per-token rewards of the KL-penalised objective (Ziegler et al. 2019; Ouyang et al. 2022, eq. 2):
    r_t = -coef KL_t on every completion token, plus the sequence's score (B,) on its last token. (B, T),
    0 off the mask; a row without completion tokens gets nothing."""
    mask = mask.float()
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)  # the final completion token
    return (-coef * kl + last.float() * scores.to(kl.device, kl.dtype)[:, None]) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over each row's completion tokens (right to left), 0 off the mask."""
    rewards, mask = rewards.float(), mask.float()
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t] > 0, rewards[:, t] + gamma * running, running)
        out[:, t] = running * mask[:, t]
    return out


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++'s token advantages (Hu 2025, eqs. 6-7): the discounted return of each completion token,
    normalised to mean 0 and std 1 over every completion token of the batch (global batch normalisation)."""
    return whiten(discounted_returns(rewards, mask, gamma), mask)


def best_and_worst(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online DPO's pairs from (N*G,) rewards, grouped G per prompt in order: for each group the indices of its
    best (first highest) and worst (first lowest) completion and whether they differ (a tied group: no pair).
    Returns (chosen (N,), rejected (N,), untied (N,) bool)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    offset = torch.arange(r.shape[0]) * group_size
    best, worst = r.argmax(-1), r.argmin(-1)
    return offset + best, offset + worst, r.max(-1).values > r.min(-1).values
