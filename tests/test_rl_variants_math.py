"""RLOO's, REINFORCE++'s and online DPO's pure functions against numbers computed by hand."""

import math
import statistics

import pytest
import torch

from aligner.advantages import (
    best_and_worst,
    discounted_returns,
    kl_shaped_rewards,
    normalize,
    reinforce_pp_advantages,
    rloo_advantages,
)
from aligner.losses import rloo_loss


def test_rloo_advantages_leave_one_out_by_hand():
    # group 1: sum 2, baselines (2-1)/3, (2-0)/3, (2-0)/3, (2-1)/3; group 2 all equal: no signal
    adv = rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0]), 4)
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0])
    assert rloo_advantages(torch.tensor([3.0, 1.0]), 2).tolist() == [2.0, -2.0]  # k = 2: r_i - r_j
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 2.0, 3.0]), 2)


def test_normalize_by_hand():
    x = [1.0, 2.0, 4.0]
    want = [(v - statistics.mean(x)) / (statistics.stdev(x) + 1e-4) for v in x]
    assert normalize(torch.tensor(x)).tolist() == pytest.approx(want)


def test_rloo_loss_clips_the_sequence_ratio_by_hand():
    seq, old = torch.tensor([-1.0, -2.0]), torch.tensor([-1.1, -1.5])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = rloo_loss(seq, old, adv, eps_low=0.2, eps_high=0.2)
    # row 1: ratio e^0.1 inside the clip: -1.10517; row 2: ratio e^-0.5 = 0.607 < 0.8 with A < 0: -(0.8 x -2)
    assert loss.item() == pytest.approx(-math.exp(0.1) + 1.6, rel=1e-6)
    assert stats["clip_ratio"].item() == 0.5
    seq.requires_grad_(True)
    rloo_loss(seq, old, adv)[0].backward()
    assert seq.grad.tolist() == pytest.approx([-math.exp(0.1), 0.0])  # the clipped row passes no gradient


def test_kl_shaped_rewards_and_returns_by_hand():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    r = kl_shaped_rewards(scores, kl, mask, 0.1)
    assert r.tolist()[0] == pytest.approx([-0.01, -0.02, -0.03 + 1.0, 0.0])
    assert r.tolist()[1] == pytest.approx([-0.05 + 2.0, 0.0, 0.0, 0.0])
    g1 = discounted_returns(r, mask, 1.0)
    assert g1.tolist()[0] == pytest.approx([0.94, 0.95, 0.97, 0.0])
    assert g1.tolist()[1] == pytest.approx([1.95, 0.0, 0.0, 0.0])
    half = discounted_returns(r, mask, 0.5)
    assert half.tolist()[0] == pytest.approx([-0.01 + 0.5 * (-0.02 + 0.5 * 0.97), -0.02 + 0.5 * 0.97, 0.97, 0.0])


def test_reinforce_pp_advantages_normalise_over_every_token_of_the_batch():
    r = torch.tensor([[-0.01, -0.02, 0.97, 0.0], [1.95, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    returns = [0.94, 0.95, 0.97, 1.95]  # the four completion tokens' returns, across both rows
    mean, std = statistics.mean(returns), statistics.stdev(returns)
    adv = reinforce_pp_advantages(r, mask)
    got = [adv[0, 0], adv[0, 1], adv[0, 2], adv[1, 0]]
    assert [float(x) for x in got] == pytest.approx([(v - mean) / std for v in returns], rel=1e-5)
    assert adv[0, 3] == 0 and adv[1, 1:].abs().sum() == 0  # off the mask


def test_best_and_worst_pairs_by_hand():
    chosen, rejected, untied = best_and_worst(torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 0.0, 5.0]), 3)
    assert chosen.tolist() == [1, 3, 8] and rejected.tolist() == [0, 3, 7]
    assert untied.tolist() == [True, False, True]
