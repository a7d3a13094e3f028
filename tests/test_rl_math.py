"""Online-RL math against values computed by hand: KL estimators, whitening, GAE, group advantages,
PPO's clipped policy and value losses, and every GRPO aggregation mode."""

import math

import pytest
import torch

from aligner.advantages import AdaptiveKLController, gae, group_advantages, whiten
from aligner.logprobs import kl_estimate as kl_penalty
from aligner.losses import grpo_loss, ppo_policy_loss, ppo_value_loss


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(math.log(2))
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(0.5 + math.log(2) - 1)
    assert float(kl_penalty(ref, ref, "k3")) == 0.0
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_penalty(logp, ref, "k2")


def test_whitening_ignores_masked_entries():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 10.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert whiten(x, mask)[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    assert whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)


def test_gae_by_hand_with_padding():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.95 * 0.3, A0 = 0.1 + 0.95 * A1
    assert adv[0].tolist() == pytest.approx([0.46575, 0.385, 0.3])
    assert ret[0].tolist() == pytest.approx([0.96575, 0.985, 1.0])
    # row 1: the padded value 9 is never used: A1 = 2 - 1 = 1, A0 = (1 - 1) + 0.95 * 1
    assert adv[1].tolist() == pytest.approx([0.95, 1.0, 0.0])
    assert ret[1].tolist() == pytest.approx([1.95, 2.0, 0.0])
    adv_g, _ = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    # gamma 0.5: deltas 0 + 0.5 * 0.6 - 0.5 = -0.2, 0.5 * 0.7 - 0.6 = -0.25, 0.3; A1 = -0.25 + 0.15
    assert adv_g[0].tolist() == pytest.approx([-0.2 + 0.5 * -0.1, -0.1, 0.3])


def test_group_advantages_with_a_zero_variance_group():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    std = math.sqrt(1 / 3)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2 + [0.0] * 4
    assert group_advantages(r, 4, "group").tolist() == pytest.approx(expected)
    assert group_advantages(r, 4, "none").tolist() == pytest.approx([0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0])
    batch_std = math.sqrt(5.5 / 7)  # std of the raw rewards (mean 1.25), as TRL scales by the batch
    assert group_advantages(r, 4, "batch").tolist() == pytest.approx(
        [x / (batch_std + 1e-4) for x in [0.5, -0.5, 0.5, -0.5, 0, 0, 0, 0]]
    )
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(r, 3)
    # equal rewards whose float mean is not exactly the reward (0.1 x 8: a wrong but well-formed group)
    # still give exactly 0, not the rounding error divided by eps
    r = torch.tensor([0.1] * 8 + [0.7, 0.3] * 4)
    for scale in ("group", "batch", "none"):
        assert group_advantages(r, 8, scale)[:8].tolist() == [0.0] * 8


def test_ppo_clipped_policy_loss():
    old = torch.zeros(1, 3)
    logps = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    adv = torch.tensor([[2.0, -1.0, 1.0]])
    loss, stats = ppo_policy_loss(logps, old, adv, torch.ones(1, 3), clip=0.2)
    # token 0: max(-3, -2.4) = -2.4 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -1
    assert float(loss) == pytest.approx(-2.6)
    assert stats["clipfrac"] == pytest.approx(2 / 3)
    masked, _ = ppo_policy_loss(logps, old, adv, torch.tensor([[1.0, 1.0, 0.0]]))
    assert float(masked) == pytest.approx(-1.6)


def test_ppo_clipped_value_loss():
    values, old, returns = torch.tensor([[1.5, 0.9]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    loss, stats = ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    # token 0: clipped value 1.2 is further from 2.0: 0.5 * 0.64; token 1: 0.5 * 0.81
    assert float(loss) == pytest.approx(0.32 + 0.405)
    assert stats["value_clipfrac"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "loss_type,expected", [("grpo", -1 + 2), ("bnpo", 1 / 5 * 2), ("dr_grpo", 1 / 4), ("dapo", 1.0)]
)
def test_grpo_aggregation_modes(loss_type, expected):
    logps = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])  # per-token losses -1, -1, -1 and 2, 2: token sums -3 and 4
    loss, _ = grpo_loss(logps, logps.detach(), adv, mask, loss_type=loss_type, max_len=4)
    assert float(loss.detach()) == pytest.approx(expected)


