"""DPO and its variants."""

import math

import pytest
import torch

from posttrain.losses.dpo import cpo_loss, dpo_loss, orpo_loss, simpo_loss

# pi_c - ref_c = -10 - (-11) = 1, pi_r - ref_r = -12 - (-11) = -1, so h = 1 - (-1) = 2.
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0))
ONE = torch.tensor([1])


def _log_sig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, eps, expected",
    [
        # -log sig(0.1*2) = ln(1 + e^-0.2) = 0.598139
        ("sigmoid", 0.0, -_log_sig(0.2)),
        # cDPO: 0.9*0.598139 + 0.1*0.798139 = 0.618139 (log sig(-0.2) = -0.2 - 0.598139)
        ("sigmoid", 0.1, -0.9 * _log_sig(0.2) - 0.1 * _log_sig(-0.2)),
        # IPO on length-normalised log-ratios, one token each (ONE below): (2 - 1/(2*0.1))^2 = (2 - 5)^2 = 9
        ("ipo", 0.0, 9.0),
        # hinge: relu(1 - 0.1*2) = 0.8
        ("hinge", 0.0, 0.8),
        # robust: (0.9*0.598139 - 0.1*0.798139) / (1 - 0.2) = 0.458511 / 0.8 = 0.573139
        ("robust", 0.1, (-0.9 * _log_sig(0.2) + 0.1 * _log_sig(-0.2)) / 0.8),
    ],
)
def test_dpo_hand_values(loss_type, eps, expected):
    """beta = 0.1, h = 2 (see the constants above); each loss_type against its hand-computed value."""
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type=loss_type, label_smoothing=eps,
                       chosen_tokens=ONE, rejected_tokens=ONE)
    torch.testing.assert_close(loss, torch.tensor([expected], dtype=torch.float64))


def test_dpo_sigmoid_value_is_0_598139():
    """The paper's loss at beta=0.1, h=2 is -log sigmoid(0.2) = 0.598139 (to 6 digits)."""
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1)
    assert abs(loss.item() - 0.598139) < 1e-6


def test_dpo_stats_trl_names():
    """Pairs h-parts (1, -1) and (-0.5, 0.5), beta 0.1: rewards/chosen mean(0.1, -0.05) = 0.025,
    rejected mean(-0.1, 0.05) = -0.025, accuracies 1/2, margins mean(0.2, -0.1) = 0.05,
    logps/chosen mean(-10, -3) = -6.5, logps/rejected mean(-12, -4) = -8."""
    pi_c, pi_r = torch.tensor([-10.0, -3.0]), torch.tensor([-12.0, -4.0])
    ref_c, ref_r = torch.tensor([-11.0, -2.5]), torch.tensor([-11.0, -4.5])
    _, s = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    expected = {"rewards/chosen": 0.025, "rewards/rejected": -0.025, "rewards/accuracies": 0.5,
                "rewards/margins": 0.05, "logps/chosen": -6.5, "logps/rejected": -8.0}
    assert set(s) == set(expected)
    for name, value in expected.items():
        total, count = s[name]
        assert count == 2 and abs(total.item() / count - value) < 1e-6, name


def test_dpo_unknown_loss_type_names_valid_ones():
    """A typo in loss_type is a ValueError listing sigmoid, ipo, hinge, robust."""
    with pytest.raises(ValueError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="sigmod")


def test_dpo_tabular_gradient_on_unseen_response_is_zero():
    """Xu et al. 2024, Table 1: pi_ref = (0.5, 0.5, ~0), one preference y1 > y2. With tabular logits
    theta, log pi(y) = theta_y - logsumexp(theta), and h = theta_1 - theta_2 - (ln .5 - ln .5): the
    normaliser cancels, so d loss / d theta_3 is exactly 0 however much mass y3 has, while
    d/d theta_1 = -d/d theta_2 = -beta * sig(-beta h) != 0."""
    ref = torch.tensor([0.5, 0.5, 1e-30], dtype=torch.float64).log()
    for start in ([0.0, 0.0, 0.0], [math.log(0.1), -5.0, math.log(0.9)]):
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        logp = torch.log_softmax(theta, -1)
        loss, _ = dpo_loss(logp[:1], logp[1:2], ref[:1], ref[1:2], beta=0.1)
        loss.sum().backward()
        assert theta.grad[2].item() == 0.0
        h = theta[0].item() - theta[1].item()
        torch.testing.assert_close(theta.grad[0], torch.tensor(-0.1 / (1 + math.exp(0.1 * h)), dtype=torch.float64))
        torch.testing.assert_close(theta.grad[1], -theta.grad[0])


