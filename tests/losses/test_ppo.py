"""PPO pieces and critic-free estimators: hand values, closed forms, padding and split invariances."""

import math

import pytest
import torch

from posttrain.losses.ppo import (
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    reinforce_pp_returns,
    rloo_advantages,
    value_loss,
)


def _mean(stat) -> float:
    """A (sum, count) stat as its mean."""
    total, count = stat
    return float(total) / float(count)


def _lengths_mask(lengths, width):
    return torch.arange(width) < torch.tensor(lengths)[:, None]  # (B, T)


def _pad(x, extra_cols, fill=float("nan")):
    """Append padding columns holding garbage (NaN by default) and one all-padding row."""
    padded = torch.cat([x, torch.full((x.shape[0], extra_cols), fill, dtype=x.dtype)], dim=1)
    return torch.cat([padded, torch.full((1, padded.shape[1]), fill, dtype=x.dtype)], dim=0)


def _pad_mask(mask, extra_cols):
    padded = torch.cat([mask, torch.zeros(mask.shape[0], extra_cols, dtype=torch.bool)], dim=1)
    return torch.cat([padded, torch.zeros(1, padded.shape[1], dtype=torch.bool)], dim=0)


def test_masked_mean_var_whiten_hand_values():
    """Valid values (1, 2, 3, 6) (padding holds 100): mean 3, unbiased var ((4+1+0+9)/3) = 14/3,
    biased 14/4 = 3.5; whiten: (x - 3)/sqrt(14/3) = (-0.92582, -0.46291, 0, 1.38873), padding 0.
    Row means along dim 1: (1.5, 4.5); an all-padding row has mean 0."""
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 6.0, 100.0], [100.0, 100.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == 3.0
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 4.5, 0.0], dtype=torch.float64))
    assert abs(masked_var(x, mask).item() - 14 / 3) < 1e-12
    assert abs(masked_var(x, mask, unbiased=False).item() - 3.5) < 1e-12
    s = math.sqrt(14 / 3)
    expected = torch.tensor([[-2 / s, -1 / s, 0], [0, 3 / s, 0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 3) * mask)


def test_masked_stats_padding_invariance():
    """Extra NaN padding columns and an all-padding row never change masked_mean / var / whiten on valid tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    mask = _lengths_mask([5, 2, 4], 5)
    xp, mp = _pad(x, 3), _pad_mask(mask, 3)
    assert masked_mean(xp, mp).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-12)
    assert masked_var(xp, mp).item() == pytest.approx(masked_var(x, mask).item(), abs=1e-12)
    torch.testing.assert_close(masked_whiten(xp, mp)[:3, :5], masked_whiten(x, mask))
    w = masked_whiten(x, mask)
    assert abs(masked_mean(w, mask).item()) < 1e-12
    assert abs(masked_var(w, mask).item() - 1) < 1e-6


def test_masked_whiten_of_some_rows_with_the_whole_batch_statistics():
    """Rows 0-1 of a batch whitened with the whole batch's mean and variance (what a rank holding only those rows
    is given) equal rows 0-1 of the whole batch's whitening; with their own statistics they differ."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g)
    mask = _lengths_mask([6, 2, 5, 3], 6)
    whole = masked_whiten(x, mask)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    torch.testing.assert_close(masked_whiten(x[:2], mask[:2], mean=mean, var=var), whole[:2], rtol=0, atol=1e-12)
    assert not torch.allclose(masked_whiten(x[:2], mask[:2]), whole[:2])


