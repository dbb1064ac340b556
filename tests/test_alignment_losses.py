"""Alignment maths against numbers worked out by hand: Bradley-Terry, DPO (sigmoid, cDPO,
IPO), the per-token KL estimators, GAE on a 4-step trajectory, PPO's clipped losses and
the adaptive KL controller."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from peftlab.tasks.dpo.task import dpo_loss
from peftlab.tasks.ppo.loop import KLController, gae, kl_penalty, masked_whiten, ppo_losses
from peftlab.tasks.reward.task import bradley_terry_loss


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def softplus(x: float) -> float:
    """-log sigmoid(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def test_bradley_terry_loss_by_hand():
    chosen, rejected = t(1.0, 0.0, -2.0), t(0.0, 1.0, -2.0)
    # -log sigmoid(d) = log(1 + e^-d) for d = 1, -1, 0
    assert_close(bradley_terry_loss(chosen, rejected),
                 t(softplus(-1.0), softplus(1.0), math.log(2.0)))
    # a margin of 0.5 asks for a larger gap: d = 0.5, -1.5, -0.5
    assert_close(bradley_terry_loss(chosen, rejected, margin=0.5),
                 t(softplus(-0.5), softplus(1.5), softplus(0.5)))
    # per-pair margins broadcast
    assert_close(bradley_terry_loss(chosen, rejected, margin=t(0.0, 0.0, 1.0)),
                 t(softplus(-1.0), softplus(1.0), softplus(1.0)))


# policy and reference log-probs of two pairs:
#   pair 1: log pi/ref chosen = -1.0 - (-1.5) = 0.5, rejected = -2.0 - (-1.5) = -0.5  -> h = 1
#   pair 2: log pi/ref chosen = -3.0 - (-2.0) = -1.0, rejected = -1.0 - (-2.0) = 1.0  -> h = -2
PC, PR, RC, RR = t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -2.0)


def test_dpo_sigmoid_loss_and_rewards_by_hand():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # -log sigmoid(beta h) = log(1 + e^(-beta h))
    assert_close(losses, t(softplus(-0.1), softplus(0.2)))
    assert_close(chosen, t(0.05, -0.1))  # beta * log pi/ref of the chosen answers
    assert_close(rejected, t(-0.05, 0.1))


def test_conservative_dpo_label_smoothing_by_hand():
    eps = 0.1
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=eps)
    expected = [(1 - eps) * softplus(-0.1) + eps * softplus(0.1),
                (1 - eps) * softplus(0.2) + eps * softplus(-0.2)]
    assert_close(losses, t(*expected))


def test_ipo_loss_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    # (h - 1/(2 beta))^2 with 1/(2 beta) = 5
    assert_close(losses, t((1 - 5) ** 2, (-2 - 5) ** 2))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge-ish")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, _, _ = dpo_loss(pc, pr, RC, RR, beta=0.1)
    losses.sum().backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    assert_close(pc.grad, t(-0.1 / (1 + math.exp(0.1)), -0.1 / (1 + math.exp(-0.2))))


def test_kl_estimators_by_hand():
    logp, ref = t(-1.0, -2.0, -0.5, -3.0), t(-1.5, -1.0, -0.5, -2.0)
    assert_close(kl_penalty(logp, ref, "k1"), t(0.5, -1.0, 0.0, -1.0))
    # k3 = (r - 1) - log r with log r = ref - logp = -0.5, 1, 0, 1
    k3 = [math.exp(x) - 1 - x for x in (-0.5, 1.0, 0.0, 1.0)]
    assert_close(kl_penalty(logp, ref, "k3"), t(*k3))
    assert (kl_penalty(logp, ref, "k3") >= 0).all()


def test_gae_on_a_four_step_trajectory_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0],
                            [0.0, 0.0, 1.0, 99.0]])  # row 2 ends after 3 steps
    values = torch.tensor([[0.5, 0.4, 0.3, 0.2],
                           [0.5, 0.4, 0.3, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                         [1.0, 1.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 1: deltas 1 - 0.2 = 0.8; 0.9*0.2 - 0.3 = -0.12; 0.9*0.3 - 0.4 = -0.13;
    # 0.9*0.4 - 0.5 = -0.14; A_t = delta_t + 0.72 A_{t+1}
    a3 = 0.8
    a2 = -0.12 + 0.72 * a3
    a1 = -0.13 + 0.72 * a2
    a0 = -0.14 + 0.72 * a1
    # row 2: the episode ends at t=2 (no bootstrap from the padded value 7.0)
    b2 = 1.0 - 0.3
    b1 = -0.13 + 0.72 * b2
    b0 = -0.14 + 0.72 * b1
    assert_close(advantages, torch.tensor([[a0, a1, a2, a3], [b0, b1, b2, 0.0]]))
    assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.4, a2 + 0.3, a3 + 0.2],
                                        [b0 + 0.5, b1 + 0.4, b2 + 0.3, 0.0]]))
    # lam = 1, gamma = 1: advantage = sum of future rewards - V_t (Monte Carlo)
    adv_mc, _ = gae(rewards[:1], values[:1], mask[:1], 1.0, 1.0)
    assert_close(adv_mc, t(0.5, 0.6, 0.7, 0.8)[None])