def test_dpo_label_smoothing_zero_is_paper_and_robust_equals_sigmoid_at_zero():
    """eps = 0: sigmoid and robust both reduce to -log sig(beta h) for any h."""
    pi_c, pi_r, ref_c, ref_r = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).unbind(0)
    a, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.3, loss_type="sigmoid")
    b, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.3, loss_type="robust")
    h = (pi_c - ref_c) - (pi_r - ref_r)
    torch.testing.assert_close(a, -torch.nn.functional.logsigmoid(0.3 * h))
    torch.testing.assert_close(b, a)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_per_pair_split_batch_invariance(loss_type):
    """Per-pair losses: the sum over two half batches equals the sum over the whole batch, and
    shifting all of a pair's log-probs (policy and reference) by a constant changes nothing."""
    pi_c, pi_r, ref_c, ref_r = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).unbind(0)
    n_c, n_r = torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([6, 5, 4, 3, 2, 1])
    kw = dict(beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    whole, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, chosen_tokens=n_c, rejected_tokens=n_r, **kw)
    halves = sum(dpo_loss(pi_c[s], pi_r[s], ref_c[s], ref_r[s], chosen_tokens=n_c[s], rejected_tokens=n_r[s],
                          **kw)[0].sum() for s in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(halves, whole.sum())
    shifted, _ = dpo_loss(pi_c + 3, pi_r + 3, ref_c + 3, ref_r + 3, chosen_tokens=n_c, rejected_tokens=n_r, **kw)
    torch.testing.assert_close(shifted, whole)


# --------------------------------------------------------------------------- IPO's length normalisation


def test_ipo_is_on_length_normalised_log_ratios():
    """TRL's IPO: each log-ratio divided by its completion's token count. Chosen 2 tokens, rejected 4: log-ratios
    1 and -1 become 1/2 and -1/4, h' = 0.75, loss (0.75 - 1/(2*0.1))^2 = (0.75 - 5)^2 = 18.0625 (on summed
    log-ratios it would be (2 - 5)^2 = 9). rewards/chosen = 0.1 * 1/2 = 0.05, rewards/rejected = 0.1 * -1/4."""
    loss, stats = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo", chosen_tokens=torch.tensor([2]),
                           rejected_tokens=torch.tensor([4]))
    torch.testing.assert_close(loss, torch.tensor([18.0625], dtype=torch.float64))
    assert stats["rewards/chosen"][0].item() == pytest.approx(0.05)
    assert stats["rewards/rejected"][0].item() == pytest.approx(-0.025)
    with pytest.raises(ValueError, match="length-normalised"):
        dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type="ipo")


def test_ipo_does_not_depend_on_length_at_equal_per_token_ratios():
    """The same per-token log-ratios (+0.3 chosen, -0.2 rejected) over completions of 1, 5 or 40 tokens give the
    same IPO loss, (0.5 - 1/(2*0.25))^2 = (0.5 - 2)^2 = 2.25; on summed log-ratios the target margin 1/(2 beta)
    would be reached by a 40-token pair at a per-token margin 40 times smaller."""
    for n in (1, 5, 40):
        t = torch.tensor([n])
        loss, _ = dpo_loss(torch.tensor([0.3 * n - 7.0]), torch.tensor([-0.2 * n - 9.0]), torch.tensor([-7.0]),
                           torch.tensor([-9.0]), beta=0.25, loss_type="ipo", chosen_tokens=t, rejected_tokens=t)
        assert loss.item() == pytest.approx(2.25, rel=1e-5), n


# --------------------------------------------------------------------------- reference-free losses

# pi_c = -10 over 2 tokens (mean -5), pi_r = -12 over 4 tokens (mean -3)
N_C, N_R = torch.tensor([2]), torch.tensor([4])


def test_simpo_hand_value():
    """beta 2, gamma 0.5: r_c = 2 * -5 = -10, r_r = 2 * -3 = -6, z = -10 - (-6) - 0.5 = -4.5,
    loss = -log sig(-4.5) = log(1 + e^4.5) = 4.511047; rewards/chosen -10, rewards/rejected -6, accuracy 0."""
    loss, s = simpo_loss(PI_C, PI_R, N_C, N_R, beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(4.5)), rel=1e-9)
    assert loss.item() == pytest.approx(4.511047, abs=1e-6)
    assert s["rewards/chosen"][0].item() == -10 and s["rewards/rejected"][0].item() == -6
    assert s["rewards/accuracies"][0].item() == 0 and s["logps/chosen"][0].item() == -10