def test_kl_estimators_hand_values():
    """logp = ln 0.5, ref_logp = ln 0.25, so log r = ln 0.5 = -0.693147, r = 0.5:
    k1 = 0.693147, k2 = 0.5 * 0.480453 = 0.240227, k3 = (0.5 - 1) + 0.693147 = 0.193147."""
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([math.log(2)]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([-0.5 + math.log(2)]))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_unbiased_under_sampling():
    """pi = (0.5, 0.3, 0.2), pi_ref = (0.2, 0.3, 0.5): KL(pi||pi_ref) = 0.5 ln 2.5 + 0.2 ln 0.4 = 0.274929.
    Exact expectations sum_x pi(x) k(x): k1 and k3 equal the KL, k2 does not (biased).
    Sampling 200k tokens from pi: the k1 and k3 sample means lie within 4 standard errors of the KL."""
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    ref = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    kl = 0.5 * math.log(2.5) + 0.2 * math.log(0.4)
    assert abs((pi * (pi / ref).log()).sum().item() - kl) < 1e-12
    exact = {k: (pi * kl_estimate(pi.log(), ref.log(), k)).sum().item() for k in ("k1", "k2", "k3")}
    assert exact["k1"] == pytest.approx(kl, abs=1e-12)
    assert exact["k3"] == pytest.approx(kl, abs=1e-12)
    assert abs(exact["k2"] - kl) > 0.01
    x = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        samples = kl_estimate(pi.log()[x], ref.log()[x], kind)
        stderr = samples.std().item() / math.sqrt(samples.numel())
        assert abs(samples.mean().item() - kl) < 4 * stderr, kind


def test_per_token_rewards_hand_values():
    """kl_coef 0.1, kl all 1: -0.1 on valid tokens; scores (2, 5) added at the last valid tokens
    (index 2 of a length-3 row, index 0 of a length-1 row); 0 on padding and for an empty row."""
    mask = _lengths_mask([3, 1, 0], 4)
    rewards = per_token_rewards(torch.tensor([2.0, 5.0, 7.0]), torch.ones(3, 4), mask, kl_coef=0.1)
    expected = torch.tensor([[-0.1, -0.1, 1.9, 0.0], [4.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_hand_values():
    """One row, r = (0, 0, 1), V = (0.5, 0.6, 0.7), gamma 0.9, lam 0.8 (V_3 = 0, episode ends):
    delta_2 = 1 - 0.7 = 0.3; delta_1 = 0.9*0.7 - 0.6 = 0.03; delta_0 = 0.9*0.6 - 0.5 = 0.04.
    A_2 = 0.3; A_1 = 0.03 + 0.72*0.3 = 0.246; A_0 = 0.04 + 0.72*0.246 = 0.21712.
    returns = A + V = (0.71712, 0.846, 1.0)."""
    r = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    adv, ret = gae_advantages(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]], dtype=torch.float64))


def test_gae_gamma_lam_one_is_returns_to_go_minus_values():
    """Closed form: with gamma = lam = 1 the deltas telescope, A_t = sum_{k>=t} r_k - V_t, for
    right-padded rows of different lengths; returns = reward-to-go; REINFORCE++ returns match."""
    g = torch.Generator().manual_seed(1)
    r = torch.randn(3, 6, dtype=torch.float64, generator=g)
    v = torch.randn(3, 6, dtype=torch.float64, generator=g)
    mask = _lengths_mask([6, 3, 1], 6)
    r, v = r * mask, v * mask
    to_go = r.flip(1).cumsum(1).flip(1) * mask
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, (to_go - v) * mask)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(reinforce_pp_returns(r, mask, gamma=1.0), to_go)


def test_gae_and_reinforce_pp_padding_invariance():
    """NaN in extra padding columns and rows never changes advantages, returns or returns-to-go on valid tokens."""
    g = torch.Generator().manual_seed(2)
    r = torch.randn(2, 4, dtype=torch.float64, generator=g)
    v = torch.randn(2, 4, dtype=torch.float64, generator=g)
    mask = _lengths_mask([4, 2], 4)
    adv, ret = gae_advantages(r, v, mask, gamma=0.95, lam=0.9)
    adv_p, ret_p = gae_advantages(_pad(r, 3), _pad(v, 3), _pad_mask(mask, 3), gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv_p[:2, :4], adv)
    torch.testing.assert_close(ret_p[:2, :4], ret)
    assert adv_p[2:].abs().sum() == 0 and adv_p[:, 4:].abs().sum() == 0
    torch.testing.assert_close(reinforce_pp_returns(_pad(r, 3), _pad_mask(mask, 3), 0.9)[:2, :4], reinforce_pp_returns(r, mask, 0.9))


