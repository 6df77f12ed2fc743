"""PPO for language models and the critic-free advantage estimators (GRPO, RLOO, REINFORCE++).

Formulas: Schulman et al. 2017 (clipped objective), Schulman et al. 2016 (GAE), Ziegler et al.
2019 (per-token KL reward, adaptive KL), Huang et al. 2024 "The N+ implementation details of
RLHF with PPO" (whitening, value clipping), Shao et al. 2024 (GRPO), Ahmadian et al. 2024 (RLOO),
Hu 2025 (REINFORCE++). Tensors are (B, T) over response tokens, right-padded; `mask` is true on
valid tokens. Padding values may be anything (even inf): they are replaced before any arithmetic
so that neither values nor gradients on valid tokens can change.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def _valid(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x with padding set to 0 (a select, so an inf/NaN there cannot leak into values or grads)."""
    return torch.where(mask, x, torch.zeros_like(x))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is true (all of them, or along `dim`).

    A row with no valid position has mean 0 (its denominator is clamped to 1).
    """
    mask = mask.bool()
    total = _valid(x, mask).sum() if dim is None else _valid(x, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over the valid positions (Bessel-corrected when `unbiased`)."""
    mask = mask.bool()
    count = int(mask.sum())
    if count == 0 or (unbiased and count < 2):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid positions, got {count}")
    mean = masked_mean(x, mask)
    var = masked_mean((_valid(x, mask) - mean) ** 2, mask)
    if unbiased:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, *,
                  mean: torch.Tensor | None = None, var: torch.Tensor | None = None) -> torch.Tensor:
    """(x - mean) / std over the valid positions; padding is returned as 0.

    With shift_mean=False the mean is added back (only the scale changes), as done for rewards
    in Huang et al. 2024 so that the sign of a reward survives whitening. ``mean`` and ``var`` default to the
    valid positions' mean and Bessel-corrected variance; a caller whose batch is larger than ``x`` (the other
    rows live on other processes: ``engine.dist.RolloutShare.whiten``) passes the whole batch's.
    """
    mask = mask.bool()
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    whitened = (_valid(x, mask) - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return _valid(whitened, mask)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from a token sampled from pi (Schulman 2020, "Approximating KL").

    With log r = ref_logp - logp:  k1 = -log r (unbiased, high variance, can be negative);
    k2 = 0.5 (log r)^2 (biased, low variance); k3 = (r - 1) - log r (unbiased, always >= 0).
    Elementwise; same shape as the inputs.
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r  # expm1 keeps r - 1 exact when r is near 1
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")


def _last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid position of each row (B,); 0 for a row with none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)  # (B, T)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(dim=1)


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """RLHF per-token reward (Ziegler et al. 2019; Ouyang et al. 2022 eq. 2).

    scores: (B,) sequence reward; kl: (B, T) per-token KL estimate; mask: (B, T).
    Returns (B, T): -kl_coef * kl_t on every valid token, plus the score on the last valid token
    (the EOS, or the final token of a truncated response); 0 on padding.
    """
    mask = mask.bool()
    rewards = _valid(-kl_coef * kl, mask)  # (B, T)
    has_token = mask.any(dim=1)  # (B,)
    last = _last_index(mask)  # (B,)
    bonus = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    return rewards.scatter_add(1, last.unsqueeze(1), bonus.unsqueeze(1))


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over right-padded responses.

    delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 past the last valid token (the episode ends
    there); A_t = sum_k (gamma lam)^k delta_{t+k}; returns = A + V (the critic's target).
    rewards, values, mask: (B, T). Returns (advantages, returns), both (B, T), 0 on padding.
    No gradient flows (these are targets).
    """
    mask = mask.bool()
    with torch.no_grad():
        rewards = _valid(rewards, mask)
        values = _valid(values, mask)
        next_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).to(values.dtype)  # (B, T)
        advantages = torch.zeros_like(values)
        running = torch.zeros_like(values[:, 0])  # (B,)
        for t in reversed(range(values.shape[1])):
            next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
            delta = rewards[:, t] + gamma * next_value * next_valid[:, t] - values[:, t]
            running = delta + gamma * lam * next_valid[:, t] * running
            advantages[:, t] = running
        advantages = _valid(advantages, mask)
        returns = _valid(advantages + values, mask)
    return advantages, returns


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | int]]]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7), per token.

    ratio = exp(logp - old_logp); loss = max(-A ratio, -A clip(ratio, 1-c, 1+c)).
    logp, old_logp, advantages, mask: (B, T). Returns (per_token (B, T), 0 on padding, stats).
    Normalisation is the caller's: sum over the tokens of every micro-batch and rank of the
    optimizer step, divided by the global count of valid tokens.
    Stats (detached, each a (sum, count) over this batch's valid tokens): `policy/approxkl_avg` of 0.5 (logp -
    old_logp)^2, `policy/clipfrac_avg` of the tokens where the clipped term is the larger, `loss/policy_avg`.
    """
    mask = mask.bool()
    log_ratio = _valid(logp - old_logp, mask)  # (B, T); padding -> ratio 1, finite grads
    advantages = _valid(advantages, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = _valid(torch.maximum(unclipped, clipped), mask)  # (B, T)
    with torch.no_grad():
        n = mask.sum()
        stats = {
            "policy/approxkl_avg": (_valid(0.5 * log_ratio.float() ** 2, mask).sum(), n),
            "policy/clipfrac_avg": (_valid((clipped > unclipped).float(), mask).sum(), n),
            "loss/policy_avg": (loss.float().sum(), n),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor | int]]]:
    """Clipped value loss 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), per token.

    As in OpenAI's PPO2 / Huang et al. 2024 (detail: value clipping). values, old_values,
    returns, mask: (B, T). Returns (per_token (B, T), 0 on padding, stats). Normalised by the
    caller like `policy_loss`; the recipe multiplies by vf_coef.
    Stats (detached, (sum, count) over the valid tokens): `loss/value_avg`, `val/clipfrac_avg` (tokens where the
    clipped error is the larger).
    """
    mask = mask.bool()
    values = _valid(values, mask)
    old_values = _valid(old_values, mask)
    returns = _valid(returns, mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = _valid(0.5 * torch.maximum(unclipped_err, clipped_err), mask)  # (B, T)
    with torch.no_grad():
        n = mask.sum()
        stats = {
            "loss/value_avg": (loss.float().sum(), n),
            "val/clipfrac_avg": (_valid((clipped_err > unclipped_err).float(), mask).sum(), n),
        }
    return loss, stats


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (N,), got shape {tuple(scores.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a baseline needs other samples), got {group_size}")
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    return scores.reshape(-1, group_size)  # (N / G, G)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantages (Shao et al. 2024, sec. 4.1.2): (r - group mean) / (group std + eps).

    scores: (N,) with the G samples of one prompt consecutive; std is the unbiased sample std
    (torch's default, as in the DeepSeekMath / TRL implementations). Returns (N,); the recipe
    broadcasts it to every token of the response.
    """
    groups = _groups(scores, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, eq. 7 baseline): r_i minus the mean of the other k-1 samples' rewards.

    scores: (N,) grouped consecutively, k = group_size. Returns (N,).
    """
    groups = _groups(scores, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


def reinforce_pp_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE++ returns-to-go G_t = sum_k gamma^k r_{t+k} of per-token rewards (B, T) -> (B, T).

    The rewards are `per_token_rewards` (KL penalty in the reward, no critic). The caller
    whitens the result over the global batch's valid tokens (`masked_whiten`) to get advantages.
    0 on padding.
    """
    mask = mask.bool()
    with torch.no_grad():
        rewards = _valid(rewards, mask)
        next_valid = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1).to(rewards.dtype)
        returns = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + gamma * next_valid[:, t] * running
            returns[:, t] = running
    return _valid(returns, mask)


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2).

    e_t = clip(KL_t / target - 1, -0.2, 0.2);  beta_{t+1} = beta_t (1 + K_beta e_t), with
    K_beta = n_steps / horizon (n_steps: samples or steps since the last update).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant KL coefficient with the same interface as `AdaptiveKLController`."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


__all__ = [
    "KL_ESTIMATORS",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "kl_estimate",
    "per_token_rewards",
    "gae_advantages",
    "policy_loss",
    "value_loss",
    "grpo_advantages",
    "rloo_advantages",
    "reinforce_pp_returns",
    "AdaptiveKLController",
    "FixedKLController",
]
