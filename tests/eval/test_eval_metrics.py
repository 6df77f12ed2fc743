"""Eval metrics: hand-computed values, closed forms and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.eval.metrics import (
    accuracy,
    macro_f1,
    mean_and_stderr,
    mean_pass_at_k,
    pass_at_k,
    perplexity,
    sequence_kl,
)


def test_pass_at_k_hand_values():
    """n=5, c=2: k=1 -> 1 - C(3,1)/C(5,1) = 1 - 3/5 = 0.4; k=2 -> 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7;
    k=3 -> 1 - C(3,3)/C(5,3) = 1 - 1/10 = 0.9; k=4 -> n-c=3 < 4, every draw holds a correct one -> 1."""
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 3) == pytest.approx(0.9)
    assert pass_at_k(5, 2, 4) == 1.0


def test_pass_at_k_edges_and_closed_forms():
    """c=0 -> 0, c=n -> 1, pass@1 = c/n, and the numerically stable product form of Chen et al.
    1 - prod_{i=n-c+1}^{n} (1 - k/i) agrees for every c, k at n=20; pass@k grows with k."""
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    n = 20
    for c in range(n + 1):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)
        for k in range(1, n + 1):
            product = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1)) if n - c >= k else 1.0
            assert pass_at_k(n, c, k) == pytest.approx(product, abs=1e-12)
            if k > 1:
                assert pass_at_k(n, c, k) >= pass_at_k(n, c, k - 1)
    for bad in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_mean_pass_at_k():
    """[[T, F], [F, F]] at k=1: (1/2 + 0) / 2 = 0.25; at k=2: (1 + 0) / 2 = 0.5."""
    rows = [[True, False], [False, False]]
    assert mean_pass_at_k(rows, 1) == pytest.approx(0.25)
    assert mean_pass_at_k(rows, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)


def test_accuracy_and_macro_f1_by_hand():
    """labels a a b b c, preds a b b b a. accuracy: positions 0, 2, 3 right -> 3/5.
    a: TP=1, FP=1 (pos 4), FN=1 (pos 1) -> 2/(2+1+1) = 0.5; b: TP=2, FP=1 (pos 1), FN=0 -> 4/5 = 0.8;
    c: TP=0, FN=1 -> 0. macro-F1 = (0.5 + 0.8 + 0) / 3 = 0.4333..."""
    labels, preds = list("aabbc"), list("abbba")
    assert accuracy(preds, labels) == pytest.approx(0.6)
    assert macro_f1(preds, labels) == pytest.approx(1.3 / 3)
    assert macro_f1(labels, labels) == 1.0
    with pytest.raises(ValueError):
        macro_f1(["a"], ["a", "b"])


def test_macro_f1_counts_predicted_only_classes():
    """labels a a, preds a x: a: TP=1, FN=1 -> 2/3; x (only predicted): FP=1 -> 0; mean 1/3."""
    assert macro_f1(["a", "x"], ["a", "a"]) == pytest.approx(1 / 3)


def test_sequence_kl_sums_log_ratios_over_response_tokens():
    """Row 0: (−1 − −2) + (−1 − −1) = 1, third token masked. Row 1: (−3 − −1) = −2, rest masked.
    Padding values (99) never count."""
    logp = torch.tensor([[-1.0, -1.0, 99.0], [-3.0, 99.0, 99.0]])
    ref = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sequence_kl(logp, ref, mask).tolist() == [1.0, -2.0]


def test_perplexity_and_stderr():
    """Two tokens of NLL ln 4 each -> exp(2 ln 4 / 2) = 4. [1, 2, 3]: mean 2, sample var 1, stderr 1/sqrt(3)."""
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert mean_and_stderr([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1 / math.sqrt(3)))
    assert mean_and_stderr([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
