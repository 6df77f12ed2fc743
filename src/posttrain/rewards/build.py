"""``build_reward``: the reward source a run's ``reward.*`` config asks for."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.config import ConfigError, RewardConfig
from posttrain.rewards.base import ClippedReward, CombinedReward, RewardSource
from posttrain.rewards.function import FunctionReward
from posttrain.rewards.model import ModelReward, has_tokenizer, reward_folder
from posttrain.rewards.task import TaskReward


def build_reward(
    reward_cfg: RewardConfig,
    *,
    device: str | torch.device | None = None,
    tokenizer: Any = None,
    dtype: str = "auto",
    attn_implementation: str = "auto",
    trust_remote_code: bool = False,
) -> RewardSource:
    """One source from ``reward.model`` / ``reward.function`` (one or several) / ``reward.task``.

    Several given: their weighted sum, with ``reward.weights`` in that order (model, each function, task; 1.0 each
    when empty); ``score_parts`` gives each one's own scores for the logs. Functions get ``reward.timeout``.
    A single source with one weight is scaled by it. ``reward.clip > 0`` clips after combining.
    ``tokenizer`` is used only for a reward-model folder that has no tokenizer of its own. The reward model loads
    with the run's ``attn_implementation`` and ``trust_remote_code``.
    """
    sources: list[RewardSource] = []
    if reward_cfg.model:
        folder = reward_folder(reward_cfg.model)
        own = has_tokenizer(folder)
        if not own and tokenizer is None:
            raise ConfigError(f"reward.model: {folder} has no tokenizer files and none was given")
        sources.append(
            ModelReward(
                folder,
                None if own else tokenizer,
                device=device,
                batch_size=reward_cfg.batch_size,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
                # `reward.label` (a classifier's label used as the reward) is asked of the config
                # owner; until the key exists, reward models with one output need none.
                label=(reward_cfg.label or None),
            )
        )
    if reward_cfg.timeout < 0:
        raise ConfigError(f"reward.timeout must be >= 0 (0 = no limit), got {reward_cfg.timeout}")
    functions = [reward_cfg.function] if isinstance(reward_cfg.function, str) else list(reward_cfg.function)
    sources += [FunctionReward(spec, timeout=reward_cfg.timeout) for spec in functions if spec]
    if reward_cfg.task:
        sources.append(TaskReward(reward_cfg.task))
    if not sources:
        raise ConfigError("no reward source: set reward.model / reward.function / reward.task")

    weights = list(reward_cfg.weights)
    if weights and len(weights) != len(sources):
        names = ", ".join(s.name for s in sources)
        raise ConfigError(f"reward.weights has {len(weights)} values for {len(sources)} sources ({names}); give one per source in model, functions, task order")
    source: RewardSource
    if len(sources) == 1 and (not weights or weights[0] == 1.0):
        source = sources[0]
    else:
        source = CombinedReward(list(zip(sources, weights or [1.0] * len(sources))))
    if reward_cfg.clip < 0:
        raise ConfigError(f"reward.clip must be >= 0 (0 = off), got {reward_cfg.clip}")
    if reward_cfg.clip > 0:
        source = ClippedReward(source, reward_cfg.clip)
    return source
