"""Kahneman-Tversky Optimisation (Ethayarajh et al. 2024, arXiv 2402.01306): preference learning from unpaired
desirable / undesirable completions.

With the implicit reward r(x, y) = log pi(y|x) - log pi_ref(y|x) and the reference point z0 (eq. 8):

    desirable:    w_d * (1 - sig(beta * (r - z0)))
    undesirable:  w_u * (1 - sig(beta * (z0 - r)))

z0 estimates KL(pi || pi_ref) = E_{x, y' ~ D}[r(x, y')] from MISMATCHED pairs (a prompt x with the completion y' of
another row, so y' is a sample of the data's completions independent of x), clamped at 0 and detached — no
gradient flows through it (the paper's Sec. 4.1; TRL's KTOTrainer computes it under no_grad the same way).
`reference_point` forms it from a (sum, count) of mismatched log-ratios; the caller chooses over which pairs it
is summed (posttrain: every pair of the optimizer step, over all micro-batches and ranks, `recipes/kto.py`).
"""

from __future__ import annotations

import torch


def kl_sum(pi_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum, count) of the mismatched pairs' log-ratios log pi(y'|x) - log pi_ref(y'|x) (each (B,) summed over the
    completion's tokens), detached: the pieces of z0 that add across micro-batches and ranks."""
    with torch.no_grad():
        return (pi_mismatched.float() - ref_mismatched.float()).sum(), pi_mismatched.numel()


def reference_point(total: torch.Tensor | float, count: int | float) -> torch.Tensor:
    """z0 = max(0, total / count): the mean mismatched log-ratio, clamped at 0 (a KL is never negative; the
    estimate from a finite batch can be)."""
    total = torch.as_tensor(total, dtype=torch.float32)
    return (total / max(float(count), 1.0)).clamp(min=0.0).detach()


def kto_loss(
    pi_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """Per-completion KTO loss (B,) from sequence log-probs (each (B,), summed over the completion tokens),
    `desirable` (B,) bool, and the detached reference point z0 (module doc).

    Stats (TRL's names, each a (sum, count)): `rewards/chosen` / `rewards/rejected` = beta * r over the desirable /
    undesirable completions (counted over those only), `logps/chosen` / `logps/rejected` the same for the policy
    sequence log-probs, `kl` = z0."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("desirable_weight and undesirable_weight must be >= 0")
    z0 = torch.as_tensor(z0, dtype=pi_logps.dtype, device=pi_logps.device).detach()
    r = pi_logps - ref_logps.to(pi_logps.dtype)  # (B,)
    desirable = desirable.bool()
    loss = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))  # (B,)
    with torch.no_grad():
        reward = beta * r.float()
        logp = pi_logps.detach().float()
        n_d, n_u, n = int(desirable.sum()), int((~desirable).sum()), r.numel()
        stats = {
            "rewards/chosen": (torch.where(desirable, reward, 0.0).sum(), n_d),
            "rewards/rejected": (torch.where(desirable, 0.0, reward).sum(), n_u),
            "logps/chosen": (torch.where(desirable, logp, 0.0).sum(), n_d),
            "logps/rejected": (torch.where(desirable, 0.0, logp).sum(), n_u),
            "kl": (z0.float() * n, n),
        }
    return loss, stats


__all__ = ["kto_loss", "kl_sum", "reference_point"]