def test_ppo_clipped_losses_by_hand():
    # tokens: (advantage, ratio) = (+1, 1.5), (-1, 1.5), (+1, 0.5), (-1, 0.5); clip 0.2
    adv = t(1.0, -1.0, 1.0, -1.0)[None]
    old = torch.zeros(1, 4)
    logp = torch.log(t(1.5, 1.5, 0.5, 0.5))[None]
    values, returns = t(0.5, -0.1, 0.3, 0.0)[None], t(1.0, 1.0, 0.0, 0.0)[None]
    out = ppo_losses(logp, old, adv, values, torch.zeros(1, 4), returns, torch.ones(1, 4),
                     clip_range=0.2, clip_range_value=0.2)
    # max(-A r, -A clip(r)) = max(-1.5, -1.2), max(1.5, 1.2), max(-0.5, -0.8), max(0.5, 0.8)
    assert_close(out["policy_loss"], torch.tensor((-1.2 + 1.5 - 0.5 + 0.8) / 4))
    assert_close(out["clip_fraction"], torch.tensor(0.5))  # tokens 1 and 4 are clipped
    # clipped values 0.2, -0.1, 0.2, 0: max((v-R)^2, (v_clip-R)^2) = 0.64, 1.21, 0.09, 0
    assert_close(out["value_loss"], torch.tensor(0.5 * (0.64 + 1.21 + 0.09 + 0.0) / 4))
    lr = torch.log(t(1.5, 1.5, 0.5, 0.5))
    assert_close(out["approx_kl"], 0.5 * (lr ** 2).mean())


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    std = math.sqrt(2 / 3)
    assert_close(w, torch.tensor([[-1 / std, 0.0, 1 / std, 0.0]]), atol=1e-4, rtol=0)


def test_adaptive_kl_controller_by_hand():
    fixed = KLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    ctl = KLController(0.1, adaptive=True, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error 0.5 clipped to 0.2: x (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02)
    ctl.update(5.4, 10)  # error -0.1: x (1 - 0.1 * 10 / 100)
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.99)


# ----------------------------------------------------------------------------- SimPO, ORPO, KTO


def test_simpo_loss_by_hand():
    from peftlab.tasks.simpo.task import simpo_loss

    # average log-probs: pair 1 chosen -0.5 vs rejected -1.0; pair 2 chosen -2.0 vs -1.0
    c, r = t(-0.5, -2.0), t(-1.0, -1.0)
    losses, cr, rr = simpo_loss(c, r, beta=2.0, gamma=0.4)
    # h = beta (c - r) - gamma = 0.6, -2.4; loss = -log sigmoid(h) = softplus(-h)
    assert_close(losses, t(softplus(-0.6), softplus(2.4)))
    assert_close(cr, t(-1.0, -4.0))
    assert_close(rr, t(-2.0, -2.0))
    smooth, _, _ = simpo_loss(c, r, beta=2.0, gamma=0.4, label_smoothing=0.2)
    assert_close(smooth, t(0.8 * softplus(-0.6) + 0.2 * softplus(0.6),
                           0.8 * softplus(2.4) + 0.2 * softplus(-2.4)))


def test_orpo_odds_ratio_by_hand():
    from peftlab.tasks.orpo.task import log1mexp, odds_ratio_loss

    # log(1 - e^x) on both sides of -log 2, including where the naive form loses precision
    for x in (-5.0, -1.0, -0.6931, -0.3, -1e-6):
        assert_close(log1mexp(t(x)), t(math.log(-math.expm1(x))), rtol=1e-5, atol=1e-6)
    c, r = t(-0.2, -1.5), t(-0.9, -0.4)
    losses, log_odds = odds_ratio_loss(c, r, beta=0.5)

    def log_odds_by_hand(a: float, b: float) -> float:
        pa, pb = math.exp(a), math.exp(b)
        return math.log(pa / (1 - pa)) - math.log(pb / (1 - pb))

    expected = [log_odds_by_hand(-0.2, -0.9), log_odds_by_hand(-1.5, -0.4)]
    assert_close(log_odds, t(*expected))
    # -beta log sigmoid(z) = beta softplus(-z)
    assert_close(losses, t(*(0.5 * softplus(-z) for z in expected)))


