"""The sentiment task: the rule-based gold score, the grammar, noise, classify labels."""

from __future__ import annotations

import pytest

from posttrain.tasks import get_task
from posttrain.tasks.sentiment import INSTRUCTION, counts

task = get_task("sentiment")
P = f"{INSTRUCTION} the plot was dull ."


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("the acting was superb .", 1.0),  # p=1, n=0
        ("the film was great and the music was lovely .", 1.0),  # p=2, n=0
        ("the ending was dull .", 0.0),  # p=0, n=1
        ("the music was loud .", 0.5),  # no sentiment word
        ("the cast was great but the script was boring .", 0.5),  # p=1, n=1
        ("great but boring and dull", 1 / 3),  # p=1, n=2
        ("the film was not great .", 0.0),  # "not" flips great: p=0, n=1
        ("never boring", 1.0),  # flipped: p=1, n=0
        ("  The FILM was   GREAT!\n", 1.0),  # case and extra whitespace
        ("great great great great", 1.0),  # repetition earns no more than one positive word
        ("", 0.0),  # empty
        ("  \n ", 0.0),
    ],
)
def test_verify_hand_written(completion, expected):
    assert task.verify(P, completion) == pytest.approx(expected)


def test_counts():
    assert counts("the plot was dull but the acting was superb and not bad .") == (2, 1)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_continuations_have_difficulty_plus_one_clauses(difficulty):
    rows = task.rows(seed=0, n_train=50, n_eval=10, noise=0.2, difficulty=difficulty)
    for r in rows["sft"]:
        text = r["messages"][1]["content"]
        assert text.startswith("the ") and text.endswith(" .")
        assert text.count("the ") == difficulty + 1


@pytest.mark.parametrize("noise", [0.0, 0.25])
def test_noise_fraction_in_sft(noise):
    """round(noise * 400) continuations are negative (score 0); every other one is mixed or neutral (0.5)."""
    rows = task.rows(seed=5, n_train=400, n_eval=50, noise=noise, difficulty=1)
    scores = [task.verify(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows["sft"]]
    assert scores.count(0.0) == round(noise * 400)
    assert scores.count(0.5) == 400 - round(noise * 400)


def test_classify_labels_follow_the_words():
    rows = task.rows(seed=0, n_train=300, n_eval=10, noise=0.2, difficulty=1)["classify"]
    labels = [r["label"] for r in rows]
    assert 100 < labels.count("positive") < 200  # balanced by construction (p = 0.5, n = 300)
    for r in rows:
        pos, neg = counts(r["text"])
        assert r["label"] == ("positive" if pos > neg else "negative") and pos != neg
