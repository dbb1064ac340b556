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
