"""Loss functions: pure torch, no model or trainer state.

Each loss returns `(loss, stats)`, the stats as detached 0-d tensors (the loop turns every step's stats into
numbers at once, so no stat makes the host wait for the GPU). Losses averaged over tokens come in *sum* form: they
return the sum over loss tokens, and the training loop divides by the number of loss tokens in the
whole accumulated (and, across processes, global) batch. That makes the gradient independent of how
a batch is split into micro-batches (transformers #37766), which a plain per-micro-batch mean is not.

Importing this module must not import transformers, peft or vllm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligner.logprobs import IGNORE_INDEX, kl_estimate


def sft_loss(logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Summed next-token cross-entropy over loss tokens (SFT and pretraining).

    logps: (B, T) log-probs of `labels` (B, T) under the model (`aligner.logprobs`: from logits, or fused
    with the LM head), where labels == IGNORE_INDEX marks tokens outside the loss (prompt, padding).
    Returns (sum of token NLL in nats, {"tokens": number of loss tokens}). The loop divides by the loss
    tokens of the whole accumulated batch: the token-mean cross-entropy.
    """
    mask = labels != IGNORE_INDEX
    return -(logps * mask).sum(), {"tokens": mask.sum()}


# --- preference losses -------------------------------------------------------------------------------
#
# Inputs are sequence log-probs summed over completion tokens, (B,) each: `chosen_logps`,
# `rejected_logps` under the policy and `ref_chosen_logps`, `ref_rejected_logps` under the reference
# (zeros for reference-free variants), plus completion lengths where a variant averages per token.
# Each returns (sum of per-pair losses, stats averaged over pairs); the loop divides by the pairs of
# the whole accumulated batch, like tokens for SFT. One function per variant, chosen from
# PREFERENCE_LOSSES by name; each docstring cites its paper and equation.


def _pair_stats(beta: float, chosen_logratios, rejected_logratios, chosen_logps, rejected_logps) -> dict:
    """Implicit rewards beta * log(pi / ref), their accuracy and margin, and the raw log-probs (means)."""
    with torch.no_grad():
        rc, rr = beta * chosen_logratios, beta * rejected_logratios
        return {
            "rewards/chosen": rc.mean(),
            "rewards/rejected": rr.mean(),
            "rewards/accuracy": (rc > rr).float().mean(),
            "rewards/margin": (rc - rr).mean(),
            "logps/chosen": chosen_logps.mean(),
            "logps/rejected": rejected_logps.mean(),
        }


def _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps


def dpo_sigmoid_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, **_):
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), h = (pi_c - ref_c) - (pi_r - ref_r)."""
    c, r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * (c - r))  # (B,)
    return losses.sum(), _pair_stats(beta, c, r, chosen_logps, rejected_logps)


def dpo_cdpo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0, **_
):
    """Conservative DPO (Mitchell 2023): labels flipped with probability eps,
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)."""
    c, r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = beta * (c - r)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses.sum(), _pair_stats(beta, c, r, chosen_logps, rejected_logps)


def dpo_robust_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0, **_
):
    """Robust DPO (Chowdhury et al. 2024, eq. 9): unbiased under label noise eps,
    (-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs label_smoothing in [0, 0.5), got {label_smoothing}")
    c, r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = beta * (c - r)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)
    return losses.sum(), _pair_stats(beta, c, r, chosen_logps, rejected_logps)


def dpo_hinge_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, **_):
    """Hinge / SLiC (Zhao et al. 2023): max(0, 1 - beta h)."""
    c, r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * (c - r))
    return losses.sum(), _pair_stats(beta, c, r, chosen_logps, rejected_logps)


