"""ema_update: target <- eta * source + (1 - eta) * target (Xu et al. 2024 reference EMA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


from posttrain.engine import ema_update


def _pair(t: list[float], s: list[float]) -> tuple[nn.Module, nn.Module]:
    target, source = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        target.weight.copy_(torch.tensor([t]))
        source.weight.copy_(torch.tensor([s]))
    return target, source


def test_hand_computed_blend():
    """target [1, 2], source [3, 6], eta 0.25: 0.25*3 + 0.75*1 = 1.5; 0.25*6 + 0.75*2 = 3.0."""
    target, source = _pair([1.0, 2.0], [3.0, 6.0])
    ema_update(target, source, 0.25)
    assert target.weight.tolist() == [[1.5, 3.0]]
    assert source.weight.tolist() == [[3.0, 6.0]]
    assert target.weight.grad is None


def test_eta_zero_keeps_and_eta_one_copies():
    target, source = _pair([1.0, 2.0], [3.0, 6.0])
    ema_update(target, source, 0.0)
    assert target.weight.tolist() == [[1.0, 2.0]]
    ema_update(target, source, 1.0)
    assert target.weight.tolist() == [[3.0, 6.0]]


def test_repeated_updates_follow_the_closed_form():
    """k updates towards a fixed source: target_k = s + (1 - eta)^k * (target_0 - s).
    eta 0.1, k 5, t0 0, s 1: 1 - 0.9^5 = 0.40951."""
    target, source = _pair([0.0, 0.0], [1.0, 1.0])
    for _ in range(5):
        ema_update(target, source, 0.1)
    assert target.weight[0, 0].item() == pytest.approx(0.40951, abs=1e-6)


def test_mismatched_models_are_rejected():
    with pytest.raises(ValueError, match="no parameter `bias`"):
        ema_update(nn.Linear(2, 1), nn.Linear(2, 1, bias=False), 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        ema_update(nn.Linear(2, 1), nn.Linear(2, 1), 1.5)
