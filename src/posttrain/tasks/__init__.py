"""Built-in tasks: seeded data generators with gold verifiers, so the pipeline runs with no network.

- ``arithmetic``: multi-step sums with a worked chain (stands in for code generation with unit tests).
- ``sentiment``: continue a film review positively (stands in for IMDb in the DPO paper).
- ``dialogue``: answer benign questions, decline harmful ones (stands in for HH-RLHF / SafeRLHF).
- ``math``: sums of fractions whose prompt rows carry an ``answer`` column, graded by math-verify.

``posttrain task NAME OUT_DIR`` writes ``sft.jsonl``, ``prefs.jsonl``, ``prompts.jsonl``,
``eval.jsonl`` and, for sentiment, ``classify.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.config import ConfigError, TaskConfig
from posttrain.tasks import arithmetic, dialogue, math, sentiment
from posttrain.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (arithmetic.TASK, sentiment.TASK, dialogue.TASK, math.TASK)}
# The tasks whose texts train the embedded tiny tokenizer. `math` is left out so the tokenizer (and every tiny model
# and pinned number built on it) stays what it was; its text is arithmetic's words and digits plus `/` and
# `\boxed{}`, which the byte-level BPE still encodes, in more pieces.
CORPUS_TASKS = ("arithmetic", "sentiment", "dialogue")

__all__ = ["TASKS", "Task", "corpus", "get_task", "main"]


def get_task(name: str) -> Task:
    """The built-in task called ``name``."""
    if name not in TASKS:
        raise ConfigError(f"unknown task `{name}`; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


def corpus(seed: int = 0, rows_per_task: int = 1000) -> list[str]:
    """Plain texts from every task (prompts, completions, reviews), for training a tokenizer.

    Each task gives the same number of rows, split over its difficulty levels, and texts keep
    their repeats: BPE merges follow frequencies, and a deduplicated corpus would starve the
    tasks with few distinct answers (dialogue) of merges. Training rows only (``n_eval=0``), with
    some noisy demonstrations so wrong chains, refusals and compliance are covered too.
    """
    texts: list[str] = []
    for task in (TASKS[name] for name in CORPUS_TASKS):
        for level in task.levels:
            n = max(1, rows_per_task // len(task.levels))
            rows = task.rows(seed=seed, n_train=n, n_eval=0, noise=0.2, difficulty=level)
            for sft, pref in zip(rows["sft"], rows["prefs"]):
                texts += [m["content"] for m in sft["messages"]]
                texts.append(pref["rejected"])
            texts += [r["text"] for r in rows.get("classify", [])]
    return texts


def main(cfg: TaskConfig) -> dict[str, Path]:
    """``posttrain task NAME OUT_DIR``: write the task's files and print each path with its row count."""
    task = get_task(cfg.name)
    paths = task.generate(cfg.output_dir, seed=cfg.seed, n_train=cfg.n_train, n_eval=cfg.n_eval,
                          noise=cfg.noise, difficulty=cfg.difficulty)
    print(f"task {task.name} (difficulty {cfg.difficulty}, noise {cfg.noise}, seed {cfg.seed}): {task.description}")
    for path in paths.values():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        print(f"  {path}  {n} rows")
    return paths
