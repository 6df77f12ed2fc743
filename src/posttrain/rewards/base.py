"""The reward-source interface, prompt helpers, and the combinators (weighted sum, clipping).

Every source maps a batch of (prompt, completion) pairs to one float per pair:

    source(prompts, completions, *, columns=None, completion_ids=None, step=None) -> torch.Tensor  # (N,)

A prompt is either a message list (``[{"role": "user", "content": ...}, ...]``) or a plain string,
which stands for one user turn (docs/internals.md, posttrain.tasks). A completion is the decoded
assistant text, already cut after the first end-of-turn token by the caller. The keyword arguments are
optional context, aligned with the completions (N items each): ``columns`` the prompt row's other columns
(``{"answer": [...]}``, ``row_columns`` builds it), ``completion_ids`` the sampled token ids (through EOS),
``step`` the training step. A source uses what it needs (a Python function, a task verifier) and ignores the
rest (a reward model). The result is a float32 CPU tensor.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch

from posttrain.errors import RewardError

Prompt = list[dict[str, Any]] | str
Columns = Mapping[str, Sequence[Any]]


@runtime_checkable
class RewardSource(Protocol):
    """A batch of (prompt, completion) -> one float32 score per pair, shape (N,), on the CPU.

    ``name`` names the source in errors (``file.py:fn``); ``log_name`` is its key in the logs
    (``rewards/<log_name>/mean``)."""

    name: str
    log_name: str

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], *, columns: Columns | None = None,
                 completion_ids: Sequence[Sequence[int]] | None = None, step: int | None = None) -> torch.Tensor: ...


def row_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Per-row column dicts (a prompt row's other columns, one dict per completion) -> {column: N values}.

    A column that some rows lack is None in those rows."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    return {name: [row.get(name) for row in rows] for name in names}


def prompt_text(prompt: Prompt) -> str:
    """The text a verifier reads: the last user message of a message list, or the string itself."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message.get("content", "")
            return content if isinstance(content, str) else str(content)
    return ""


def to_messages(prompt: Prompt) -> list[dict[str, Any]]:
    """A prompt as a message list; a string is one user turn."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def check_lengths(prompts: Sequence[Prompt], completions: Sequence[str]) -> int:
    """The batch size N; prompts and completions must pair up one to one."""
    if len(prompts) != len(completions):
        raise RewardError(f"got {len(prompts)} prompts but {len(completions)} completions; they must pair up")
    return len(completions)


def _preview(text: str, width: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


def _where(i: int, completions: Sequence[str], prompts: Sequence[Prompt] | None) -> str:
    """``row i`` with the start of its prompt (when given) and completion, for error messages."""
    prompt = f"prompt {_preview(prompt_text(prompts[i]))!r}, " if prompts is not None and i < len(prompts) else ""
    return f"row {i} ({prompt}completion {_preview(completions[i])!r})"


def scores_to_tensor(values: Any, n: int, who: str, completions: Sequence[str],
                     prompts: Sequence[Prompt] | None = None) -> torch.Tensor:
    """Check what a user function or verifier returned and turn it into a (N,) float32 tensor.

    ``who`` names the source in the error (``file.py:fn``, ``task arithmetic``). A wrong length, a
    non-number (bools count as 0/1; None too is refused: every completion needs a score) or a non-finite value
    raises RewardError naming the row (its index in the batch, the start of its prompt and completion) and the value.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"{who} returned {type(values).__name__} {_preview(repr(values))}; expected a list of {n} floats")
    if len(values) != n:
        raise RewardError(f"{who} returned {len(values)} values for {n} completions; expected one float per completion")
    out: list[float] = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RewardError(f"{who} returned a non-number {_preview(repr(v))} ({type(v).__name__}) at "
                              f"{_where(i, completions, prompts)}")
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"{who} returned a non-finite value {f!r} at {_where(i, completions, prompts)}")
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


class CombinedReward:
    """Weighted sum of sources: r = sum_k w_k * r_k(prompt, completion)."""

    def __init__(self, sources: Sequence[tuple[RewardSource, float]]):
        if not sources:
            raise RewardError("CombinedReward needs at least one (source, weight) pair")
        self.sources = [(s, float(w)) for s, w in sources]
        self.name = " + ".join(s.name if w == 1.0 else f"{w:g}*{s.name}" for s, w in self.sources)
        self.log_name = "combined"
        short = [getattr(s, "log_name", s.name) for s, _ in self.sources]
        # two sources with one short name (two files' `accuracy`) are told apart by their full names
        self.keys = [k if short.count(k) == 1 else s.name for k, (s, _) in zip(short, self.sources)]

    def parts(self, prompts: Sequence[Prompt], completions: Sequence[str], **context: Any) -> dict[str, torch.Tensor]:
        """Each source's unweighted scores, by its log name (for logging each term)."""
        check_lengths(prompts, completions)
        return {key: s(prompts, completions, **context) for key, (s, _) in zip(self.keys, self.sources)}

    def combine(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of ``parts`` (as returned by ``parts``), (N,)."""
        total = torch.zeros_like(next(iter(parts.values())))  # (N,)
        for key, (_, weight) in zip(self.keys, self.sources):
            total += weight * parts[key]
        return total

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **context: Any) -> torch.Tensor:
        return self.combine(self.parts(prompts, completions, **context))


class ClippedReward:
    """Scores clipped to [-clip, clip]; reward clipping is one of the PPO details (Huang et al. 2024)."""

    def __init__(self, source: RewardSource, clip: float):
        if clip <= 0:
            raise RewardError(f"clip must be > 0, got {clip}")
        self.source, self.clip = source, float(clip)
        self.name = source.name
        self.log_name = getattr(source, "log_name", source.name)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], **context: Any) -> torch.Tensor:
        return self.source(prompts, completions, **context).clamp(-self.clip, self.clip)  # (N,)


def score_parts(source: RewardSource, prompts: Sequence[Prompt], completions: Sequence[str], **context: Any
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the source's scores (N,), each reward's own unweighted, unclipped scores by log name), each computed once.

    ``context``: the optional keyword arguments of the source call (``columns``, ``completion_ids``, ``step``)."""
    if isinstance(source, ClippedReward):
        total, parts = score_parts(source.source, prompts, completions, **context)
        return total.clamp(-source.clip, source.clip), parts
    if isinstance(source, CombinedReward):
        parts = source.parts(prompts, completions, **context)
        return source.combine(parts), parts
    scores = source(prompts, completions, **context)
    return scores, {getattr(source, "log_name", source.name): scores}


def reward_names(source: RewardSource) -> list[str]:
    """The log names ``score_parts`` returns for ``source``, in order."""
    if isinstance(source, ClippedReward):
        return reward_names(source.source)
    if isinstance(source, CombinedReward):
        return list(source.keys)
    return [getattr(source, "log_name", source.name)]