def test_kto_loss_by_hand():
    from peftlab.tasks.kto.task import kto_loss

    policy, ref = t(-1.0, -2.0, -3.0), t(-1.5, -1.0, -3.5)  # ratios 0.5, -1.0, 0.5
    desirable = torch.tensor([True, False, False])
    losses, rewards = kto_loss(policy, ref, desirable, kl=t(0.2)[0], beta=0.5,
                               desirable_weight=2.0, undesirable_weight=0.5)

    def sigmoid(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    # desirable: w_d (1 - s(beta (r - z))); undesirable: w_u (1 - s(beta (z - r)))
    assert_close(losses, t(2.0 * (1 - sigmoid(0.5 * 0.3)), 0.5 * (1 - sigmoid(0.5 * 1.2)),
                           0.5 * (1 - sigmoid(0.5 * -0.3))))
    assert_close(rewards, t(0.25, -0.5, 0.25))
    apo, _ = kto_loss(policy, ref, desirable, kl=t(0.2)[0], beta=0.5, loss_type="apo_zero_unpaired")
    assert_close(apo, t(1 - sigmoid(0.25), sigmoid(-0.5), sigmoid(0.25)))  # no reference point
    with pytest.raises(ValueError, match="kto.loss_type"):
        kto_loss(policy, ref, desirable, kl=t(0.0)[0], beta=0.5, loss_type="kto2")


def test_kto_reference_point_is_a_clamped_batch_mean():
    from peftlab.tasks.kto.task import kl_reference_point

    assert_close(kl_reference_point(t(-1.0, -2.0, -0.5), t(-1.5, -1.5, -1.0)), t(0.5 / 3)[0])
    assert_close(kl_reference_point(t(-2.0, -2.0), t(-1.0, -1.5)), t(0.0)[0])  # mean -0.75


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand():
    from peftlab.tasks.grpo.loop import group_advantages

    rewards = t(1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0)  # two groups of 4
    adv, std = group_advantages(rewards, 4, "group")
    s = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # Bessel-corrected std of (1, 0, 0, 0)
    assert_close(adv, t(0.75 / (s + 1e-4), -0.25 / (s + 1e-4), -0.25 / (s + 1e-4),
                        -0.25 / (s + 1e-4), 0.0, 0.0, 0.0, 0.0))
    assert_close(std, t(s, s, s, s, 0.0, 0.0, 0.0, 0.0))  # group 2: no signal
    none, _ = group_advantages(rewards, 4, "none")
    assert_close(none, t(0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0))
    batch, _ = group_advantages(rewards, 4, "batch")
    assert_close(batch, none / (rewards.std() + 1e-4))


def test_grpo_token_losses_and_aggregation_by_hand():
    from peftlab.tasks.grpo.loop import aggregate, grpo_token_losses

    # two answers (3 and 2 tokens); advantages +1 and -1; ratios 1.5, 1.0, 0.5 | 0.5, 1.1
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.1, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = t(1.0, -1.0)
    out = grpo_token_losses(logp, old, adv, None, beta=0.0, epsilon=0.2)
    # -min(r A, clip(r) A): A=+1: -min(1.5, 1.2), -1, -min(0.5, 0.8); A=-1: -min(-.5, -.8), 1.1
    expected = torch.tensor([[-1.2, -1.0, -0.5], [0.8, 1.1, 0.0]])
    assert_close(out["loss"] * mask, expected)
    assert out["clipped"].tolist() == [[True, False, False], [True, False, False]]
    total = float((expected * mask).sum())  # 0.1
    assert_close(aggregate(out["loss"], mask, "dapo", 2, 5.0, 1, 4), torch.tensor(total / 5))
    assert_close(aggregate(out["loss"], mask, "bnpo", 2, 5.0, 2, 4), torch.tensor(total / 5 / 2))
    assert_close(aggregate(out["loss"], mask, "dr_grpo", 2, 5.0, 1, 4),
                 torch.tensor(total / (2 * 4)))
    assert_close(aggregate(out["loss"], mask, "grpo", 2, 5.0, 1, 4),
                 torch.tensor((-2.7 / 3 + 1.9 / 2) / 2))
    # the KL term: k3 = e^d - d - 1 with d = ref - logp, times the ratio (bias correction)
    ref = torch.zeros(2, 3)
    with_kl = grpo_token_losses(logp, old, adv, ref, beta=0.1, epsilon=0.2)
    d = ref - logp
    k3 = torch.exp(d) - d - 1
    assert_close(with_kl["kl"], k3)
    assert_close(with_kl["loss"], out["loss"] + 0.1 * k3 * torch.exp(logp))
    plain = grpo_token_losses(logp, old, adv, ref, beta=0.1, epsilon=0.2,
                              bias_correction_kl=False)
    assert_close(plain["loss"], out["loss"] + 0.1 * k3)
