"""Direct Preference Optimisation (Rafailov et al. 2023) and its IPO / hinge / robust variants, plus the
reference-free preference losses SimPO, CPO and ORPO.

Every function takes sequence log-probs (each (B,), SUMMED over the completion tokens) and, where the loss is
defined on per-token means, the completion token counts (B,); it returns (per_pair (B,), stats). Normalisation is
the caller's: the sum of per-pair losses is divided by the global number of pairs in the optimizer step.
Stats (detached, TRL's names, each a (sum, count) over this batch's pairs, as `engine.train_step` takes them):
`rewards/chosen`, `rewards/rejected` (each loss's implicit reward, defined in its docstring),
`rewards/accuracies` (chosen reward > rejected reward), `rewards/margins`, `logps/chosen`, `logps/rejected`
(policy sequence log-probs, summed), plus the loss's own terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")  # need a reference model
REFERENCE_FREE_LOSS_TYPES = ("simpo", "cpo", "orpo")


def _pair_stats(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, pi_chosen: torch.Tensor,
                pi_rejected: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    with torch.no_grad():
        reward_chosen, reward_rejected = reward_chosen.float(), reward_rejected.float()
        n = reward_chosen.numel()
        return {
            "rewards/chosen": (reward_chosen.sum(), n),
            "rewards/rejected": (reward_rejected.sum(), n),
            "rewards/accuracies": ((reward_chosen > reward_rejected).float().sum(), n),
            "rewards/margins": ((reward_chosen - reward_rejected).sum(), n),
            "logps/chosen": (pi_chosen.detach().float().sum(), n),
            "logps/rejected": (pi_rejected.detach().float().sum(), n),
        }


def _smoothed_sigmoid(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1-eps) log sig(z) - eps log sig(-z): the Bradley-Terry loss with an assumed label-flip rate eps."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _check(beta: float, label_smoothing: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """Per-pair DPO loss from sequence log-probs (each (B,), summed over the completion tokens).

    With h = (pi_c - ref_c) - (pi_r - ref_r) and eps = label_smoothing:
      sigmoid: -(1-eps) log sig(beta h) - eps log sig(-beta h)   (DPO eq. 7; eps > 0 is cDPO)
      ipo:     (h' - 1/(2 beta))^2                                (Azar et al. 2023, tau = beta as in TRL)
      hinge:   relu(1 - beta h)                                  (SLiC, Zhao et al. 2023)
      robust:  (-(1-eps) log sig(beta h) + eps log sig(-beta h)) / (1 - 2 eps)  (Chowdhury et al. 2024)
    IPO's h' is h on length-normalised log-probs, each log-ratio divided by its completion's token count
    (`chosen_tokens`, `rejected_tokens`, (B,), required): TRL's definition. On summed log-probs the target margin
    1/(2 beta) would be spread over however many tokens a completion has, so a long pair would be pushed to a
    per-token margin many times smaller than a short pair's.
    `rewards/chosen` = beta (pi_c - ref_c) (for ipo: beta times the per-token log-ratio, the quantity its loss uses).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    _check(beta, label_smoothing)
    chosen_ratio = pi_chosen - ref_chosen  # (B,) log pi(yw)/pi_ref(yw)
    rejected_ratio = pi_rejected - ref_rejected  # (B,)
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type ipo is defined on length-normalised log-probs: pass chosen_tokens and "
                             "rejected_tokens")
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    h = chosen_ratio - rejected_ratio  # (B,)
    eps = label_smoothing
    if loss_type == "sigmoid":
        loss = _smoothed_sigmoid(beta * h, eps)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    else:  # robust: unbiased under a label-flip rate eps
        loss = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return loss, _pair_stats(beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), pi_chosen, pi_rejected)


def simpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """SimPO (Meng et al. 2024, eq. 6): no reference; the reward is the length-normalised log-prob
    r(y) = beta * log pi(y) / |y|, and a target margin gamma:

        -(1-eps) log sig(r(yw) - r(yl) - gamma) - eps log sig(-(r(yw) - r(yl) - gamma))

    (TRL's CPOTrainer with loss_type simpo: beta * (avg_c - avg_r - gamma / beta)). `rewards/chosen` = r(yw)."""
    _check(beta, label_smoothing)
    reward_chosen = beta * pi_chosen / chosen_tokens.clamp(min=1)  # (B,)
    reward_rejected = beta * pi_rejected / rejected_tokens.clamp(min=1)  # (B,)
    loss = _smoothed_sigmoid(reward_chosen - reward_rejected - gamma, label_smoothing)
    return loss, _pair_stats(reward_chosen, reward_rejected, pi_chosen, pi_rejected)


def cpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", eq. 3): DPO's loss with the reference dropped
    (a uniform reference) plus a behaviour-cloning NLL on the chosen response:

        -(1-eps) log sig(beta (pi_c - pi_r)) - eps log sig(-beta (pi_c - pi_r)) + alpha * nll,
        nll = -pi_c / |yw|   (the token mean of the chosen completion's NLL, so the loss stays one mean over pairs)

    `rewards/chosen` = beta pi_c (TRL's CPOTrainer); `nll_loss` is logged."""
    _check(beta, label_smoothing)
    nll = -pi_chosen / chosen_tokens.clamp(min=1)  # (B,)
    loss = _smoothed_sigmoid(beta * (pi_chosen - pi_rejected), label_smoothing) + alpha * nll
    stats = _pair_stats(beta * pi_chosen.detach(), beta * pi_rejected.detach(), pi_chosen, pi_rejected)
    stats["nll_loss"] = (nll.detach().float().sum(), nll.numel())
    return loss, stats


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0, log1p(-exp(x))
    far from it. x is kept below -1e-6: an average log-prob of exactly 0 (probability 1) has odds of infinity."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, int]]]:
    """ORPO (Hong et al. 2024, eq. 6-7): the chosen response's NLL plus beta (the paper's lambda, TRL's `beta`)
    times the odds-ratio term, on length-normalised log-probs a = log pi(y) / |y|:

        odds(y) = p / (1 - p) with p = exp(a),  log_odds = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r)))
        loss = -a_c - beta * log sig(log_odds)

    `rewards/chosen` = beta a_c (TRL's ORPOTrainer); `nll_loss`, `log_odds_ratio` (= log sig(log_odds)) and
    `log_odds_chosen` (= log_odds) are logged."""
    _check(beta, 0.0)
    avg_chosen = pi_chosen / chosen_tokens.clamp(min=1)  # (B,)
    avg_rejected = pi_rejected / rejected_tokens.clamp(min=1)  # (B,)
    log_odds = (avg_chosen - avg_rejected) - (_log1m_exp(avg_chosen) - _log1m_exp(avg_rejected))  # (B,)
    ratio = F.logsigmoid(log_odds)  # (B,)
    nll = -avg_chosen
    loss = nll - beta * ratio
    stats = _pair_stats(beta * avg_chosen.detach(), beta * avg_rejected.detach(), pi_chosen, pi_rejected)
    n = loss.numel()
    stats.update({"nll_loss": (nll.detach().float().sum(), n), "log_odds_ratio": (ratio.detach().float().sum(), n),
                  "log_odds_chosen": (log_odds.detach().float().sum(), n)})
    return loss, stats


__all__ = ["dpo_loss", "simpo_loss", "cpo_loss", "orpo_loss", "LOSS_TYPES", "REFERENCE_FREE_LOSS_TYPES"]
