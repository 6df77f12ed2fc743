"""What every built-in task shares: the ``Task`` record, the held-out split, atomic JSONL writing.

A task is two pure functions plus a name: ``build`` turns a seeded ``random.Random`` into rows for
each output file, and ``score`` is the gold verifier. ``Task`` composes them; it adds input checks,
drops preference pairs the verifier does not strictly order, and writes the files.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from posttrain.config import ConfigError
from posttrain.errors import RewardError

Rows = dict[str, list[dict[str, Any]]]
Q = TypeVar("Q")

# consecutive draws without a usable question before giving up on a too-small question space
MAX_MISSES = 20_000
# the order files are written and reported in
FILES = ("sft", "prefs", "prompts", "eval", "classify")


def chat(prompt: str, completion: str) -> dict[str, Any]:
    """One SFT row: a user turn and the assistant's answer (the data layer's ``messages`` format)."""
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}


def split_questions(
    rng: random.Random,
    draw: Callable[[random.Random], tuple[Hashable, Q]],
    n_train: int,
    n_eval: int,
    task: str,
) -> tuple[list[Q], list[Q]]:
    """Draw ``n_eval`` distinct held-out questions, then ``n_train`` training questions none of which is held out.

    ``draw`` returns (identity, question). Training questions may repeat (small question spaces
    such as 1-digit sums have fewer distinct questions than rows); held-out ones never appear in
    training, so eval measures generalisation to unseen prompts.
    """
    held: dict[Hashable, Q] = {}
    misses = 0  # consecutive draws that found nothing new: the question space is (nearly) used up
    while len(held) < n_eval:
        key, q = draw(rng)
        misses = misses + 1 if key in held else 0
        held.setdefault(key, q)
        if misses > MAX_MISSES:
            raise ConfigError(f"task `{task}`: only {len(held)} distinct questions found for n_eval={n_eval}; lower n_eval")
    train: list[Q] = []
    misses = 0
    while len(train) < n_train:
        key, q = draw(rng)
        misses = misses + 1 if key in held else 0
        if key not in held:
            train.append(q)
        if misses > MAX_MISSES:
            raise ConfigError(f"task `{task}`: held-out questions leave too few for training; lower n_eval")
    return train, list(held.values())


def noisy_indices(rng: random.Random, n: int, noise: float) -> set[int]:
    """Exactly ``round(noise * n)`` row indices, so the measured noise equals the requested one up to rounding."""
    return set(rng.sample(range(n), round(noise * n)))


def _write_tmp(path: Path, rows: list[dict[str, Any]]) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return tmp


def write_jsonl_files(files: dict[Path, list[dict[str, Any]]]) -> None:
    """Write every file to ``NAME.tmp`` first and rename them all at the end, so a failure
    part-way leaves no half-written file (and no mix of old and new files) behind."""
    tmps: list[tuple[Path, Path]] = []
    try:
        for path, rows in files.items():
            tmps.append((_write_tmp(path, rows), path))
    except BaseException:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        for path in files:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        raise
    for tmp, path in tmps:
        os.replace(tmp, path)


@dataclass(frozen=True)
class Task:
    """A built-in task: a seeded data generator and a gold verifier.

    ``build(rng, n_train, n_eval, noise, difficulty) -> {file stem: rows}``;
    ``score(prompt, completion, **columns) -> float`` reads what it needs from the user text and, for a task that
    names ``columns`` (``math``: ``answer``), from those columns of the prompt row, which its prompt files carry.
    """

    name: str
    description: str
    build: Callable[[random.Random, int, int, float, int], Rows]
    score: Callable[..., float]
    levels: tuple[int, ...] = (1,)
    columns: tuple[str, ...] = ()
    # a graded score (a degree, e.g. a share of positive words) is compared by its mean over samples; a right /
    # wrong score (>= 1 means right) by accuracy and pass@k
    graded: bool = False

    def verify(self, prompt: str, completion: str, **columns: Any) -> float:
        """Gold reward of one completion (a decoded assistant turn) for one user prompt (and its row's columns)."""
        return float(self.score(prompt, completion, **{c: columns[c] for c in self.columns}))

    def verify_batch(self, prompts: list[str], completions: list[str],
                     columns: Mapping[str, Sequence[Any]] | None = None) -> list[float]:
        """``verify`` over aligned lists; ``columns``: {column: one value per completion} (``rewards.row_columns``)."""
        if len(prompts) != len(completions):
            raise RewardError(f"task `{self.name}`: {len(prompts)} prompts but {len(completions)} completions")
        columns = columns or {}
        for c in self.columns:
            values = columns.get(c)
            bad = next((i for i, v in enumerate(values) if v is None), None) if values is not None else 0
            if bad is not None:
                raise RewardError(f"task `{self.name}`: its verifier reads the prompt rows' `{c}` column, which row "
                                  f"{bad} (prompt {prompts[bad][:60]!r}) lacks; use the task's own prompt files "
                                  f"(`posttrain task {self.name} DIR`)")
        return [self.verify(p, comp, **{c: columns[c][i] for c in self.columns})
                for i, (p, comp) in enumerate(zip(prompts, completions))]

    def rows(self, *, seed: int = 0, n_train: int = 4000, n_eval: int = 500, noise: float = 0.2,
             difficulty: int = 1) -> Rows:
        """The rows of every file, in memory. Preference pairs the verifier scores as ties (or inverted) are dropped."""
        if difficulty not in self.levels:
            raise ConfigError(f"task `{self.name}`: difficulty must be one of {list(self.levels)}, got {difficulty}")
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"task `{self.name}`: noise must be in [0, 1], got {noise}")
        if n_train < 1 or n_eval < 0:
            raise ConfigError(f"task `{self.name}`: need n_train >= 1 and n_eval >= 0, got {n_train} and {n_eval}")
        out = self.build(random.Random(seed), n_train, n_eval, noise, difficulty)
        cols = lambda r: {c: r[c] for c in self.columns}  # noqa: E731 - the pair's row columns the verifier reads
        out["prefs"] = [r for r in out["prefs"]
                        if self.verify(r["prompt"], r["chosen"], **cols(r)) > self.verify(r["prompt"], r["rejected"], **cols(r))]
        return out

    def generate(self, out_dir: str | Path, *, seed: int = 0, n_train: int = 4000, n_eval: int = 500,
                 noise: float = 0.2, difficulty: int = 1) -> dict[str, Path]:
        """Write ``sft / prefs / prompts / eval (/ classify).jsonl`` under ``out_dir``; returns {stem: path}.

        Every file is written to a temporary name first and all are renamed at the end, so a failure
        leaves no half-written file behind.
        """
        rows = self.rows(seed=seed, n_train=n_train, n_eval=n_eval, noise=noise, difficulty=difficulty)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {stem: out / f"{stem}.jsonl" for stem in FILES if stem in rows}
        write_jsonl_files({paths[stem]: rows[stem] for stem in paths})
        return paths
