"""The reward-source interface, prompt helpers, and the combinators (weighted sum, clipping).

Every source maps a batch of (prompt, completion) pairs to one float per pair:

    source(prompts, completions) -> torch.Tensor  # (N,) float32 on the CPU

A prompt is either a message list (``[{"role": "user", "content": ...}, ...]``) or a plain string,
which stands for one user turn (docs/internals.md, posttrain.tasks). A completion is the decoded
assistant text, already cut after the first end-of-turn token by the caller.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from posttrain.errors import RewardError

Prompt = list[dict[str, Any]] | str


@runtime_checkable
class RewardSource(Protocol):
    """A batch of (prompt, completion) -> one float32 score per pair, shape (N,), on the CPU."""

    name: str

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor: ...


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


def scores_to_tensor(values: Any, n: int, who: str, completions: Sequence[str]) -> torch.Tensor:
    """Check what a user function or verifier returned and turn it into a (N,) float32 tensor.

    ``who`` names the source in the error (``file.py:fn``, ``task arithmetic``). A wrong length, a
    non-number (bools count as 0/1) or a non-finite value raises RewardError naming the item index,
    the value and the start of that item's completion.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().reshape(-1).tolist()
    elif hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()  # numpy arrays
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise RewardError(f"{who} returned {type(values).__name__} {_preview(repr(values))}; expected a list of {n} floats")
    if len(values) != n:
        raise RewardError(f"{who} returned {len(values)} values for {n} completions; expected one float per completion")
    out: list[float] = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"{who} returned a non-number at item {i}: {_preview(repr(v))} ({type(v).__name__}); "
                f"completion {i}: {_preview(completions[i])!r}"
            )
        f = float(v)
        if not math.isfinite(f):
            raise RewardError(f"{who} returned a non-finite value at item {i}: {f!r}; completion {i}: {_preview(completions[i])!r}")
        out.append(f)
    return torch.tensor(out, dtype=torch.float32)


class CombinedReward:
    """Weighted sum of sources: r = sum_k w_k * r_k(prompt, completion)."""

    def __init__(self, sources: Sequence[tuple[RewardSource, float]]):
        if not sources:
            raise RewardError("CombinedReward needs at least one (source, weight) pair")
        self.sources = [(s, float(w)) for s, w in sources]
        self.name = " + ".join(s.name if w == 1.0 else f"{w:g}*{s.name}" for s, w in self.sources)

    def parts(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each source's unweighted scores, by source name (for logging each term)."""
        check_lengths(prompts, completions)
        return {s.name: s(prompts, completions) for s, _ in self.sources}

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        n = check_lengths(prompts, completions)
        total = torch.zeros(n, dtype=torch.float32)  # (N,)
        for source, weight in self.sources:
            total += weight * source(prompts, completions)
        return total


class ClippedReward:
    """Scores clipped to [-clip, clip]; reward clipping is one of the PPO details (Huang et al. 2024)."""

    def __init__(self, source: RewardSource, clip: float):
        if clip <= 0:
            raise RewardError(f"clip must be > 0, got {clip}")
        self.source, self.clip = source, float(clip)
        self.name = source.name

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> torch.Tensor:
        return self.source(prompts, completions).clamp(-self.clip, self.clip)  # (N,)
