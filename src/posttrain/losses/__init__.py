"""posttrain.losses: pure tensor functions (no model, no I/O, no distributed).

Every loss returns per-element values (per token (B, T), zero where masked, or per pair (B,))
and a dict of detached stats; the caller normalises by the global count of the optimizer step.
"""

from posttrain.losses.dpo import LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, cpo_loss, dpo_loss, orpo_loss, simpo_loss
from posttrain.losses.kto import kto_loss
from posttrain.losses.logprobs import entropy_from_logits, logprobs_from_hidden, logprobs_from_logits, selective_log_softmax
from posttrain.losses.ppo import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    gae_advantages,
    grpo_advantages,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    policy_loss,
    reinforce_pp_returns,
    rloo_advantages,
    value_loss,
)
from posttrain.losses.reward import bradley_terry_loss, ranking_loss, ranking_pairs
from posttrain.losses.sft import sft_loss

__all__ = [
    "LOSS_TYPES",
    "KL_ESTIMATORS",
    "REFERENCE_FREE_LOSS_TYPES",
    "dpo_loss",
    "simpo_loss",
    "cpo_loss",
    "orpo_loss",
    "kto_loss",
    "entropy_from_logits",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "selective_log_softmax",
    "AdaptiveKLController",
    "FixedKLController",
    "gae_advantages",
    "grpo_advantages",
    "kl_estimate",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_loss",
    "reinforce_pp_returns",
    "rloo_advantages",
    "value_loss",
    "bradley_terry_loss",
    "ranking_loss",
    "ranking_pairs",
    "sft_loss",
]
