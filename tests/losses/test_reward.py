"""Bradley-Terry and ranking losses for reward models."""

import math

import torch

from posttrain.losses.reward import bradley_terry_loss, ranking_loss, ranking_pairs


def test_bradley_terry_hand_values_and_stats():
    """r_c=(2, 0), r_r=(1, 1): diffs (1, -1); -log sig(1) = ln(1+e^-1) = 0.313262, -log sig(-1) = 1.313262.
    As (sum, count) over the 2 pairs: accuracy (1, 2), margin (0, 2), rewards/chosen (2, 2), rewards/rejected (2, 2)."""
    loss, stats = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(1))]))
    assert {k: (float(v[0]), v[1]) for k, v in stats.items()} == {
        "accuracy": (1.0, 2), "margin": (0.0, 2), "rewards/chosen": (2.0, 2), "rewards/rejected": (2.0, 2)}


def test_bradley_terry_margin_and_centering():
    """r_c=3, r_r=1, margin 2: -log sig(3 - 1 - 2) = ln 2 = 0.693147; center_coef 0.01 adds 0.01*(3+1)^2 = 0.16."""
    loss, _ = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), margin=torch.tensor([2.0]), center_coef=0.01)
    torch.testing.assert_close(loss, torch.tensor([math.log(2) + 0.16]))


def test_bradley_terry_shift_invariance():
    """BT sees only differences: adding 5 to both rewards leaves the loss unchanged (without centring)."""
    r_c, r_r = torch.randn(2, 6, generator=torch.Generator().manual_seed(0)).unbind(0)
    torch.testing.assert_close(bradley_terry_loss(r_c + 5, r_r + 5)[0], bradley_terry_loss(r_c, r_r)[0])


def test_ranking_pairs_all_k_choose_2():
    """K=4: 4*3/2 = 6 pairs, each (better, worse) with the better index first."""
    assert ranking_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert len(ranking_pairs(7)) == 21


def test_ranking_loss_equals_mean_of_pairwise_bt():
    """K=3 with r=(1, 0, 0): pairs (0,1), (0,2) have diff 1, (1,2) has diff 0:
    mean(0.313262, 0.313262, 0.693147) = 0.439890, equal to the mean BT loss over the pairs."""
    r = torch.tensor([1.0, 0.0, 0.0])
    expected = (2 * math.log1p(math.exp(-1)) + math.log(2)) / 3
    torch.testing.assert_close(ranking_loss(r), torch.tensor(expected))
    pairs = ranking_pairs(3)
    bt, _ = bradley_terry_loss(r[[i for i, _ in pairs]], r[[j for _, j in pairs]])
    torch.testing.assert_close(ranking_loss(r), bt.mean())
