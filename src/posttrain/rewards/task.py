"""A built-in task's verifier as the reward: ``reward.task: arithmetic | sentiment | dialogue``.

The verifier reads only the user text and the decoded assistant text (docs/internals.md,
posttrain.tasks), so it is the gold reward the proxy reward models are checked against.
"""

from __future__ import annotations

from typing import Sequence

import torch

from posttrain.config import ConfigError
from posttrain.rewards.base import Prompt, check_lengths, prompt_text, scores_to_tensor


class TaskReward:
    """Scores from ``posttrain.tasks.get_task(name).verify_batch(prompt_texts, completions)``."""

    def __init__(self, task_name: str):
        from posttrain.tasks import TASKS, get_task

        if task_name not in TASKS:
            raise ConfigError(f"reward.task: unknown task `{task_name}`; built-in tasks: {', '.join(sorted(TASKS))}")
        self.task = get_task(task_name)
        self.name = f"task:{task_name}"

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        n = check_lengths(prompts, completions)
        comps = list(completions)
        values = self.task.verify_batch([prompt_text(p) for p in prompts], comps)
        return scores_to_tensor(values, n, f"verifier of {self.name}", comps)  # (N,)
