"""``arithmetic``: short sums with a worked chain; stands in for code generation with unit tests.

Prompt: ``What is 3 + 4 - 2?``. Completion: one step per operation, then a fixed final sentence,
``3 + 4 = 7. 7 - 2 = 5. The answer is 5.`` -- the chain lets a ~1M-parameter model compute one
operation at a time. Difficulty: 1 = three 1-digit terms, 2 = two 2-digit terms, 3 = three 2-digit
terms; operators are + and -, and every intermediate value is kept >= 0 (fewer tokens to learn).

Gold reward (like a unit test, pass or fail): 1.0 when the completion has exactly one
``The answer is N`` and N is the true value, else 0.0. A completion with several final answers counts
as malformed (0.0), so listing guesses never pays. With ``format_bonus = b > 0``, a well-formed but
wrong answer scores b instead of 0.

``noise`` is the fraction of SFT demonstrations that carry a plausible slip (off by 1, or off by 10
on 2-digit terms, as a dropped carry) in one step, propagated through the later steps, so the final
answer is wrong -- an SFT model inherits these errors and RL has something to fix.
"""

from __future__ import annotations

import random
import re
from functools import partial

from posttrain.errors import RewardError
from posttrain.tasks.base import Rows, Task, chat, noisy_indices, split_questions

# (operands, operators): operands[0] ops[0] operands[1] ops[1] ...
Question = tuple[tuple[int, ...], tuple[str, ...]]

# difficulty -> (number of terms, smallest operand, largest operand)
LEVELS = {1: (3, 0, 9), 2: (2, 10, 99), 3: (3, 10, 99)}

_QUESTION = re.compile(r"What is\s+(\d+(?:\s*[-+]\s*\d+)+)\s*\?")
# the number must end the sentence: "5." or "5" then whitespace/end, so "5.5" is not read as 5
_ANSWER = re.compile(r"The\s+answer\s+is\s+(-?\d+)(?=\.?(?:\s|$))")


def prompt_text(q: Question) -> str:
    nums, ops = q
    expr = str(nums[0]) + "".join(f" {op} {n}" for op, n in zip(ops, nums[1:]))
    return f"What is {expr}?"


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def solve(q: Question) -> int:
    nums, ops = q
    value = nums[0]
    for op, n in zip(ops, nums[1:]):
        value = _apply(value, op, n)
    return value


def running(q: Question, slip_step: int = -1, slip: int = 0) -> list[int]:
    """The result of each step; ``slip`` is added to step ``slip_step`` and carried forward."""
    nums, ops = q
    value, out = nums[0], []
    for i, (op, n) in enumerate(zip(ops, nums[1:])):
        value = _apply(value, op, n) + (slip if i == slip_step else 0)
        out.append(value)
    return out


def worked(q: Question, slip_step: int = -1, slip: int = 0) -> str:
    """The worked chain ``a op b = r.`` per step, then ``The answer is N.``"""
    nums, ops = q
    results = running(q, slip_step, slip)
    lefts = [nums[0], *results[:-1]]
    steps = [f"{a} {op} {n} = {r}." for a, op, n, r in zip(lefts, ops, nums[1:], results)]
    return " ".join(steps) + f" The answer is {results[-1]}."


def slipped(rng: random.Random, q: Question) -> str:
    """A plausible wrong chain: one step off by 1 (or by 10 when the terms have 2 digits)."""
    nums, ops = q
    step = rng.randrange(len(ops))
    size = rng.choice([1, 10]) if max(nums) >= 10 else 1
    slip = rng.choice([-size, size])
    if min(running(q, step, slip)) < 0:  # keep the slipped chain free of negatives, like the clean ones
        slip = size
    return worked(q, step, slip)


def draw_question(rng: random.Random, difficulty: int) -> tuple[str, Question]:
    """A random question whose running value never goes below 0; identity = its prompt text."""
    terms, lo, hi = LEVELS[difficulty]
    while True:
        nums = tuple(rng.randint(lo, hi) for _ in range(terms))
        ops = tuple(rng.choice("+-") for _ in range(terms - 1))
        q = (nums, ops)
        if min(running(q)) >= 0:
            return prompt_text(q), q


def parse_question(prompt: str) -> int:
    """The true value of the question in ``prompt``."""
    m = _QUESTION.search(prompt)
    if m is None:
        raise RewardError(f"arithmetic: no question of the form `What is A + B?` in prompt {prompt!r}")
    tokens = re.findall(r"\d+|[-+]", m.group(1))
    value = int(tokens[0])
    for op, n in zip(tokens[1::2], tokens[2::2]):
        value = _apply(value, op, int(n))
    return value


def verify(prompt: str, completion: str, *, format_bonus: float = 0.0) -> float:
    """1.0 for exactly one ``The answer is N`` with the right N; ``format_bonus`` if well-formed but wrong; else 0.0."""
    truth = parse_question(prompt)
    answers = _ANSWER.findall(completion)
    if len(answers) != 1:
        return 0.0
    return 1.0 if int(answers[0]) == truth else float(format_bonus)


def build(rng: random.Random, n_train: int, n_eval: int, noise: float, difficulty: int) -> Rows:
    train, held = split_questions(rng, partial(draw_question, difficulty=difficulty), n_train, n_eval, "arithmetic")
    wrong = noisy_indices(rng, n_train, noise)
    sft, prefs = [], []
    for i, q in enumerate(train):
        prompt, right = prompt_text(q), worked(q)
        sft.append(chat(prompt, slipped(rng, q) if i in wrong else right))
        prefs.append({"prompt": prompt, "chosen": right, "rejected": slipped(rng, q)})
    return {
        "sft": sft,
        "prefs": prefs,
        "prompts": [{"prompt": prompt_text(q)} for q in train],
        "eval": [{"prompt": prompt_text(q), "answer": solve(q)} for q in held],
    }


def make_task(format_bonus: float = 0.0) -> Task:
    """The arithmetic task; ``format_bonus`` > 0 rewards a well-formed wrong answer a little."""
    return Task(
        name="arithmetic",
        description="multi-step sums with a worked chain; reward 1 for the right final number",
        build=build,
        score=partial(verify, format_bonus=format_bonus),
        levels=tuple(LEVELS),
    )


TASK = make_task()
