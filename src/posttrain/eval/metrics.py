"""Metrics a user compares runs by. Pure functions: numbers and tensors in, numbers and tensors out."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, Eq. 1).

    pass@k = 1 - C(n-c, k) / C(n, k): one minus the chance that k samples drawn without
    replacement from the n are all wrong. Exact integer binomials, so no overflow.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every draw of k contains a correct sample
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts; ``correct[i]`` holds the verdicts of prompt i's samples."""
    if not correct:
        raise ValueError("mean_pass_at_k needs at least one prompt")
    return sum(pass_at_k(len(row), sum(bool(x) for x in row), k) for row in correct) / len(correct)


def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of predictions equal to their label."""
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"accuracy needs equal, non-empty lists, got {len(preds)} and {len(labels)}")
    return sum(p == y for p, y in zip(preds, labels)) / len(labels)


def macro_f1(preds: Sequence, labels: Sequence) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    The classes are those seen in labels or predictions (as scikit-learn does); a class with
    2TP + FP + FN = 0 cannot occur in that set.
    """
    if len(preds) != len(labels) or not labels:
        raise ValueError(f"macro_f1 needs equal, non-empty lists, got {len(preds)} and {len(labels)}")
    classes = sorted(set(labels) | set(preds), key=str)
    scores = []
    for cls in classes:
        tp = sum(p == cls and y == cls for p, y in zip(preds, labels))
        fp = sum(p == cls and y != cls for p, y in zip(preds, labels))
        fn = sum(p != cls and y == cls for p, y in zip(preds, labels))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) Monte-Carlo KL(pi || ref) of each sampled response: sum over its tokens of logp - ref_logp.

    logp, ref_logp, mask: (N, R); the samples must come from pi for this to estimate the KL
    (the k1 estimator, summed rather than averaged over tokens: the KL of whole sequences).
    """
    return ((logp - ref_logp) * mask).sum(-1)


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(total NLL / token count): token-mean perplexity over a whole data file."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return math.exp(nll_sum / n_tokens)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with n-1, over sqrt(n)); stderr 0 for one value."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
