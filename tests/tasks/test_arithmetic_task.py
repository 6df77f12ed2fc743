"""The arithmetic task: verifier on hand-written cases, worked chains, difficulty levels, noise."""

from __future__ import annotations

import random
import re

import pytest

from posttrain.errors import RewardError
from posttrain.tasks import get_task
from posttrain.tasks.arithmetic import make_task, parse_question, slipped, worked

Q = "What is 3 + 4 - 2?"
task = get_task("arithmetic")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 + 4 = 7. 7 - 2 = 5. The answer is 5.", 1.0),  # right
        ("The answer is 5", 1.0),  # no chain, no final period: only the final number counts
        ("3 + 4 = 8. 8 - 2 = 5. The answer is 5.", 1.0),  # a wrong step does not matter, like a unit test
        ("  3 + 4 = 7.\n7 - 2 = 5.   The  answer is\t5 .  \n", 1.0),  # extra whitespace
        ("3 + 4 = 7. 7 - 2 = 6. The answer is 6.", 0.0),  # wrong
        ("The answer is 4. The answer is 5.", 0.0),  # two final answers: malformed, guessing never pays
        ("The answer is five.", 0.0),  # malformed
        ("The answer is 5.5", 0.0),  # not an integer final answer
        ("5", 0.0),  # no final sentence
        ("", 0.0),  # empty
        ("   \n", 0.0),
    ],
)
def test_verify_hand_written(completion, expected):
    assert task.verify(Q, completion) == expected


def test_verify_reads_the_question_from_any_user_text():
    """47 + 38 = 85; 3 - 5 = -2 (a negative answer parses); 12 + 30 - 7 = 35 inside extra text."""
    assert task.verify("What is 47 + 38?", "The answer is 85.") == 1.0
    assert task.verify("What is 3 - 5?", "The answer is -2.") == 1.0
    assert task.verify("Q: What is 12 + 30 - 7 ?\nA:", "The answer is 35.") == 1.0
    assert parse_question("What is 99 - 10 - 89?") == 0
    with pytest.raises(RewardError, match="no question"):
        task.verify("Tell me a joke.", "The answer is 5.")


def test_format_bonus():
    """b = 0.1: right 1.0, well-formed wrong 0.1, malformed 0.0; the default task has no bonus."""
    bonus = make_task(format_bonus=0.1)
    assert bonus.verify(Q, "The answer is 5.") == 1.0
    assert bonus.verify(Q, "The answer is 6.") == pytest.approx(0.1)
    assert bonus.verify(Q, "six") == 0.0
    assert task.verify(Q, "The answer is 6.") == 0.0


def test_worked_chain_by_hand():
    """3 + 4 = 7, 7 - 2 = 5; a slip of +1 at step 0 gives 8, then 8 - 2 = 6."""
    q = ((3, 4, 2), ("+", "-"))
    assert worked(q) == "3 + 4 = 7. 7 - 2 = 5. The answer is 5."
    assert worked(q, 0, 1) == "3 + 4 = 8. 8 - 2 = 6. The answer is 6."
    assert worked(((47, 38), ("+",))) == "47 + 38 = 85. The answer is 85."


def test_slips_are_plausible():
    """A slipped chain is off by 1 (1-digit) or by 1 or 10 (2-digit), never negative, always wrong."""
    rng = random.Random(0)
    for q, sizes in [(((3, 4, 2), ("+", "-")), {1}), (((47, 38, 20), ("+", "-")), {1, 10})]:
        truth = 5 if sizes == {1} else 65
        for _ in range(50):
            text = slipped(rng, q)
            final = int(re.search(r"The answer is (-?\d+)", text).group(1))
            assert abs(final - truth) in sizes
            assert all(int(n) >= 0 for n in re.findall(r"-?\d+", text))


@pytest.mark.parametrize("difficulty, terms, lo, hi", [(1, 3, 0, 9), (2, 2, 10, 99), (3, 3, 10, 99)])
def test_difficulty_levels(difficulty, terms, lo, hi):
    rows = task.rows(seed=1, n_train=100, n_eval=20, noise=0.0, difficulty=difficulty)
    for r in rows["eval"] + rows["prompts"]:
        nums = [int(n) for n in re.findall(r"\d+", r["prompt"])]
        assert len(nums) == terms and all(lo <= n <= hi for n in nums)
    for r in rows["eval"]:
        assert r["answer"] == parse_question(r["prompt"]) >= 0


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.5])
def test_noise_fraction_in_sft(noise):
    """round(noise * 400) demonstrations are wrong (verify 0) and all are well-formed."""
    rows = task.rows(seed=3, n_train=400, n_eval=50, noise=noise, difficulty=2)
    scores = [task.verify(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows["sft"]]
    assert scores.count(0.0) == round(noise * 400)
    assert all(r["messages"][1]["content"].count("The answer is") == 1 for r in rows["sft"])