def test_simpo_equals_trl_cpo_trainer_form():
    """TRL's CPOTrainer (loss_type simpo): logits = (avg_c - avg_r) - gamma / beta, loss = -log sig(beta logits),
    with label smoothing (1-eps) / eps on the two signs; the same numbers on random pairs."""
    g = torch.Generator().manual_seed(3)
    pi_c, pi_r = -20 * torch.rand(2, 7, generator=g, dtype=torch.float64)
    n_c, n_r = torch.randint(1, 9, (2, 7), generator=g)
    beta, gamma, eps = 2.5, 1.4, 0.1
    logits = (pi_c / n_c - pi_r / n_r) - gamma / beta
    trl = -(1 - eps) * torch.nn.functional.logsigmoid(beta * logits) - eps * torch.nn.functional.logsigmoid(-beta * logits)
    torch.testing.assert_close(simpo_loss(pi_c, pi_r, n_c, n_r, beta=beta, gamma=gamma, label_smoothing=eps)[0], trl)


def test_cpo_hand_value():
    """beta 0.1, alpha 1: -log sig(0.1 * (-10 + 12)) = -log sig(0.2) = 0.598139, plus the chosen token-mean NLL
    10 / 2 = 5: 5.598139; alpha 0 leaves the preference term alone."""
    loss, s = cpo_loss(PI_C, PI_R, N_C, beta=0.1, alpha=1.0)
    assert loss.item() == pytest.approx(-_log_sig(0.2) + 5.0, rel=1e-9)
    assert s["nll_loss"][0].item() == 5.0 and s["rewards/chosen"][0].item() == pytest.approx(-1.0)
    assert cpo_loss(PI_C, PI_R, N_C, beta=0.1, alpha=0.0)[0].item() == pytest.approx(0.598139, abs=1e-6)


def test_orpo_hand_value():
    """pi_c = -1 over 2 tokens (a_c = -0.5), pi_r = -4 over 2 (a_r = -2), beta 0.1:
    log(1 - e^-0.5) = log 0.393469 = -0.932752, log(1 - e^-2) = log 0.864665 = -0.145413,
    log_odds = (-0.5 + 2) - (-0.932752 + 0.145413) = 2.287339, log sig(2.287339) = -0.096709,
    loss = NLL 0.5 + 0.1 * 0.096709 = 0.509671."""
    loss, s = orpo_loss(torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64),
                        torch.tensor([2]), torch.tensor([2]), beta=0.1)
    log_odds = 1.5 - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-2)))
    assert log_odds == pytest.approx(2.287339, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 - 0.1 * _log_sig(log_odds), rel=1e-9)
    assert loss.item() == pytest.approx(0.509671, abs=1e-6)
    assert s["log_odds_chosen"][0].item() == pytest.approx(log_odds)
    assert s["log_odds_ratio"][0].item() == pytest.approx(_log_sig(log_odds))
    assert s["nll_loss"][0].item() == pytest.approx(0.5) and s["rewards/chosen"][0].item() == pytest.approx(-0.05)


def test_orpo_equals_trl_formula_and_stays_finite_near_probability_one():
    """TRL's ORPOTrainer: log_odds = (a_c - a_r) - (log1p(-exp(a_c)) - log1p(-exp(a_r))); the same on ordinary
    values, and finite (where the direct formula loses all digits) at a mean log-prob of -1e-9."""
    g = torch.Generator().manual_seed(4)
    a_c, a_r = -3 * torch.rand(2, 6, generator=g, dtype=torch.float64) - 0.01
    n = torch.full((6,), 3)
    trl_log_odds = (a_c - a_r) - (torch.log1p(-torch.exp(a_c)) - torch.log1p(-torch.exp(a_r)))
    trl = -a_c - 0.2 * torch.nn.functional.logsigmoid(trl_log_odds)
    torch.testing.assert_close(orpo_loss(a_c * n, a_r * n, n, n, beta=0.2)[0], trl)
    near_one, _ = orpo_loss(torch.tensor([-1e-9]), torch.tensor([-2.0]), ONE, ONE, beta=0.1)
    assert torch.isfinite(near_one).all()


@pytest.mark.parametrize("name", ["simpo", "cpo", "orpo"])
def test_reference_free_per_pair_split_invariance(name):
    """One loss per pair: two half batches sum to the whole batch."""
    g = torch.Generator().manual_seed(5)
    pi_c, pi_r = -10 * torch.rand(2, 6, generator=g, dtype=torch.float64) - 0.1
    n_c, n_r = torch.randint(1, 9, (2, 6), generator=g)
    fn = {"simpo": lambda s: simpo_loss(pi_c[s], pi_r[s], n_c[s], n_r[s], beta=2.0, gamma=0.5, label_smoothing=0.1),
          "cpo": lambda s: cpo_loss(pi_c[s], pi_r[s], n_c[s], beta=0.1, alpha=1.0, label_smoothing=0.1),
          "orpo": lambda s: orpo_loss(pi_c[s], pi_r[s], n_c[s], n_r[s], beta=0.1)}[name]
    whole = fn(slice(0, 6))[0].sum()
    torch.testing.assert_close(fn(slice(0, 2))[0].sum() + fn(slice(2, 6))[0].sum(), whole)
