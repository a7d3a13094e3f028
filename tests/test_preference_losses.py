"""Preference losses against values computed by hand (each docstring shows the arithmetic).

Parity with TRL's DPOTrainer on identical inputs is checked in test_preference_trl.py.
"""

import math

import pytest
import torch

from aligner.losses import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_cdpo_loss,
    dpo_hinge_loss,
    dpo_robust_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    simpo_loss,
)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


# policy -10 / -12, reference -11 / -11: log-ratios +1 / -1, h = 2, beta h = 0.2
PAIR = dict(chosen_logps=t(-10.0), rejected_logps=t(-12.0), ref_chosen_logps=t(-11.0), ref_rejected_logps=t(-11.0))
SOFTPLUS_M02 = math.log1p(math.exp(-0.2))  # -log sigmoid(0.2) = 0.598139
SOFTPLUS_P02 = math.log1p(math.exp(0.2))  # -log sigmoid(-0.2) = 0.798139


def test_sigmoid():
    """-log sigmoid(0.1 * 2) = log(1 + e^-0.2) = 0.598139"""
    loss, stats = dpo_sigmoid_loss(**PAIR, beta=0.1)
    assert float(loss) == pytest.approx(0.598139, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(0.1) and stats["rewards/rejected"] == pytest.approx(-0.1)
    assert stats["rewards/accuracy"] == 1.0 and stats["rewards/margin"] == pytest.approx(0.2)


def test_cdpo_and_robust():
    """cDPO eps 0.1: 0.9 * 0.598139 + 0.1 * 0.798139 = 0.618139;
    robust eps 0.1: (0.9 * 0.598139 - 0.1 * 0.798139) / 0.8 = 0.573139"""
    loss, _ = dpo_cdpo_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.9 * SOFTPLUS_M02 + 0.1 * SOFTPLUS_P02, abs=1e-9)
    assert float(loss) == pytest.approx(0.618139, abs=1e-6)
    loss, _ = dpo_robust_loss(**PAIR, beta=0.1, label_smoothing=0.1)
    assert float(loss) == pytest.approx(0.573139, abs=1e-6)
    loss0, _ = dpo_robust_loss(**PAIR, beta=0.1, label_smoothing=0.0)
    assert float(loss0) == pytest.approx(SOFTPLUS_M02)  # eps 0 is plain DPO
    with pytest.raises(ValueError):
        dpo_robust_loss(**PAIR, beta=0.1, label_smoothing=0.5)


def test_hinge():
    """max(0, 1 - 0.2) = 0.8; with beta 1: max(0, 1 - 2) = 0"""
    assert float(dpo_hinge_loss(**PAIR, beta=0.1)[0]) == pytest.approx(0.8)
    assert float(dpo_hinge_loss(**PAIR, beta=1.0)[0]) == 0.0


def test_ipo():
    """lengths 4 and 2: h = 1/4 - (-1)/2 = 0.75; (0.75 - 1/(2 * 0.1))^2 = (0.75 - 5)^2 = 18.0625"""
    loss, _ = ipo_loss(**PAIR, beta=0.1, chosen_len=t(4), rejected_len=t(2))
    assert float(loss) == pytest.approx(18.0625)


def test_simpo():
    """avg log-probs -8/4 = -2 and -9/3 = -3: -log sigmoid(2 * 1 - 0.5) = log(1 + e^-1.5) = 0.201413"""
    loss, stats = simpo_loss(t(-8.0), t(-9.0), chosen_len=t(4), rejected_len=t(3), beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(0.201413, abs=1e-6)
    assert stats["rewards/chosen"] == pytest.approx(-4.0)


def test_orpo():
    """p_c = 0.5 (odds 1), p_r = 0.25 (odds 1/3): log odds ratio = ln 3, log sigmoid(ln 3) = ln 0.75;
    NLL = ln 2: loss = 0.693147 + 0.1 * 0.287682 = 0.721916"""
    loss, stats = orpo_loss(t(2 * math.log(0.5)), t(math.log(0.25)), chosen_len=t(2), rejected_len=t(1), lam=0.1)
    assert float(loss) == pytest.approx(math.log(2) - 0.1 * math.log(0.75), abs=1e-9)
    assert float(loss) == pytest.approx(0.721916, abs=1e-6)
    assert stats["orpo/log_odds_ratio"] == pytest.approx(math.log(0.75))


def test_kto():
    """r = 1, z = 0.5, beta 0.1: desirable 1 - sigmoid(0.05) = 0.487503; undesirable 1 - sigmoid(-0.05) = 0.512497;
    a negative KL estimate is clamped to z = 0"""
    logps, ref = t(-5.0, -5.0), t(-6.0, -6.0)
    loss, stats = kto_loss(logps, ref, torch.tensor([True, False]), kl=0.5, beta=0.1)
    assert float(loss) == pytest.approx(0.487503 + 0.512497, abs=1e-6)
    loss, _ = kto_loss(logps, ref, torch.tensor([True, True]), kl=-3.0, beta=0.1, desirable_weight=2.0)
    assert float(loss) == pytest.approx(2 * 2 * (1 - 1 / (1 + math.exp(-0.1))), abs=1e-9)


def test_bradley_terry():
    """r_c 2, r_r 0.5, margin 0.5: -log sigmoid(1) = 0.313262; centring 0.01 * 2.5^2 = 0.0625"""
    loss, stats = bradley_terry_loss(t(2.0), t(0.5), margin=t(0.5), center_coef=0.01)
    assert float(loss) == pytest.approx(0.313262 + 0.0625, abs=1e-6)
    assert stats["accuracy"] == 1.0 and stats["margin"] == pytest.approx(1.5)


def test_losses_are_sums_over_pairs_and_differentiable():
    b = dict(
        chosen_logps=torch.tensor([-3.0, -4.0], requires_grad=True),
        rejected_logps=torch.tensor([-5.0, -2.0], requires_grad=True),
        ref_chosen_logps=torch.tensor([-3.5, -4.0]),
        ref_rejected_logps=torch.tensor([-4.0, -2.5]),
        chosen_len=torch.tensor([3.0, 5.0]),
        rejected_len=torch.tensor([2.0, 4.0]),
    )
    for name, fn in PREFERENCE_LOSSES.items():
        both, _ = fn(**b, beta=0.1)
        one = sum(float(fn(**{k: v[i : i + 1] for k, v in b.items()}, beta=0.1)[0]) for i in range(2))  # pair by pair
        assert float(both) == pytest.approx(one, rel=1e-6), name
        both.backward()
        assert b["chosen_logps"].grad is not None and torch.isfinite(b["chosen_logps"].grad).all(), name
        b["chosen_logps"].grad = None
