"""A built-in task's verifier as the reward: ``reward.task: arithmetic | sentiment | dialogue``.

The verifier reads the user text, the decoded assistant text and, for a task that names them (``math``: the
``answer`` column), the prompt row's columns (docs/internals.md, posttrain.tasks), so it is the gold reward the
proxy reward models are checked against.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from posttrain.config import ConfigError
from posttrain.rewards.base import Columns, Prompt, check_lengths, prompt_text, scores_to_tensor


class TaskReward:
    """Scores from ``posttrain.tasks.get_task(name).verify_batch(prompt_texts, completions)``."""

    def __init__(self, task_name: str):
        from posttrain.tasks import TASKS, get_task

        if task_name not in TASKS:
            raise ConfigError(f"reward.task: unknown task `{task_name}`; built-in tasks: {', '.join(sorted(TASKS))}")
        self.task = get_task(task_name)
        self.name = f"task:{task_name}"
        self.log_name = task_name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], *, columns: Columns | None = None,
                 **context: Any) -> torch.Tensor:
        n = check_lengths(prompts, completions)
        comps, texts = list(completions), [prompt_text(p) for p in prompts]
        values = self.task.verify_batch(texts, comps, columns)
        return scores_to_tensor(values, n, f"verifier of {self.name}", comps, texts)  # (N,)
