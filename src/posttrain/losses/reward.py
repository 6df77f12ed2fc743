"""Reward-model losses: Bradley-Terry on pairs, and InstructGPT's K-choose-2 ranking loss."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | int]]]:
    """Per-pair Bradley-Terry loss -log sigmoid(r_c - r_r - margin) (+ center_coef * (r_c + r_r)^2).

    r_chosen, r_rejected: (B,) scalar rewards; margin: (B,) or None (Llama 2's per-pair margin,
    subtracted so a clearly better response must win by more). The centring term (Eisenstein
    et al. 2023) pulls the reward's mean towards 0, since BT only sees differences.
    Returns (per_pair (B,), stats). Normalisation is the caller's: divide the sum of the
    per-pair losses by the global number of pairs in the optimizer step.
    Stats (detached, each a (sum, count) over this batch's pairs): `accuracy` (r_c > r_r), `margin` (r_c - r_r),
    `rewards/chosen`, `rewards/rejected`.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} differ in shape")
    diff = r_chosen - r_rejected  # (B,)
    logits = diff if margin is None else diff - margin.to(diff)
    loss = -F.logsigmoid(logits)  # (B,)
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected) ** 2
    with torch.no_grad():
        n = diff.numel()
        stats = {
            "accuracy": ((diff > 0).float().sum(), n),
            "margin": (diff.float().sum(), n),
            "rewards/chosen": (r_chosen.float().sum(), n),
            "rewards/rejected": (r_rejected.float().sum(), n),
        }
    return loss, stats


def ranking_pairs(k: int) -> list[tuple[int, int]]:
    """All K-choose-2 pairs (i, j), i < j, of K responses ordered best first: i is better than j."""
    if k < 2:
        raise ValueError(f"a ranking needs at least 2 responses, got {k}")
    return list(itertools.combinations(range(k), 2))


def ranking_loss(rewards: torch.Tensor) -> torch.Tensor:
    """InstructGPT's ranking loss for one prompt: mean over the K-choose-2 pairs of -log sigmoid(r_i - r_j).

    rewards: (K,) rewards of K responses ordered best first. Returns a scalar. Ouyang et al. (2022)
    put all pairs of one prompt in one batch element (each comparison once per epoch, one forward
    per response); the caller sums these per-prompt losses and divides by the number of prompts.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (K,), got shape {tuple(rewards.shape)}")
    pairs = torch.tensor(ranking_pairs(rewards.shape[0]), device=rewards.device)  # (P, 2)
    diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]  # (P,)
    return -F.logsigmoid(diff).mean()


__all__ = ["bradley_terry_loss", "ranking_pairs", "ranking_loss"]
