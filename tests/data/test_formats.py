"""Every row format normalises to the same examples; every kind of bad row names file, row and field."""

from __future__ import annotations

import json

import pytest

from posttrain.data import (
    ChatExample,
    ClassificationExample,
    PreferenceExample,
    PromptExample,
    RankingExample,
    TextExample,
    detect_format,
    label_maps,
    load_examples,
    normalize,
)
from posttrain.errors import DataError

U = {"role": "user", "content": "What is 2 + 3 ?"}
A = {"role": "assistant", "content": "5"}
S = {"role": "system", "content": "Be brief"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


EQUIVALENT = {
    "messages": {"messages": [U, A]},
    "prompt_completion": {"prompt": U["content"], "completion": A["content"]},
    "prompt_completion_lists": {"prompt": [U], "completion": [A]},
    "alpaca": {"instruction": U["content"], "input": "", "output": A["content"]},
    "sharegpt": {"conversations": [{"from": "human", "value": U["content"]}, {"from": "gpt", "value": "5"}]},
    "preference": {"prompt": U["content"], "chosen": "5", "rejected": "4"},
}


@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_every_chat_format_gives_the_same_example(name):
    assert normalize(EQUIVALENT[name], "sft") == ChatExample([U, A])


def test_system_turn_in_each_format():
    expected = ChatExample([S, U, A])
    assert normalize({"messages": [S, U, A]}, "sft") == expected
    assert normalize({"conversations": [{"from": "system", "value": "Be brief"},
                                        {"from": "human", "value": U["content"]},
                                        {"from": "gpt", "value": "5"}]}, "sft") == expected
    assert normalize({"system": "Be brief", "instruction": U["content"], "output": "5"}, "sft") == expected
    assert normalize({"prompt": [S, U], "completion": "5"}, "sft") == expected


def test_alpaca_input_joins_instruction():
    ex = normalize({"instruction": "Answer the question", "input": "What is 2 + 3 ?", "output": "5"}, "sft")
    assert ex.messages[0] == {"role": "user", "content": "Answer the question\n\nWhat is 2 + 3 ?"}


def test_detect_format():
    assert {name: detect_format(row) for name, row in EQUIVALENT.items()} == {
        "messages": "messages", "prompt_completion": "prompt_completion", "prompt_completion_lists": "prompt_completion",
        "alpaca": "alpaca", "sharegpt": "sharegpt", "preference": "preference"}
    assert detect_format({"text": "a movie"}) == "text"
    assert detect_format({"text": "a movie", "label": "good"}) == "classification"
    assert detect_format({"prompt": "hi"}) == "prompt"
    assert detect_format({"text": "a movie", "label": "good"}, "sft") == "text"


def test_text_and_classification():
    assert normalize({"text": "a movie"}, "sft") == TextExample("a movie")
    assert normalize({"text": "a movie", "label": 1}, "classification") == ClassificationExample("a movie", 1)


def test_implicit_prompt_is_the_shared_message_prefix():
    """Multi-turn: the shared prefix includes an earlier assistant turn; only the last replies differ."""
    turn2 = {"role": "user", "content": "bye"}
    row = {"chosen": [S, U, A, turn2, {"role": "assistant", "content": "see you"}],
           "rejected": [S, U, A, turn2, {"role": "assistant", "content": "no"}], "margin": 0.5}
    ex = normalize(row, "preference")
    assert ex == PreferenceExample([S, U, A, turn2], [{"role": "assistant", "content": "see you"}],
                                   [{"role": "assistant", "content": "no"}], 0.5)


def test_explicit_prompt_strips_a_repeated_prompt_from_completions():
    row = {"prompt": [U], "chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "4"}]}
    ex = normalize(row, "preference")
    assert ex.prompt == [U] and ex.chosen == [A] and ex.rejected == [{"role": "assistant", "content": "4"}]
    assert ex.margin is None


def test_rankings():
    three = normalize({"prompt": "hi", "ranking": ["great", "good", "bad"]}, "preference")
    assert isinstance(three, RankingExample)
    assert [r[0]["content"] for r in three.responses] == ["great", "good", "bad"]
    by_index = normalize({"prompt": "hi", "responses": ["bad", "great", "good"], "ranking": [1, 2, 0]}, "preference")
    assert by_index == three
    two = normalize({"prompt": "hi", "responses": ["good", "bad"]}, "preference")
    assert two == PreferenceExample([{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "good"}],
                                    [{"role": "assistant", "content": "bad"}])


def test_prompt_kind_keeps_other_columns_as_meta():
    assert normalize({"prompt": "hi", "answer": 5}, "prompt") == PromptExample(
        [{"role": "user", "content": "hi"}], {"answer": 5})
    assert normalize({"messages": [S, U]}, "prompt") == PromptExample([S, U], {})
    # A demonstration used as a prompt loses its final reply.
    assert normalize({"messages": [U, A]}, "prompt").prompt == [U]
    assert normalize({"prompt": "hi", "chosen": "a", "rejected": "b"}, "prompt").meta == {"chosen": "a", "rejected": "b"}


def test_label_maps():
    names = [ClassificationExample("x", v) for v in ("neg", "pos", "neg")]
    assert label_maps(names) == ({"neg": 0, "pos": 1}, {0: "neg", 1: "pos"})
    ids = [ClassificationExample("x", v) for v in ("2", "10", "0")]  # csv gives digit strings: numeric order
    assert label_maps(ids)[0] == {"2": 2, "10": 10, "0": 0}


BAD = [
    ("missing field", {"prompt": "hi"}, "sft", "completion"),
    ("missing field", {"messages": [U, {"role": "assistant"}]}, "sft", "messages[1].content"),
    ("wrong type", {"prompt": "hi", "completion": 5}, "sft", "completion"),
    ("wrong type", {"messages": "hi"}, "sft", "messages"),
    ("empty completion", {"prompt": "hi", "completion": "  "}, "sft", "completion"),
    ("empty completion", {"messages": [U]}, "sft", "messages"),
    ("empty completion", {"instruction": "hi", "output": ""}, "sft", "output"),
    ("unknown role", {"messages": [U, {"role": "robot", "content": "5"}]}, "sft", "messages[1].role"),
    ("unknown role", {"conversations": [{"from": "alien", "value": "x"}]}, "sft", "conversations[0].from"),
    ("missing field", {"text": "a movie"}, "classification", "label"),
    ("wrong type", {"text": "a movie", "label": [1]}, "classification", "label"),
    ("missing field", {"chosen": "5", "rejected": "4"}, "preference", "prompt"),
    ("empty completion", {"chosen": [U, A], "rejected": [U]}, "preference", "rejected"),
    ("wrong type", {"prompt": "hi", "chosen": "a", "rejected": "b", "margin": "big"}, "preference", "margin"),
    ("unknown label", {"text": "a movie", "label": "meh"}, "classification", "label"),
]


@pytest.mark.parametrize("reason,bad,kind,field", BAD, ids=[f"{b[0]}:{b[3]}" for b in BAD])
def test_bad_row_names_file_row_and_field(tmp_path, reason, bad, kind, field):
    good = {"sft": {"messages": [U, A]}, "classification": {"text": "a movie", "label": "good"},
            "preference": {"prompt": "hi", "chosen": "a", "rejected": "b"}}[kind]
    path = write_jsonl(tmp_path / "d.jsonl", [good, good, bad])
    with pytest.raises(DataError) as err:
        load_examples([path], kind, labels=["good", "bad"] if kind == "classification" else None)
    assert (err.value.source, err.value.row, err.value.field) == (path, 3, field)
    assert path in str(err.value) and "row 3" in str(err.value) and field in str(err.value)

    examples, stats = load_examples([path], kind, skip_invalid=True,
                                    labels=["good", "bad"] if kind == "classification" else None)
    assert len(examples) == 2
    assert (stats.rows, stats.examples, dict(stats.skipped)) == (3, 2, {reason: 1})


def test_skip_invalid_counts_by_reason(tmp_path):
    rows = [{"messages": [U, A]}, {"prompt": "hi"}, {"prompt": "hi", "completion": ""}, {"messages": [U]},
            {"prompt": "hi", "completion": "hello"}]
    examples, stats = load_examples([write_jsonl(tmp_path / "d.jsonl", rows)], "sft", skip_invalid=True)
    assert len(examples) == 2
    assert stats.as_dict() == {"rows": 5, "examples": 2, "skipped": 3, "truncated": 0, "dropped": 0,
                               "skipped/empty completion": 2, "skipped/missing field": 1}


def test_format_that_cannot_give_the_kind_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U, A]}])
    with pytest.raises(DataError, match="cannot give classification"):
        load_examples([path], "classification", fmt="messages")


def test_named_format_reports_its_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U, A]}])
    with pytest.raises(DataError) as err:
        load_examples([path], "sft", fmt="alpaca")
    assert (err.value.row, err.value.field) == (1, "instruction")
