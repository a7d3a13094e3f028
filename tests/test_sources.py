"""The data-loading entry: task world, local files of every format, and clear errors."""

import json

import pytest

from aligner.data.sources import load_rows
from aligner.errors import DataError

ROWS = [{"text": "one", "n": 1}, {"text": "two", "n": 2}]


def test_world(tmp_path):
    assert len(load_rows("world:rl", "val", n=5)) == 5
    assert "messages" in load_rows("world", n=2, world_kind="sft")[0]


def test_local_formats(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("text,n\none,1\ntwo,2\n")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        assert load_rows(str(tmp_path / name)) == ROWS, name
    assert load_rows(str(tmp_path / "a.jsonl"), n=1) == ROWS[:1]


def test_text_files_directories_and_globs(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "1.txt").write_text("first doc\n<|endoftext|>\nsecond doc\n")
    (d / "2.txt").write_text("third doc")
    assert [r["text"] for r in load_rows(str(d))] == ["first doc", "second doc", "third doc"]
    assert [r["body"] for r in load_rows(str(d / "2.txt"), text_field="body")] == ["third doc"]
    assert len(load_rows(str(d / "*.txt"))) == 3


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="file 'missing.jsonl' not found"):
        load_rows("missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty.jsonl.*has no rows"):
        load_rows(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 2 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(tmp_path / "*.xlsx"))
    with pytest.raises(DataError, match="matches no files"):
        load_rows(str(tmp_path / "*.nothing"))


def test_hub_failure_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="neither a local file nor a loadable hub dataset") as e:
        load_rows("someone/not-a-dataset")
    assert "\n" not in str(e.value)
