"""Bad input, widened: each a located error (file, row, field) or a counted skip."""

from __future__ import annotations

import json

import pytest

from posttrain.data import load_examples
from posttrain.errors import DataError

U, A = {"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}
ROW = {"messages": [U, A]}


def test_empty_file_is_named(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="d.jsonl: the file has no rows"):
        load_examples([str(path)], "sft")


def test_bom_and_crlf_are_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ROW) + "\r\n").encode() * 2)
    examples, stats = load_examples([str(path)], "sft")
    assert len(examples) == 2 and stats.rows == 2
    csv = tmp_path / "d.csv"
    csv.write_bytes(b"\xef\xbb\xbfprompt,completion\r\nhi,there\r\n")
    assert load_examples([str(csv)], "sft")[0][0].messages[-1]["content"] == "there"


def test_a_json_array_in_a_jsonl_file_says_so(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([ROW, ROW]))
    with pytest.raises(DataError, match="row 1: the file holds a JSON array"):
        load_examples([str(path)], "sft")
    path.write_text("[\n" + json.dumps(ROW) + ",\n" + json.dumps(ROW) + "\n]\n")
    with pytest.raises(DataError, match="row 1: the file holds a JSON array"):
        load_examples([str(path)], "sft")


def test_mixed_kinds_of_row_are_located_or_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [ROW, {"prompt": "hi", "completion": "yo"}, {"text": "plain"}, ROW]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 3: this row is `text`") as err:
        load_examples([str(path)], "sft")
    assert err.value.row == 3
    examples, stats = load_examples([str(path)], "sft", skip_invalid=True)
    assert len(examples) == 3 and stats.skipped["mixed formats"] == 1  # messages + prompt_completion may mix


def test_chosen_equal_to_rejected_is_located_or_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "hi", "chosen": "a", "rejected": "b"}, {"prompt": "hi", "chosen": "a", "rejected": "a"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="row 2, field `rejected`: chosen and rejected are the same"):
        load_examples([str(path)], "preference")
    examples, stats = load_examples([str(path)], "preference", skip_invalid=True)
    assert len(examples) == 1 and stats.skipped["chosen equals rejected"] == 1
