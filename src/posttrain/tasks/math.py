"""``math``: sums and differences of fractions, graded by math-verify against the row's ``answer`` column.

Prompt: ``What is 1/2 + 1/3?``. Completion: the fractions over a common denominator, the result, reduced when it
can be, then the answer boxed: ``1/2 + 1/3 = 3/6 + 2/6 = 5/6. The answer is \\boxed{5/6}.`` Difficulty:
1 = one denominator (2..20), 2 = two different denominators (2..12). Proper fractions; results are never negative.

Unlike the other tasks, the verifier does not re-derive the truth from the question: every prompt row carries an
``answer`` column (``5/6``, ``1``) and the reward reads it, so this task runs the path a user's own dataset takes
(a reward that sees the data: rewards/function.py, ``reward.task: math`` or
``reward.function: posttrain.rewards.verifiers:math_accuracy``).

Gold reward: 1.0 when the completion has exactly one ``\\boxed{...}`` and its final answer equals ``answer`` as
mathematics (math-verify: ``10/12`` is ``5/6``), else 0.0; one boxed answer, so listing guesses never pays.
``noise``: that fraction of SFT demonstrations has the result's numerator off by one.
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from functools import partial
from math import lcm

from posttrain.rewards.verifiers import boxed_answer, math_equal
from posttrain.tasks.base import Rows, Task, chat, noisy_indices, split_questions

# (numerator, denominator, operator, numerator, denominator)
Question = tuple[int, int, str, int, int]

# difficulty -> largest denominator: 1 = one denominator (a few thousand distinct questions), 2 = two different ones
LEVELS = {1: 20, 2: 12}


def fraction_text(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def prompt_text(q: Question) -> str:
    a, b, op, c, d = q
    return f"What is {a}/{b} {op} {c}/{d}?"


def solve(q: Question) -> Fraction:
    a, b, op, c, d = q
    return Fraction(a, b) + Fraction(c, d) if op == "+" else Fraction(a, b) - Fraction(c, d)


def worked(q: Question, slip: int = 0) -> str:
    """The worked chain (common denominator, result, reduced result), then the boxed answer; ``slip`` is added to
    the result's numerator before it is reduced."""
    a, b, op, c, d = q
    m = lcm(b, d)
    x, y = a * (m // b), c * (m // d)
    steps = f"{a}/{b} {op} {c}/{d} = "
    if m != b or m != d:
        steps += f"{x}/{m} {op} {y}/{m} = "
    top = (x + y if op == "+" else x - y) + slip
    steps += f"{top}/{m}"
    result = Fraction(top, m)
    if fraction_text(result) != f"{top}/{m}":
        steps += f" = {fraction_text(result)}"
    return f"{steps}. The answer is \\boxed{{{fraction_text(result)}}}."


def draw_question(rng: random.Random, difficulty: int) -> tuple[str, Question]:
    """A random question with a result >= 0; identity = its prompt text."""
    while True:
        b = rng.randint(2, LEVELS[difficulty])
        d = b if difficulty == 1 else rng.choice([n for n in range(2, LEVELS[difficulty] + 1) if n != b])
        q = (rng.randint(1, b - 1), b, rng.choice("+-"), rng.randint(1, d - 1), d)
        if solve(q) >= 0:
            return prompt_text(q), q


_RATIONAL = re.compile(r"\s*(-?\d+)\s*(?:/\s*(\d+)\s*)?")


def _rational(text: str) -> Fraction | None:
    """``text`` as a Fraction when it is a plain integer or a/b (b > 0), else None."""
    m = _RATIONAL.fullmatch(text)
    if m is None or m.group(2) == "0":
        return None
    return Fraction(int(m.group(1)), int(m.group(2) or 1))


def verify(prompt: str, completion: str, answer: str) -> float:
    """1.0 for exactly one ``\\boxed{...}`` whose answer equals ``answer`` (module doc), else 0.0.

    A boxed plain integer or a/b against a plain answer is compared as Fractions, exactly what math-verify decides
    for them at a fraction of its cost (a task file's pairs are checked with this; tests pin the agreement);
    anything else (``\\frac{5}{6}``, ``0.5``) goes to math-verify."""
    boxed = boxed_answer(completion)
    if boxed is None:
        return 0.0
    mine, gold = _rational(boxed), _rational(str(answer))
    if mine is not None and gold is not None:
        return 1.0 if mine == gold else 0.0
    return 1.0 if math_equal(f"${boxed}$", answer) else 0.0


def build(rng: random.Random, n_train: int, n_eval: int, noise: float, difficulty: int) -> Rows:
    train, held = split_questions(rng, partial(draw_question, difficulty=difficulty), n_train, n_eval, "math")
    wrong = noisy_indices(rng, n_train, noise)
    sft, prefs = [], []
    for i, q in enumerate(train):
        prompt, answer, slip = prompt_text(q), fraction_text(solve(q)), rng.choice([-1, 1])
        sft.append(chat(prompt, worked(q, slip) if i in wrong else worked(q)))
        prefs.append({"prompt": prompt, "chosen": worked(q), "rejected": worked(q, rng.choice([-1, 1])), "answer": answer})
    return {
        "sft": sft,
        "prefs": prefs,
        "prompts": [{"prompt": prompt_text(q), "answer": fraction_text(solve(q))} for q in train],
        "eval": [{"prompt": prompt_text(q), "answer": fraction_text(solve(q))} for q in held],
    }


TASK = Task(
    name="math",
    description="sums of fractions; reward 1 when the one boxed answer equals the row's `answer` (math-verify)",
    build=build,
    score=verify,
    levels=tuple(LEVELS),
    columns=("answer",),
)
