"""Built-in reward functions for verifiable answers, written as TRL-style reward functions (rewards/function.py):

    reward.function: [posttrain.rewards.verifiers:math_accuracy, posttrain.rewards.verifiers:boxed_format]

- ``math_accuracy``: 1.0 when the completion's final answer equals the row's ``answer`` column as mathematics,
  else 0.0. Parsing and equivalence are the ``math-verify`` package's (HF's Math-Verify, the checker of the
  Open R1 / TRL math recipes): ``\\boxed{10/12}``, ``5/6`` and ``\\frac{5}{6}`` all equal ``5/6``; the last boxed
  or plain expression of the completion is its answer. A completion it cannot parse scores 0.
- ``boxed_format``: 1.0 when the completion puts exactly one ``\\boxed{...}`` answer, non-empty, at its end
  (a final full stop or ``$`` allowed), else 0.0: a format reward that pays for stating one final answer the
  verifier can read, whether or not it is right.
"""

from __future__ import annotations

import functools
import re
import threading
from typing import Any, Sequence

# a final \boxed{...} (braces nested one deep inside, as in \frac{5}{6}), then only closing punctuation
_BOXED = re.compile(r"\\boxed\{")
_FINAL_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})+)\}\s*\$?\s*\.?\s*$")


def _math_verify_timeouts() -> dict[str, Any]:
    """math_verify's own per-expression timeouts use signal.alarm, which only the main thread may set: elsewhere
    they are off (reward.timeout still bounds the whole call)."""
    if threading.current_thread() is threading.main_thread():
        return {}
    return {"parsing_timeout": None}


@functools.lru_cache(maxsize=4096)
def _gold(answer: str, timeouts: tuple) -> list:
    """The parsed reference answer; a prompt's answer is parsed once for all its samples."""
    from math_verify import parse

    gold = parse(f"${answer}$", **dict(timeouts))
    if not gold:
        raise ValueError(f"the answer column's value {answer!r} does not parse as mathematics")
    return gold


def math_equal(completion: str, answer: Any) -> bool:
    """The completion's final answer equals ``answer`` (a number or a LaTeX / plain expression) by math-verify."""
    from math_verify import parse, verify

    timeouts = _math_verify_timeouts()
    gold = _gold(str(answer), tuple(timeouts.items()))
    predicted = parse(completion, **timeouts)
    if not predicted:
        return False
    verify_timeout = {} if not timeouts else {"timeout_seconds": None}
    return bool(verify(gold, predicted, **verify_timeout))


def math_accuracy(completions: Sequence[str], answer: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 per completion whose final answer equals its row's ``answer`` (module doc), else 0.0."""
    return [1.0 if math_equal(c, a) else 0.0 for c, a in zip(completions, answer)]


def boxed_answer(completion: str) -> str | None:
    """The content of the completion's one final ``\\boxed{...}`` (``boxed_format``), else None."""
    match = _FINAL_BOXED.search(completion)
    return match.group(1) if match and len(_BOXED.findall(completion)) == 1 else None


def boxed_format(completions: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 per completion ending in its one ``\\boxed{...}`` answer (module doc), else 0.0."""
    return [0.0 if boxed_answer(c) is None else 1.0 for c in completions]
