"""Direct Preference Optimisation (Rafailov et al. 2023) and its IPO / hinge / robust variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """Per-pair DPO loss from sequence log-probs (each (B,), summed over the completion tokens).

    With h = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing:
      sigmoid: -(1-eps) log sig(beta h) - eps log sig(-beta h)   (DPO eq. 7; eps > 0 is cDPO)
      ipo:     (h - 1/(2 beta))^2                                (Azar et al. 2023, tau = beta as in TRL)
      hinge:   relu(1 - beta h)                                  (SLiC, Zhao et al. 2023)
      robust:  (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)  (Chowdhury et al. 2024)
    Returns (per_pair (B,), stats). Normalisation is the caller's: the sum of per-pair losses is
    divided by the global number of pairs in the optimizer step.
    Stats (detached, TRL's names, each a (sum, count) over this batch's pairs, as `engine.train_step` takes them):
    `rewards/chosen` = beta (pi_c - ref_c),
    `rewards/rejected`, `rewards/accuracies` (chosen reward > rejected reward), `rewards/margins`,
    `logps/chosen`, `logps/rejected` (policy sequence log-probs).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = pi_chosen - ref_chosen  # (B,) log pi(yw)/pi_ref(yw)
    rejected_ratio = pi_rejected - ref_rejected  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    else:  # robust: unbiased under a label-flip rate eps
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    with torch.no_grad():
        reward_chosen = beta * chosen_ratio.float()
        reward_rejected = beta * rejected_ratio.float()
        n = reward_chosen.numel()
        stats = {
            "rewards/chosen": (reward_chosen.sum(), n),
            "rewards/rejected": (reward_rejected.sum(), n),
            "rewards/accuracies": ((reward_chosen > reward_rejected).float().sum(), n),
            "rewards/margins": ((reward_chosen - reward_rejected).sum(), n),
            "logps/chosen": (pi_chosen.float().sum(), n),
            "logps/rejected": (pi_rejected.float().sum(), n),
        }
    return loss, stats


__all__ = ["dpo_loss", "LOSS_TYPES"]