def test_grpo_clips_asymmetrically_and_has_a_gradient_at_ratio_one():
    old = torch.zeros(1, 1)
    logps = torch.log(torch.tensor([[1.3]]))
    mask, adv = torch.ones(1, 1), torch.tensor([1.0])
    assert float(grpo_loss(logps, old, adv, mask, eps_high=0.28)[0]) == pytest.approx(-1.28)
    loss, stats = grpo_loss(logps, old, adv, mask, eps_high=0.2)
    assert float(loss) == pytest.approx(-1.2) and stats["clip_ratio"] == 1.0
    # one pass per rollout: rho = 1, the loss of opposite advantages is 0, yet the gradient is not
    x = torch.zeros(2, 2, requires_grad=True)
    loss, _ = grpo_loss(x, x.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 2), loss_type="grpo")
    loss.backward()
    assert float(loss) == 0.0 and x.grad.abs().sum() > 0


def test_grpo_kl_term_and_sequence_level_ratio():
    logps, ref = torch.log(torch.tensor([[0.5, 0.5]])), torch.log(torch.tensor([[0.25, 0.5]]))
    mask, adv = torch.ones(1, 2), torch.tensor([0.0])
    loss, stats = grpo_loss(logps, logps, adv, mask, beta=0.1, ref_logps=ref, loss_type="dapo")
    k3 = 0.5 + math.log(2) - 1
    assert float(loss) == pytest.approx(0.1 * k3) and stats["kl"] == pytest.approx(k3 / 2)
    # GSPO: one ratio per sequence, exp(mean log-ratio) = exp((log 1.1 + log 1.3) / 2), below the clip
    logps = torch.log(torch.tensor([[1.1, 1.3]]))
    loss, _ = grpo_loss(logps, torch.zeros(1, 2), torch.tensor([1.0]), mask, eps_high=0.5, importance="sequence")
    assert float(loss) == pytest.approx(-2 * math.sqrt(1.1 * 1.3))


def test_adaptive_kl_controller_moves_beta_toward_the_target():
    ctl = AdaptiveKLController(beta=0.1, target=6.0, horizon=100)
    assert ctl.update(kl=12.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    assert ctl.update(kl=3.0, n_steps=10) < 0.1 * 1.02


def test_sampler_correction_weights_and_mismatch_by_hand():
    from aligner.losses import sampler_correction

    trainer = torch.tensor([[-1.0, -2.0, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third position is padding: no weight, not in the means
    weights, stats = sampler_correction(trainer, sampler, mask, cap=1.5)
    # ratios e^0.5 = 1.6487 (capped to 1.5) and e^-1 = 0.3679
    assert weights.tolist()[0] == pytest.approx([1.5, math.exp(-1.0), 0.0])
    # KL(sampler || trainer), k3 with d = trainer - sampler: e^d - d - 1
    k3 = [math.exp(0.5) - 0.5 - 1, math.exp(-1.0) + 1 - 1]
    assert stats["mismatch_kl"].item() == pytest.approx(sum(k3) / 2)
    assert stats["mismatch_max"].item() == pytest.approx(1.0) and stats["tis_capped"].item() == 0.5
    off, stats = sampler_correction(trainer, sampler, mask, cap=0)
    assert off is None and "tis_capped" not in stats


def test_grpo_loss_token_weights_scale_the_surrogate_not_the_kl():
    logps = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones(1, 2)
    weights = torch.tensor([[0.5, 2.0]])
    loss, _ = grpo_loss(logps, logps, torch.tensor([1.0]), mask, loss_type="dapo", token_weights=weights)
    assert loss.item() == pytest.approx(-(0.5 + 2.0))  # ratio 1, A 1: -w per token, summed
    ref = torch.tensor([[-1.5, -2.5]])
    with_kl, _ = grpo_loss(logps, logps, torch.tensor([1.0]), mask, beta=0.1, ref_logps=ref, token_weights=weights)
    k3 = 2 * (math.exp(-0.5) + 0.5 - 1)
    assert with_kl.item() == pytest.approx(-2.5 + 0.1 * k3)
