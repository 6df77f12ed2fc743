"""losses.grpo by hand: the four aggregations, group advantages, clip-higher, GSPO's sequence ratio, the clamped k3,
DAPO's overlong penalty; Dr. GRPO's length-unbiasedness where GRPO's normaliser is biased."""

import math

import pytest
import torch

from posttrain.losses import (aggregate, aggregate_count, clipped_surrogate, group_advantages, importance_log_ratio,
                              k3_kl, soft_overlong_penalty)

INF = float("inf")
# two completions: 3 tokens (losses 1, 2, 3) and 1 token (loss 4); padding holds inf, which must never leak
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, INF], [4.0, INF, INF, INF]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("loss_type,loss_sum,count", [
    ("dapo", 10.0, 4),      # (1+2+3+4) / 4 tokens = 2.5
    ("grpo", 6.0, 2),       # token means 6/3 = 2 and 4/1 = 4; (2+4) / 2 sequences = 3
    ("dr_grpo", 2.5, 2),    # 10 / L=4, over 2 sequences = 1.25
    ("bnpo", 2.5, 1),       # the micro-batch's token mean 10/4 = 2.5, one micro-batch
])
def test_each_aggregation_by_hand(loss_type, loss_sum, count):
    s, n = aggregate(PER_TOKEN, MASK, loss_type, max_completion_length=4)
    assert float(s) == pytest.approx(loss_sum) and n == count == aggregate_count(MASK, loss_type)


@pytest.mark.parametrize("loss_type,whole,split", [("dapo", 2.5, 2.5), ("grpo", 3.0, 3.0), ("dr_grpo", 1.25, 1.25),
                                                   ("bnpo", 2.5, 3.0)])
def test_micro_batch_split(loss_type, whole, split):
    """sum(loss_sum) / sum(count) over micro-batches (engine.train_step): dapo, grpo and dr_grpo are exact over the
    split into one row each; bnpo is by definition the mean of the micro-batches' token means: (6/3 + 4/1) / 2 = 3."""
    def step(parts):
        outs = [aggregate(PER_TOKEN[p], MASK[p], loss_type, 4) for p in parts]
        return float(sum(o[0] for o in outs)) / sum(o[1] for o in outs)
    assert step([slice(0, 2)]) == pytest.approx(whole)
    assert step([slice(0, 1), slice(1, 2)]) == pytest.approx(split)


