"""What every task shares: files and fields, determinism, held-out eval, preference order, `main`, corpus."""

from __future__ import annotations

import json

import pytest

from posttrain.config import ConfigError, TaskConfig
from posttrain.errors import RewardError
from posttrain.tasks import TASKS, corpus, get_task, main

NAMES = ["arithmetic", "sentiment", "dialogue"]  # `math` has its own tests (tests/tasks/test_math_task.py)
SMALL = {"n_train": 200, "n_eval": 50, "noise": 0.2, "difficulty": 1}


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_registry():
    assert sorted(TASKS) == sorted(NAMES + ["math"])
    assert get_task("dialogue") is TASKS["dialogue"]
    with pytest.raises(ConfigError, match="unknown task `arith`"):
        get_task("arith")


@pytest.mark.parametrize("name", NAMES)
def test_files_and_fields(name, tmp_path):
    paths = get_task(name).generate(tmp_path, seed=0, **SMALL)
    expected = {"sft", "prefs", "prompts", "eval"} | ({"classify"} if name == "sentiment" else set())
    assert set(paths) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{s}.jsonl" for s in expected)  # no .tmp left
    sft, prefs, prompts, evals = (read(paths[s]) for s in ("sft", "prefs", "prompts", "eval"))
    assert len(sft) == len(prompts) == 200 and len(evals) == 50
    for r in sft:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} for r in prefs)
    assert all(set(r) == {"prompt"} for r in prompts)
    extra = {"arithmetic": {"answer"}, "sentiment": set(), "dialogue": {"kind", "answer"}}[name]
    assert all(set(r) == {"prompt"} | extra for r in evals)
    if name == "sentiment":
        rows = read(paths["classify"])
        assert len(rows) == 200 and all(set(r) == {"text", "label"} for r in rows)
        assert {r["label"] for r in rows} == {"positive", "negative"}


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_a_seed(name, tmp_path):
    task = get_task(name)
    a = task.generate(tmp_path / "a", seed=7, **SMALL)
    b = task.generate(tmp_path / "b", seed=7, **SMALL)
    c = task.generate(tmp_path / "c", seed=8, **SMALL)
    for stem in a:
        assert a[stem].read_bytes() == b[stem].read_bytes()
        assert a[stem].read_bytes() != c[stem].read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_eval_prompts_are_held_out(name):
    rows = get_task(name).rows(seed=0, n_train=1000, n_eval=200)
    held = [r["prompt"] for r in rows["eval"]]
    assert len(set(held)) == 200  # distinct
    seen = {r["prompt"] for r in rows["prompts"]} | {r["prompt"] for r in rows["prefs"]}
    seen |= {r["messages"][0]["content"] for r in rows["sft"]}
    assert not seen & set(held)


@pytest.mark.parametrize("name", NAMES)
def test_prefs_chosen_beats_rejected(name):
    """Every pair is strictly ordered by the gold verifier (ties are dropped; these generators make none)."""
    task = get_task(name)
    rows = task.rows(seed=4, n_train=300, n_eval=20)
    assert len(rows["prefs"]) == 300
    for r in rows["prefs"]:
        assert task.verify(r["prompt"], r["chosen"]) > task.verify(r["prompt"], r["rejected"])


def test_verify_batch():
    task = get_task("arithmetic")
    prompts = ["What is 1 + 1?", "What is 2 + 2?"]
    assert task.verify_batch(prompts, ["The answer is 2.", "The answer is 5."]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="2 prompts but 1 completions"):
        task.verify_batch(prompts, ["The answer is 2."])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"difficulty": 4}, "difficulty must be one of"), ({"noise": 1.5}, "noise must be in"),
     ({"n_train": 0}, "n_train >= 1"), ({"n_eval": 10_000}, "distinct questions"),
     # dialogue has 40*3*12 + 16*3*12 = 2016 distinct prompts: holding out all leaves none to train on
     ({"n_eval": 2016}, "too few for training")],
)
def test_bad_arguments(kwargs, match):
    args = {**SMALL, **kwargs}
    with pytest.raises(ConfigError, match=match):
        get_task("dialogue" if "n_eval" in kwargs else "arithmetic").rows(seed=0, **args)


def test_main_writes_and_reports(tmp_path, capsys):
    out = tmp_path / "arith"
    paths = main(TaskConfig(name="arithmetic", output_dir=str(out), n_train=30, n_eval=10, difficulty=2))
    printed = capsys.readouterr().out
    assert set(paths) == {"sft", "prefs", "prompts", "eval"}
    for stem, path in paths.items():
        assert path.parent == out and path.is_file()
        assert f"{path}  {len(read(path))} rows" in printed
    assert "eval.jsonl  10 rows" in printed and "sft.jsonl  30 rows" in printed


def test_cli_task_command(tmp_path):
    from posttrain.cli import main as cli

    assert cli(["task", "sentiment", str(tmp_path / "senti"), "n_train=20", "n_eval=5"]) == 0
    assert len(read(tmp_path / "senti" / "classify.jsonl")) == 20
    assert cli(["task", "nope", str(tmp_path / "x")]) == 2


def test_corpus_covers_every_task():
    """Per task 90 rows: 3 texts a row (prompt, completion, rejected), + 1 review for sentiment."""
    texts = corpus(seed=0, rows_per_task=90)
    assert texts == corpus(seed=0, rows_per_task=90) and texts != corpus(seed=1, rows_per_task=90)
    assert len(texts) == 90 * 3 * 3 + 90
    joined = "\n".join(texts)
    for marker in ("The answer is", "Continue the review:", "Sorry, I can't help with that.", "The capital of"):
        assert marker in joined
    assert any(t.startswith("What is") and t.count("+") + t.count("-") == 1 for t in texts)  # difficulty 2
