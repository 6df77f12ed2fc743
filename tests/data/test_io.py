"""Readers: every file type gives the same rows with 1-based indices; bad files name the file and line."""

from __future__ import annotations

import json

import pytest

from posttrain.data import load_rows
from posttrain.errors import DataError

ROWS = [{"prompt": "hi", "completion": "hello"}, {"prompt": "bye", "completion": "see you"}]


def test_jsonl_index_is_the_line_number_and_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    rows = load_rows([str(path)])
    assert [r.index for r in rows] == [1, 3]
    assert [r.data for r in rows] == ROWS
    assert rows[0].source == str(path)


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_data_key(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS))
    rows = load_rows(str(path))
    assert [(r.index, r.data) for r in rows] == [(1, ROWS[0]), (2, ROWS[1])]


def test_csv_rows_and_json_cells(tmp_path):
    path = tmp_path / "d.csv"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, friend"}]
    import csv

    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["messages", "label"])
        w.writerow([json.dumps(messages), "1"])
        w.writerow(["[not json", "0"])
    rows = load_rows([str(path)])
    assert rows[0].index == 1 and rows[0].data == {"messages": messages, "label": "1"}
    assert rows[1].index == 2 and rows[1].data == {"messages": "[not json", "label": "0"}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert [(r.index, r.data) for r in load_rows([str(path)])] == [(1, ROWS[0]), (2, ROWS[1])]


def test_saved_dataset_folder(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    for folder in ("ds", "dd"):
        assert [r.data for r in load_rows([str(tmp_path / folder)])] == ROWS


def test_several_sources_concatenate(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text(json.dumps(ROWS[0]) + "\n")
    b.write_text(json.dumps([ROWS[1]]))
    rows = load_rows([str(a), str(b)])
    assert [(r.source, r.index) for r in rows] == [(str(a), 1), (str(b), 1)]


def test_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no such file") as err:
        load_rows([path])
    assert err.value.source == path


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 3") as err:
        load_rows([str(path)])
    assert (err.value.source, err.value.row) == (str(path), 3)
    assert str(path) in str(err.value)


def test_bad_json_file_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"a": 1},\n{"a": }\n]')
    with pytest.raises(DataError, match="line 3"):
        load_rows([str(path)])


@pytest.mark.parametrize("name,text", [("e.jsonl", ""), ("e.json", "[]"), ("e.csv", "prompt,completion\n")])
def test_empty_file_is_an_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DataError, match="no rows") as err:
        load_rows([str(path)])
    assert err.value.source == str(path)


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match="JSON object") as err:
        load_rows([str(path)])
    assert err.value.row == 2
