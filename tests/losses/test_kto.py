"""KTO (Ethayarajh et al. 2024): the per-completion loss, its stats and the reference point z0."""

import math

import pytest
import torch

from posttrain.losses.kto import kl_sum, kto_loss, reference_point


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_kto_hand_values():
    """beta 0.1, z0 = 0.5; row 1 desirable with r = -10 - (-11) = 1, row 2 undesirable with r = -14 - (-12) = -2.
    desirable:   1 - sig(0.1 * (1 - 0.5)) = 1 - sig(0.05) = 1 - 0.512497 = 0.487503
    undesirable: 2 * (1 - sig(0.1 * (0.5 + 2))) = 2 * (1 - sig(0.25)) = 2 * 0.437823 = 0.875647 (weight 2)"""
    loss, s = kto_loss(torch.tensor([-10.0, -14.0], dtype=torch.float64), torch.tensor([-11.0, -12.0]),
                       torch.tensor([True, False]), 0.5, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.tolist() == pytest.approx([1 - sig(0.05), 2 * (1 - sig(0.25))], rel=1e-12)
    assert loss.tolist() == pytest.approx([0.487503, 0.875647], abs=1e-6)
    assert s["rewards/chosen"] == (pytest.approx(0.1), 1) and s["rewards/rejected"] == (pytest.approx(-0.2), 1)
    assert s["logps/chosen"][0].item() == -10 and s["logps/rejected"][0].item() == -14
    assert s["kl"][0].item() / s["kl"][1] == pytest.approx(0.5)


def test_policy_equal_to_reference_gives_half_the_weight():
    """r = 0 and z0 = 0: every row's loss is its weight * (1 - sig(0)) = weight / 2."""
    logp = torch.tensor([-3.0, -4.0, -5.0])
    loss, _ = kto_loss(logp, logp, torch.tensor([True, False, True]), reference_point(0.0, 3), beta=0.3,
                       desirable_weight=1.0, undesirable_weight=1.5)
    assert loss.tolist() == pytest.approx([0.5, 0.75, 0.5])


def test_reference_point_is_the_clamped_mean_of_mismatched_log_ratios():
    """Log-ratios (1, 3) -> z0 = 2; (-1, -3) -> mean -2, clamped to 0 (a KL is not negative). Sums and counts add
    over micro-batches / ranks: (1,) and (3,) give the same z0 as (1, 3)."""
    total, n = kl_sum(torch.tensor([-4.0, -2.0]), torch.tensor([-5.0, -5.0]))
    assert (float(total), n) == (4.0, 2) and reference_point(total, n).item() == 2.0
    neg_total, neg_n = kl_sum(torch.tensor([-6.0, -8.0]), torch.tensor([-5.0, -5.0]))
    assert reference_point(neg_total, neg_n).item() == 0.0
    a, b = kl_sum(torch.tensor([-4.0]), torch.tensor([-5.0])), kl_sum(torch.tensor([-2.0]), torch.tensor([-5.0]))
    assert reference_point(a[0] + b[0], a[1] + b[1]).item() == 2.0


def test_no_gradient_flows_through_z0():
    """z0 is a constant of the loss (detached): d loss / d z0's inputs is None, d loss / d pi is
    -beta sig'(beta (r - z0)) for a desirable row: at r = z0 = 0, -0.1 * 0.25 = -0.025."""
    pi_kl = torch.tensor([-0.5], requires_grad=True)  # log-ratio -0.5: z0 clamps to 0
    z0 = reference_point(*kl_sum(pi_kl, torch.tensor([0.0])))
    pi = torch.tensor([0.0], requires_grad=True)
    loss, _ = kto_loss(pi, torch.tensor([0.0]), torch.tensor([True]), z0, beta=0.1)
    loss.sum().backward()
    assert pi_kl.grad is None and pi.grad.item() == pytest.approx(-0.025)


def test_split_batch_invariance_at_a_fixed_reference_point():
    """One loss per row: with z0 fixed, two halves sum to the whole."""
    g = torch.Generator().manual_seed(0)
    pi, ref = -10 * torch.rand(2, 8, generator=g)
    lab = torch.rand(8, generator=g) > 0.5
    whole = kto_loss(pi, ref, lab, 0.3, beta=0.2)[0].sum()
    halves = kto_loss(pi[:3], ref[:3], lab[:3], 0.3, beta=0.2)[0].sum() + kto_loss(pi[3:], ref[3:], lab[3:], 0.3, beta=0.2)[0].sum()
    torch.testing.assert_close(halves, whole)
