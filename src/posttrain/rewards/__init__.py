"""posttrain.rewards: where a scalar reward comes from.

Every source maps a batch of (prompt, completion) pairs, with optional context (the prompt rows' other columns,
the completion ids, the step), to a (N,) float32 CPU tensor:
a trained reward model (``ModelReward``), a user's Python function (``FunctionReward``), a built-in
task's verifier (``TaskReward``), or a weighted sum of these (``CombinedReward``).
``build_reward(cfg.reward, device=...)`` picks them from a run's config; ``score_parts`` gives the total and
each source's own scores (for the logs). ``posttrain.rewards.verifiers``: built-in math and format rewards.
"""

from posttrain.rewards.base import (
    ClippedReward,
    CombinedReward,
    RewardSource,
    prompt_text,
    reward_names,
    row_columns,
    score_parts,
    scores_to_tensor,
    to_messages,
)
from posttrain.rewards.build import build_reward
from posttrain.rewards.function import FunctionReward, load_function
from posttrain.rewards.model import ModelReward, render_pair
from posttrain.rewards.task import TaskReward

__all__ = [
    "ClippedReward",
    "CombinedReward",
    "FunctionReward",
    "ModelReward",
    "RewardSource",
    "TaskReward",
    "build_reward",
    "load_function",
    "prompt_text",
    "render_pair",
    "reward_names",
    "row_columns",
    "score_parts",
    "scores_to_tensor",
    "to_messages",
]