def ipo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, *, chosen_len, rejected_len, **_
):
    """IPO (Azar et al. 2023, eq. 17) on per-token averages: (h_avg - 1 / (2 beta))^2,
    h_avg = (pi_c - ref_c) / |y_c| - (pi_r - ref_r) / |y_r| (the normalisation TRL uses, confirmed by the authors)."""
    c, r = _logratios(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = c / chosen_len.clamp(min=1) - r / rejected_len.clamp(min=1)
    losses = (h - 1 / (2 * beta)) ** 2
    return losses.sum(), _pair_stats(beta, c, r, chosen_logps, rejected_logps)


def simpo_loss(chosen_logps, rejected_logps, *, chosen_len, rejected_len, beta=2.0, gamma=0.5, **_):
    """SimPO (Meng et al. 2024, eq. 6), reference-free: -log sigmoid(beta (avg pi_c - avg pi_r) - gamma),
    avg = summed log-prob / completion length. Rewards in the stats are beta * avg log-probs."""
    avg_c, avg_r = chosen_logps / chosen_len.clamp(min=1), rejected_logps / rejected_len.clamp(min=1)
    losses = -F.logsigmoid(beta * (avg_c - avg_r) - gamma)
    return losses.sum(), _pair_stats(beta, avg_c, avg_r, chosen_logps, rejected_logps)


def orpo_loss(chosen_logps, rejected_logps, *, chosen_len, rejected_len, lam=0.1, **_):
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: NLL(y_c) - lam * log sigmoid(log odds_c - log odds_r),
    odds = p / (1 - p) with p = exp(average token log-prob). The NLL term is the chosen completion's
    per-token mean for each pair (the paper averages over the batch's chosen tokens)."""
    avg_c, avg_r = chosen_logps / chosen_len.clamp(min=1), rejected_logps / rejected_len.clamp(min=1)
    # log odds = log p - log(1 - p), with log(1 - p) = log(-expm1(log p)) computed stably
    log_odds = (avg_c - torch.log(-torch.expm1(avg_c))) - (avg_r - torch.log(-torch.expm1(avg_r)))
    ratio = F.logsigmoid(log_odds)
    losses = -avg_c - lam * ratio
    stats = _pair_stats(lam, avg_c, avg_r, chosen_logps, rejected_logps)
    stats.update({"orpo/log_odds_ratio": ratio.detach().mean(), "orpo/nll": -avg_c.detach().mean()})
    return losses.sum(), stats


def rpo_nll(chosen_logps, chosen_len, **_):
    """The NLL term of RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's loss
    type "sft"): the chosen replies' mean token NLL over the micro-batch, returned as a sum over pairs
    (B x that mean) like every loss here, so the loop's division by pairs gives the mean back."""
    mean = -chosen_logps.sum() / chosen_len.sum().clamp(min=1)
    return mean * chosen_logps.numel(), {"nll": mean.detach()}


def batch_token_nll(chosen_logps, chosen_len, pairs, tokens):
    """RPO's NLL term (Pang et al. 2024) as a token mean over the whole accumulated batch, in this module's
    sum form over pairs: -sum(chosen_logps) * pairs / tokens, where `pairs` and `tokens` count the pairs and
    the chosen replies' tokens of the whole step (all micro-batches and processes), so that the loop's
    division by the step's pairs leaves -sum / tokens however the step is split. `rpo_nll` is the same
    term averaged within one micro-batch (TRL's), which depends on the split. Logs the micro-batch's mean."""
    nll_sum = -chosen_logps.sum()
    # in rpo_nll's order of operations, so a step of one micro-batch gives its numbers to the last bit
    return nll_sum / max(tokens, 1) * pairs, {"nll": nll_sum.detach() / chosen_len.sum().clamp(min=1)}


def kto_loss(
    logps,
    ref_logps,
    desirable,
    kl,
    beta=0.1,
    desirable_weight=1.0,
    undesirable_weight=1.0,
    **_,
):
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples: with r = log(pi / ref) and the
    reference point z = max(kl, 0) (detached), desirable: w_D (1 - sigmoid(beta (r - z))),
    undesirable: w_U (1 - sigmoid(beta (z - r))). `desirable` is a (B,) bool tensor; `kl` a scalar
    estimate of KL(pi || ref) from mismatched prompt/completion pairs (TRL's estimator)."""
    z = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach().clamp(min=0)
    r = logps - ref_logps  # (B,)
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    losses = torch.where(desirable, good, bad)
    with torch.no_grad():
        rewards = beta * r
        stats = {"kl": z, "rewards/mean": rewards.mean()}
        if desirable.any():
            stats["rewards/desirable"] = rewards[desirable].mean()
        if (~desirable).any():
            stats["rewards/undesirable"] = rewards[~desirable].mean()
    return losses.sum(), stats


def bradley_terry_loss(chosen_rewards, rejected_rewards, margin=None, center_coef=0.0):
    """Reward-model loss (Bradley-Terry; InstructGPT eq. 1): -log sigmoid(r_c - r_r - m) per pair, plus
    center_coef * (r_c + r_r)^2 to keep rewards centred (Eisenstein et al. 2023, arXiv 2312.09244)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coef:
        losses = losses + center_coef * (chosen_rewards + rejected_rewards) ** 2
    with torch.no_grad():
        both = torch.cat([chosen_rewards, rejected_rewards])
        stats = {
            "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
            "margin": (chosen_rewards - rejected_rewards).mean(),
            "reward_mean": both.mean(),
            "reward_std": both.std() if both.numel() > 1 else both.new_zeros(()),
        }
    return losses.sum(), stats


PREFERENCE_LOSSES = {
    "sigmoid": dpo_sigmoid_loss,
    "cdpo": dpo_cdpo_loss,
    "robust": dpo_robust_loss,
    "hinge": dpo_hinge_loss,
    "ipo": ipo_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
REFERENCE_FREE = {"simpo", "orpo"}


# --- online RL (PPO, GRPO) -------------------------------------------------------------------------------
# Per-token tensors are (B, T) over completion positions with a 0/1 float mask.


def ppo_policy_loss(logps, old_logps, advantages, mask, clip=0.2):
    """PPO's clipped surrogate (Schulman et al. 2017), summed over completion tokens:
    max(-A rho, -A clip(rho, 1 - clip, 1 + clip)) with rho = exp(logp - old_logp)."""
    ratio = torch.exp(logps - old_logps)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    losses = torch.max(unclipped, clipped)
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        stats = {
            "clipfrac": ((clipped > unclipped).float() * mask).sum() / n,
            "approx_kl": (0.5 * (logps - old_logps) ** 2 * mask).sum() / n,
        }
    return (losses * mask).sum(), stats


def ppo_value_loss(values, old_values, returns, mask, clip=0.2):
    """Clipped value loss, summed over tokens: 0.5 max((v - R)^2, (old_v + clip(v - old_v, +-clip) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    losses = 0.5 * torch.max(a, b)
    with torch.no_grad():
        stats = {"value_clipfrac": ((b > a).float() * mask).sum() / mask.sum().clamp(min=1)}
    return (losses * mask).sum(), stats


# GRPO's aggregations: loss_type -> (the units the loop divides by, the micro-batch's loss from each
# sequence's token sum (B,), the 0/1 mask (B, T) and the longest completion allowed)
GRPO_AGGREGATIONS = {
    "grpo": ("sequences", lambda token_sum, mask, max_len: (token_sum / mask.sum(-1).clamp(min=1)).sum()),
    "bnpo": ("sequences", lambda token_sum, mask, max_len: token_sum.sum() / mask.sum().clamp(min=1) * len(mask)),
    "dr_grpo": ("sequences", lambda token_sum, mask, max_len: token_sum.sum() / (max_len or mask.shape[1])),
    "dapo": ("tokens", lambda token_sum, mask, max_len: token_sum.sum()),
}


def grpo_loss(
    logps,
    old_logps,
    advantages,
    mask,
    eps_low=0.2,
    eps_high=0.2,
    beta=0.0,
    ref_logps=None,
    loss_type="dapo",
    max_len=None,
    importance="token",
    token_weights=None,
):
    """GRPO's per-token surrogate -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta k3, with A (B,)
    one advantage per sequence, aggregated by `loss_type` (GRPO_AGGREGATIONS) as a sum over its units (the
    loop divides by the units of the whole accumulated batch):
      grpo     sum over sequences of each sequence's token mean          (units: sequences)
      bnpo     the micro-batch's token mean x its sequences              (units: sequences)
      dr_grpo  token sum / max_len                                       (units: sequences)
      dapo     token sum                                                 (units: tokens)
    importance "sequence" (GSPO) uses one ratio per sequence, exp(mean token log-ratio). `token_weights` (B, T)
    multiply the surrogate (not the KL term): truncated importance weights for another sampler
    (`sampler_correction`)."""
    log_ratio = logps - old_logps
    if importance == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)).expand_as(
            logps
        )
    elif importance != "token":
        raise ValueError(f"importance must be token or sequence, got '{importance}'")
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    if token_weights is not None:
        per_token = per_token * token_weights
    stats = {}
    if beta:
        kl = kl_estimate(logps, ref_logps, "k3")
        per_token = per_token + beta * kl
        stats["kl"] = (kl.detach() * mask).sum() / mask.sum().clamp(min=1)
    if loss_type not in GRPO_AGGREGATIONS:
        raise ValueError(f"loss_type must be one of {', '.join(GRPO_AGGREGATIONS)}, got '{loss_type}'")
    loss = GRPO_AGGREGATIONS[loss_type][1]((per_token * mask).sum(-1), mask, max_len)
    with torch.no_grad():
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        stats["clip_ratio"] = ((low | high).float() * mask).sum() / mask.sum().clamp(min=1)
    return loss, stats


def rloo_loss(seq_logps, old_seq_logps, advantages, eps_low=0.2, eps_high=0.2):
    """RLOO's clipped surrogate on whole completions (Ahmadian et al. 2024, with PPO's clip as TRL's RLOO),
    summed over sequences: -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with one ratio per completion,
    rho = exp(log pi(y|x) - log pi_old(y|x)) from the summed token log-probs (B,). Units: sequences."""
    ratio = torch.exp(seq_logps - old_seq_logps)
    adv = advantages.to(ratio.dtype)
    losses = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    with torch.no_grad():
        clipped = ((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_ratio": clipped.float().mean(), "advantage_mean": adv.mean()}
    return losses.sum(), stats


def sampler_correction(trainer_logps, sampler_logps, mask, cap=0.0):
    """Where the rollouts' sampler (vLLM, another precision, an older policy) and the trainer disagree on
    the sampled tokens' log-probs: the mismatch, KL(sampler || trainer) per token (the k3 estimate from the
    sampler's own samples, >= 0), and with `cap` > 0 truncated importance sampling weights
    min(pi_trainer / pi_sampler, cap) per token (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training", eq. 4), detached, to multiply a policy-gradient surrogate.
    Returns (weights (B, T) or None, stats)."""
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    with torch.no_grad():
        log_ratio = (trainer_logps - sampler_logps).float()
        stats = {
            "mismatch_kl": (kl_estimate(sampler_logps.float(), trainer_logps.float(), "k3") * mask).sum() / n,
            "mismatch_max": (log_ratio.abs() * mask).amax(),  # 0 without tokens; no host sync to ask
        }
        if cap <= 0:
            return None, stats
        ratio = torch.exp(log_ratio)
        stats["tis_capped"] = ((ratio > cap).float() * mask).sum() / n
        return ratio.clamp(max=cap) * mask, stats
