"""The `math` task (rows carry an `answer` column) and the built-in math-verify / format rewards."""

from __future__ import annotations

import json

import pytest

from posttrain.errors import RewardError
from posttrain.rewards import build_reward
from posttrain.config import RewardConfig
from posttrain.rewards.verifiers import boxed_format, math_accuracy, math_equal
from posttrain.tasks import get_task
from posttrain.tasks.math import solve, worked


def test_math_accuracy_is_math_equivalence_by_math_verify():
    """10/12 = 5/6, \\frac{5}{6} = 5/6, 0.5 = 1/2 (math-verify); 4/6 != 5/6; no answer at all scores 0."""
    completions = ["so \\boxed{10/12}.", "$\\boxed{\\frac{5}{6}}$", "It is 0.5", "\\boxed{4/6}", "no idea"]
    answers = ["5/6", "5/6", "1/2", "5/6", "1"]
    assert math_accuracy(completions, answers) == [1.0, 1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="does not parse"):
        math_equal("\\boxed{1}", "")


def test_boxed_format_pays_for_one_final_boxed_answer():
    completions = ["x = 3. The answer is \\boxed{3}.", "\\boxed{\\frac{1}{2}}", "\\boxed{3} and \\boxed{4}",
                   "\\boxed{3} then more text", "3", "\\boxed{}"]
    assert boxed_format(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_worked_chain_and_answer_column():
    """1/2 + 1/3 over 6: 3/6 + 2/6 = 5/6; 3/4 - 1/4 = 2/4 = 1/2 (reduced); a slip of +1 on 1/3 + 2/3 gives 4/3."""
    assert worked((1, 2, "+", 1, 3)) == "1/2 + 1/3 = 3/6 + 2/6 = 5/6. The answer is \\boxed{5/6}."
    assert worked((3, 4, "-", 1, 4)) == "3/4 - 1/4 = 2/4 = 1/2. The answer is \\boxed{1/2}."
    assert worked((1, 3, "+", 2, 3), slip=1) == "1/3 + 2/3 = 4/3. The answer is \\boxed{4/3}."
    assert str(solve((1, 3, "+", 2, 3))) == "1"


@pytest.mark.parametrize("difficulty", [1, 2])
def test_files_carry_the_answer_column_and_pairs_are_ordered(tmp_path, difficulty):
    task = get_task("math")
    paths = task.generate(tmp_path, seed=0, n_train=60, n_eval=20, noise=0.2, difficulty=difficulty)
    rows = {stem: [json.loads(line) for line in path.read_text().splitlines()] for stem, path in paths.items()}
    assert all(set(r) == {"prompt", "answer"} for r in rows["prompts"] + rows["eval"])
    assert all(set(r) == {"prompt", "chosen", "rejected", "answer"} for r in rows["prefs"]) and len(rows["prefs"]) == 60
    for r in rows["prefs"]:
        assert task.verify(r["prompt"], r["chosen"], answer=r["answer"]) == 1.0
        assert task.verify(r["prompt"], r["rejected"], answer=r["answer"]) == 0.0
    # the right worked chain of every held-out prompt scores 1 through the reward path (the answer column)
    reward = build_reward(RewardConfig(task="math"))
    held = rows["eval"]
    right = [r["prompt"].removeprefix("What is ") for r in held]  # "a/b op c/d?"
    completions = [worked((int(q[0]), int(q[1]), q[2], int(q[3]), int(q[4])))
                   for q in (s.rstrip("?").replace("/", " ").split() for s in right)]
    scores = reward([r["prompt"] for r in held], completions, columns={"answer": [r["answer"] for r in held]})
    assert scores.tolist() == [1.0] * len(held)


def test_fast_rational_path_agrees_with_math_verify():
    """The task verifier compares plain a/b answers as Fractions; math-verify must decide the same."""
    task = get_task("math")
    cases = [("3/6", "1/2"), ("2/4", "1/3"), ("4", "4"), ("8/2", "4"), ("0", "0/5"), ("-1/3", "1/3"), ("7/7", "1")]
    for boxed, answer in cases:
        assert task.verify("q", f"\\boxed{{{boxed}}}.", answer=answer) == float(math_equal(f"${boxed}$", answer))


def test_the_verifier_needs_the_answer_column():
    task = get_task("math")
    with pytest.raises(RewardError, match=r"reads the prompt rows' `answer` column, which row 0 .* lacks"):
        task.verify_batch(["What is 1/2 + 1/2?"], ["\\boxed{1}"])
    with pytest.raises(RewardError, match="which row 1"):
        task.verify_batch(["a", "b"], ["\\boxed{1}", "\\boxed{1}"], {"answer": ["1", None]})
    assert task.verify_batch(["a"], ["\\boxed{1}"], {"answer": ["1"]}) == [1.0]
