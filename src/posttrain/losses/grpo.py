"""The GRPO family's pieces: group advantages, the clipped surrogate with token or sequence ratios, the clamped k3
KL, DAPO's soft overlong penalty, and the four loss aggregations.

Shao et al. 2024 (GRPO, arXiv 2402.03300), Yu et al. 2025 (DAPO, arXiv 2503.14476: clip-higher, token-mean
aggregation, dynamic sampling, overlong shaping), Liu et al. 2025 (Dr. GRPO, arXiv 2503.20783: no std, a constant
normaliser), Zheng et al. 2025 (GSPO, arXiv 2507.18071: sequence-level ratio). Tensors are (B, T) over response
tokens, right-padded; `mask` is true on the tokens that enter the loss. Padding values may be anything: they are
selected away before any arithmetic, as in `losses.ppo`.

Aggregation (`loss_type`, TRL's names). An optimizer step's loss is sum(loss_sum) / sum(count) over its
micro-batches and ranks (`engine.train_step`); `aggregate` returns the pair that makes each definition exact:

    dapo     token mean over the optimizer step:   loss_sum = sum of token losses,        count = tokens
    grpo     mean over sequences of token means:   loss_sum = sum_i (sum_t l_it / |o_i|), count = sequences
    dr_grpo  constant normaliser L (max length):   loss_sum = sum of token losses / L,    count = sequences
    bnpo     token mean of each micro-batch, averaged over micro-batches and ranks (TRL: the local batch's
             token mean divided by the accumulation steps, then DDP's average): loss_sum = that mean, count = 1
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL's: a group whose rewards are all equal gets advantage 0 / 1e-4 = 0, not 0 / 0


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros_like(x))


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "group",
                     batch_std: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), zero_std (N,) bool): r minus its group's mean, divided by a std (`scale`).

    scores: (N,), the `group_size` samples of one prompt consecutive. `scale`: group (the group's unbiased std,
    Shao et al.), batch (the unbiased std of every score of the batch; `batch_std` when the batch is larger than
    `scores`, i.e. spread over ranks), none (Dr. GRPO: mean-centred only). The std gets STD_EPS added. zero_std
    marks rows whose group's rewards are all equal (TRL's `frac_reward_zero_std` counts them; with `batch`, it is
    the batch's std that is tested, as TRL does)."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale!r}; valid: {', '.join(SCALE_REWARDS)}")
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"scores of shape {tuple(scores.shape)} do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)  # (N / G, G)
    centred = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)  # (N,)
    if scale == "batch":
        std = torch.as_tensor(scores.std() if batch_std is None else batch_std, dtype=scores.dtype).expand_as(scores)
    elif group_size > 1:
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    else:
        std = torch.zeros_like(scores)
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return (centred if scale == "none" else centred / (std + STD_EPS)), zero_std


def importance_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor,
                         level: str = "token") -> torch.Tensor:
    """log pi / pi_old: per token (B, T), or per sequence (B, 1) = the mean of the row's token log-ratios
    (GSPO eq. 7: s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|), the geometric mean of the token ratios)."""
    log_ratio = _valid(logp - old_logp, mask)  # (B, T)
    if level == "token":
        return log_ratio
    if level == "sequence":
        return log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1).to(log_ratio.dtype)
    raise ValueError(f"unknown importance_sampling_level {level!r}; valid: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                      epsilon: float, epsilon_high: float | None = None, level: str = "token"):
    """Per-token clipped objective -min(r A, clip(r, 1 - eps, 1 + eps_high) A) (B, T), 0 on padding, and stats.

    advantages: (B,) per sequence or (B, T). DAPO's clip-higher: `epsilon_high` > `epsilon` lets a token whose
    probability is low rise further before the clip stops its gradient (None = epsilon). `level`: token ratios,
    or GSPO's one sequence ratio for every token of the row. Stats (each (sum, count) over the valid tokens,
    TRL's names): `clip_ratio/low_mean` (A < 0 and r < 1 - eps: clipped at the bottom), `clip_ratio/high_mean`
    (A > 0 and r > 1 + eps_high), `clip_ratio/region_mean` (either)."""
    mask = mask.bool()
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None] if advantages.dim() == 1 else advantages  # (B, 1) or (B, T)
    ratio = torch.exp(importance_log_ratio(logp, old_logp, mask, level)).expand_as(logp)  # (B, T)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high) * adv
    loss = _valid(-torch.minimum(unclipped, clipped), mask)  # (B, T)
    with torch.no_grad():
        n = mask.sum()
        low = (ratio < 1 - epsilon) & (adv < 0) & mask
        top = (ratio > 1 + high) & (adv > 0) & mask
        stats = {"clip_ratio/low_mean": (low.float().sum(), n), "clip_ratio/high_mean": (top.float().sum(), n),
                 "clip_ratio/region_mean": ((low | top).float().sum(), n)}
    return loss, stats


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 = (r - 1) - log r, r = pi_ref / pi (Schulman 2020), with verl's clamps (its `low_var_kl`): the
    log-ratio to [-20, 20] before the exp, the estimate to [-10, 10]; 0 on padding. (B, T)."""
    log_r = torch.clamp(_valid(ref_logp - logp, mask), -20.0, 20.0)
    return _valid(torch.clamp(torch.expm1(log_r) - log_r, -10.0, 10.0), mask)


def soft_overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), added to the reward: 0 up to max_length - buffer tokens, then
    falling linearly to -factor at max_length (and -factor beyond). lengths: (N,) response tokens. (N,) float32."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = lengths.float() - (max_length - buffer)  # (N,) tokens into the buffer
    return -factor * torch.clamp(over / buffer, 0.0, 1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str,
              max_completion_length: int) -> tuple[torch.Tensor, int]:
    """(loss_sum, count) of one micro-batch for `engine.train_step` (module doc). per_token, mask: (B, T)."""
    mask = mask.bool()
    total = _valid(per_token, mask)
    if loss_type == "dapo":
        return total.sum(), int(mask.sum())
    if loss_type == "grpo":
        return (total.sum(-1) / mask.sum(-1).clamp(min=1).to(total.dtype)).sum(), mask.shape[0]
    if loss_type == "dr_grpo":
        return total.sum() / max_completion_length, mask.shape[0]
    if loss_type == "bnpo":
        return total.sum() / mask.sum().clamp(min=1).to(total.dtype), 1
    raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


def aggregate_count(mask: torch.Tensor, loss_type: str) -> int:
    """The `count` `aggregate` returns for this micro-batch, without the loss (`train_step`'s count_fn)."""
    return {"dapo": int(mask.bool().sum()), "grpo": mask.shape[0], "dr_grpo": mask.shape[0], "bnpo": 1}[loss_type]


__all__ = ["LOSS_TYPES", "SCALE_REWARDS", "IMPORTANCE_SAMPLING_LEVELS", "group_advantages", "importance_log_ratio",
           "clipped_surrogate", "k3_kl", "soft_overlong_penalty", "aggregate", "aggregate_count"]