def test_dr_grpo_is_length_unbiased_where_grpo_is_not():
    """Both completions have advantage +1 and ratio 1 (logp = old_logp), lengths 1 and 4; L = 4, two sequences.
    d loss / d logp_t = -A / (2 |o_i|) under grpo: -1/2 on the short one's token, -1/8 on each long one's — a short
    correct answer is pushed 4x harder per token (and a long wrong one punished 4x less). Under dr_grpo it is
    -A / (2 L) = -1/8 on every token, whatever the length."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    grads = {}
    for loss_type in ("grpo", "dr_grpo"):
        logp = torch.full((2, 4), -1.0, requires_grad=True)
        per_token, _ = clipped_surrogate(logp, logp.detach(), torch.ones(2), mask, epsilon=0.2)
        s, n = aggregate(per_token, mask, loss_type, 4)
        (s / n).backward()
        grads[loss_type] = logp.grad
    assert grads["grpo"][0, 0] == pytest.approx(-0.5) and grads["grpo"][1].tolist() == pytest.approx([-0.125] * 4)
    assert grads["dr_grpo"][mask].tolist() == pytest.approx([-0.125] * 5)


def test_gspo_sequence_ratio_is_the_geometric_mean_of_token_ratios():
    """GSPO: s_i = exp(mean_t log r_t) = (prod_t r_t)^(1/|o_i|), one ratio for every token of the row."""
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(3, 5, generator=g), -torch.rand(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    seq = importance_log_ratio(logp, old, mask, "sequence").exp().squeeze(1)  # (3,)
    for i in range(3):
        ratios = (logp[i] - old[i]).exp()[mask[i]]
        assert float(seq[i]) == pytest.approx(float(ratios.prod() ** (1 / len(ratios))), rel=1e-6)
    assert torch.equal(importance_log_ratio(logp, old, mask, "token"), torch.where(mask, logp - old, 0.0))


def test_group_advantages_group_batch_none():
    """Groups (1, 0, 0, 0) and (1, 1, 1, 1). Group 1: mean 1/4, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5;
    group 2 is all equal: advantage 0 and zero_std. Batch: mean 5/8, std sqrt((5 * 0.375^2 + 3 * 0.625^2) / 7)
    = sqrt(1.875 / 7). none: centred only. The std gets 1e-4 added (TRL)."""
    scores = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    adv, zero = group_advantages(scores, 4, "group")
    assert adv.tolist() == pytest.approx([0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, 0, 0, 0, 0])
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv, zero = group_advantages(scores, 4, "batch")
    std = math.sqrt(1.875 / 7)
    assert adv.tolist() == pytest.approx([0.75 / (std + 1e-4)] + [-0.25 / (std + 1e-4)] * 3 + [0.0] * 4)
    assert not zero.any()
    adv, _ = group_advantages(scores, 4, "none")
    assert adv.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    adv, _ = group_advantages(scores, 4, "batch", batch_std=torch.tensor(2.0))  # another rank's rows in the std
    assert adv[0] == pytest.approx(0.75 / 2.0001)


def test_clip_higher():
    """Ratio e^0.2231 = 1.25 on a token with A = +1: epsilon 0.2 clips it at 1.2 (loss -1.2, no gradient); with
    epsilon_high 0.28 it is inside the range (loss -1.25, gradient -1.25). With A = -1 and ratio 0.75 the lower
    clip 1 - 0.2 = 0.8 holds either way: loss max(0.75, 0.8) = 0.8, no gradient."""
    mask = torch.ones(1, 1, dtype=torch.bool)
    for eps_high, loss_value, grad in ((None, -1.2, 0.0), (0.28, -1.25, -1.25)):
        logp = torch.tensor([[math.log(1.25)]], requires_grad=True)
        loss, stats = clipped_surrogate(logp, torch.zeros(1, 1), torch.ones(1), mask, epsilon=0.2, epsilon_high=eps_high)
        loss.sum().backward()
        assert float(loss.detach()) == pytest.approx(loss_value) and float(logp.grad) == pytest.approx(grad, abs=1e-7)
        assert float(stats["clip_ratio/high_mean"][0]) == (1.0 if eps_high is None else 0.0)
    logp = torch.tensor([[math.log(0.75)]], requires_grad=True)
    loss, stats = clipped_surrogate(logp, torch.zeros(1, 1), -torch.ones(1), mask, epsilon=0.2, epsilon_high=0.28)
    loss.sum().backward()
    assert float(loss.detach()) == pytest.approx(0.8) and float(logp.grad) == 0.0 and float(stats["clip_ratio/low_mean"][0]) == 1


def test_k3_clamped_as_verl():
    """log r = ref - logp: 0.5 gives e^0.5 - 1 - 0.5 = 0.1487212707; 30 is clamped to 20 and e^20 - 21 to 10;
    -30 to -20: e^-20 - 1 + 20 = 19.0000000021 -> 10. Padding is 0."""
    logp = torch.tensor([[0.0, -30.0, 30.0, 0.0]])
    ref = torch.tensor([[0.5, 0.0, 0.0, INF]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    assert k3_kl(logp, ref, mask)[0].tolist() == pytest.approx([0.1487212707, 10.0, 10.0, 0.0])


def test_soft_overlong_penalty():
    """max 20 tokens, buffer 4 (from 16 on), factor 0.5: lengths 10, 16, 18, 20 -> 0, 0, -0.5 * 2/4, -0.5."""
    out = soft_overlong_penalty(torch.tensor([10, 16, 18, 20]), 20, 4, 0.5)
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5])
    assert soft_overlong_penalty(torch.tensor([20]), 20, 0).tolist() == [0.0]