def test_reinforce_pp_hand_values():
    """r = (1, 0, 2), gamma 0.5: G_2 = 2, G_1 = 0 + 0.5*2 = 1, G_0 = 1 + 0.5*1 = 1.5; padding 0."""
    out = reinforce_pp_returns(torch.tensor([[1.0, 0.0, 2.0, 9.0]]), _lengths_mask([3], 4), gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.5, 1.0, 2.0, 0.0]]))


def test_policy_loss_hand_values():
    """clip 0.2, A = 1 on all three tokens, log-ratios (0, ln 1.5, ln 0.5):
    token 0: ratio 1 -> loss -1; token 1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped);
    token 2: ratio 0.5 -> max(-0.5, -0.8) = -0.5 (unclipped: pessimistic bound).
    clipfrac = 1/3; approxkl = mean(0, 0.5 ln^2 1.5, 0.5 ln^2 0.5) = (0.082202 + 0.240227)/3 = 0.107476;
    loss/policy_avg = (-1 - 1.2 - 0.5)/3 = -0.9."""
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.0, math.log(1.5), math.log(0.5), 5.0]])
    mask = _lengths_mask([3], 4)
    loss, s = policy_loss(logp, old, torch.ones(1, 4), mask, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, -0.5, 0.0]]))
    assert _mean(s["policy/clipfrac_avg"]) == pytest.approx(1 / 3)
    assert _mean(s["policy/approxkl_avg"]) == pytest.approx((0.5 * math.log(1.5) ** 2 + 0.5 * math.log(0.5) ** 2) / 3, rel=1e-6)
    assert _mean(s["loss/policy_avg"]) == pytest.approx(-0.9, rel=1e-6)


def test_policy_loss_negative_advantage_and_gradient():
    """A = -1, ratio 0.5, clip 0.2: max(0.5, 0.8) = 0.8 is the clipped term, so no gradient flows;
    ratio 1.1 (inside the clip): loss 1.1 with d/d logp = -A * ratio = 1.1."""
    logp = torch.tensor([[math.log(0.5), math.log(1.1)]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), -torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), 0.2)
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.8, 1.1]]))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.1]]))


def test_policy_loss_padding_and_split_invariance():
    """Garbage (inf) log-probs on padding change neither valid losses nor gradients (no NaN);
    per-token losses of two half batches sum to the whole batch's sum."""
    g = torch.Generator().manual_seed(3)
    logp = (0.3 * torch.randn(4, 5, generator=g)).requires_grad_()
    old = 0.3 * torch.randn(4, 5, generator=g)
    adv = torch.randn(4, 5, generator=g)
    mask = _lengths_mask([5, 3, 1, 4], 5)
    whole, _ = policy_loss(logp, old, adv, mask, 0.2)
    whole.sum().backward()
    grad = logp.grad.clone()
    logp.grad = None
    padded_logp = torch.cat([logp, torch.full((4, 2), float("inf"))], dim=1)
    padded, _ = policy_loss(padded_logp, _pad(old, 2)[:4], _pad(adv, 2)[:4], _pad_mask(mask, 2)[:4], 0.2)
    padded.sum().backward()
    torch.testing.assert_close(padded[:, :5], whole)
    torch.testing.assert_close(logp.grad, grad)
    halves = sum(policy_loss(logp[s], old[s], adv[s], mask[s], 0.2)[0].sum() for s in (slice(0, 1), slice(1, 4)))
    torch.testing.assert_close(halves, whole.sum())


