"""DPO and its variants."""

import math

import pytest
import torch

from posttrain.losses.dpo import dpo_loss

# pi_c - ref_c = -10 - (-11) = 1, pi_r - ref_r = -12 - (-11) = -1, so h = 1 - (-1) = 2.
PI_C, PI_R, REF_C, REF_R = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0))


def _log_sig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize(
    "loss_type, eps, expected",
    [
        # -log sig(0.1*2) = ln(1 + e^-0.2) = 0.598139
        ("sigmoid", 0.0, -_log_sig(0.2)),
        # cDPO: 0.9*0.598139 + 0.1*0.798139 = 0.618139 (log sig(-0.2) = -0.2 - 0.598139)
        ("sigmoid", 0.1, -0.9 * _log_sig(0.2) - 0.1 * _log_sig(-0.2)),
        # IPO: (2 - 1/(2*0.1))^2 = (2 - 5)^2 = 9
        ("ipo", 0.0, 9.0),
        # hinge: relu(1 - 0.1*2) = 0.8
        ("hinge", 0.0, 0.8),
        # robust: (0.9*0.598139 - 0.1*0.798139) / (1 - 0.2) = 0.458511 / 0.8 = 0.573139
        ("robust", 0.1, (-0.9 * _log_sig(0.2) + 0.1 * _log_sig(-0.2)) / 0.8),
    ],
)
def test_dpo_hand_values(loss_type, eps, expected):
    """beta = 0.1, h = 2 (see the constants above); each loss_type against its hand-computed value."""
    loss, _ = dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=0.1, loss_type=loss_type, label_smoothing=eps)
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
    whole, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    halves = sum(dpo_loss(pi_c[s], pi_r[s], ref_c[s], ref_r[s], beta=0.2, loss_type=loss_type, label_smoothing=0.1)[0].sum()
                 for s in (slice(0, 3), slice(3, 6)))
    torch.testing.assert_close(halves, whole.sum())
    shifted, _ = dpo_loss(pi_c + 3, pi_r + 3, ref_c + 3, ref_r + 3, beta=0.2, loss_type=loss_type, label_smoothing=0.1)
    torch.testing.assert_close(shifted, whole)