def test_value_loss_hand_values():
    """clip 0.2, old V = 0, returns 1: V = 0.5 -> clipped V 0.2: 0.5 max(0.25, 0.64) = 0.32 (clipped larger);
    V = 0.1 -> inside the clip: 0.5 * 0.81 = 0.405; V = -0.5 -> clipped -0.2: 0.5 max(2.25, 1.44) = 1.125.
    loss/value_avg = (0.32 + 0.405 + 1.125)/3 = 0.616667, val/clipfrac_avg = 1/3; padding 0."""
    values = torch.tensor([[0.5, 0.1, -0.5, 3.0]])
    loss, s = value_loss(values, torch.zeros(1, 4), torch.ones(1, 4), _lengths_mask([3], 4), clip=0.2)
    torch.testing.assert_close(loss, torch.tensor([[0.32, 0.405, 1.125, 0.0]]))
    assert _mean(s["loss/value_avg"]) == pytest.approx(1.85 / 3, rel=1e-6)
    assert _mean(s["val/clipfrac_avg"]) == pytest.approx(1 / 3)


def test_value_loss_no_clip_is_half_squared_error_and_padding_invariant():
    """A huge clip makes it 0.5 (V - R)^2; NaN padding leaves valid tokens unchanged."""
    g = torch.Generator().manual_seed(4)
    v, old, ret = torch.randn(3, 3, 4, generator=g, dtype=torch.float64).unbind(0)
    mask = _lengths_mask([4, 2, 3], 4)
    loss, _ = value_loss(v, old, ret, mask, clip=1e9)
    torch.testing.assert_close(loss, 0.5 * (v - ret) ** 2 * mask)
    padded, _ = value_loss(_pad(v, 2), _pad(old, 2), _pad(ret, 2), _pad_mask(mask, 2), clip=0.3)
    torch.testing.assert_close(padded[:3, :4], value_loss(v, old, ret, mask, clip=0.3)[0])


def test_grpo_advantages_hand_values_and_shift_invariance():
    """Groups of 3: (1, 2, 3) has mean 2, unbiased std 1 -> (-1, 0, 1) (eps 1e-6 aside); (5, 5, 8): mean 6,
    std sqrt((1+1+4)/2) = sqrt 3 -> (-1, -1, 2)/sqrt 3. Adding 10 to one group changes nothing."""
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 8.0], dtype=torch.float64)
    adv = grpo_advantages(scores, 3, eps=0.0)
    s3 = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([-1, 0, 1, -1 / s3, -1 / s3, 2 / s3], dtype=torch.float64))
    shifted = scores + torch.tensor([0, 0, 0, 10, 10, 10], dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(shifted, 3), grpo_advantages(scores, 3))
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(scores, 4)


def test_rloo_advantages_hand_values():
    """k = 4, r = (1, 0, 0, 3): baselines (0+0+3)/3 = 1, (1+0+3)/3 = 4/3, 4/3, (1+0+0)/3 = 1/3;
    A = (0, -4/3, -4/3, 8/3). Equivalent closed form: k/(k-1) (r_i - group mean) = 4/3 (r - 1)."""
    r = torch.tensor([1.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    adv = rloo_advantages(r, 4)
    torch.testing.assert_close(adv, torch.tensor([0, -4 / 3, -4 / 3, 8 / 3], dtype=torch.float64))
    torch.testing.assert_close(adv, 4 / 3 * (r - r.mean()))


def test_adaptive_kl_controller():
    """Ziegler et al.: target 6, horizon 10000, coef 0.2. KL 12 -> error clip(1, -0.2, 0.2) = 0.2,
    n=100: coef 0.2 * (1 + 0.2*100/10000) = 0.2 * 1.002 = 0.2004. KL 6 -> error 0: unchanged.
    KL 0 -> error -0.2 (clipped from -1): 0.2004 * (1 - 0.002) = 0.1999992. The fixed controller never moves."""
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.2004)
    assert ctl.update(6.0, 100) == pytest.approx(0.2004)
    assert ctl.update(0.0, 100) == pytest.approx(0.1999992)
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 100) == 0.05 and fixed.value == 0.05
