"""The data-loading entry: task world, local files of every format, and one-line errors that name the file."""

import json

import pytest

from aligner.data import sources
from aligner.data.sources import load_rows
from aligner.errors import DataError

ROWS = [{"text": "one", "n": 1}, {"text": "two", "n": 2}]


def test_world():
    assert len(load_rows("world:rl", "val", n=5)) == 5
    assert "messages" in load_rows("world", n=2, world_kind="sft")[0]
    assert "chosen" in load_rows("world:preference", n=2, world_kind="sft")[0]  # the suffix wins
    assert {r["level"] for r in load_rows("world:rl", n=20, levels=[1])} == {1}
    assert load_rows("world:sft", n=3, seed=1) != load_rows("world:sft", n=3, seed=2)
    with pytest.raises(DataError, match="split 'dev'"):
        load_rows("world:sft", "dev")
    with pytest.raises(DataError, match="unknown task-world kind 'chat'"):
        load_rows("world:chat")


def test_local_formats(tmp_path):
    import datasets

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "\n")
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("text,n\none,1\ntwo,2\n")
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "a.parquet"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        assert load_rows(str(tmp_path / name)) == ROWS, name
    assert load_rows(str(tmp_path / "a.jsonl"), n=1) == ROWS[:1]
    assert load_rows(str(tmp_path / "a.jsonl"), "val") == ROWS  # a local file is one split


def test_text_files_directories_and_globs(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / ".cache").mkdir()
    (d / "1.txt").write_text("first doc\n<|endoftext|>\nsecond doc\nstill second\n<|endoftext|>  \n\n")
    (d / "2.txt").write_text("third doc, with <|endoftext|> inside a line")
    (d / "sub" / "3.jsonl").write_text(json.dumps({"text": "fourth"}) + "\n")
    (d / ".cache" / "x.jsonl").write_text("not json\n")
    (d / "notes.bin").write_bytes(b"\x00\x01")
    texts = [r["text"] for r in load_rows(str(d))]
    assert texts == ["first doc", "second doc\nstill second", "third doc, with <|endoftext|> inside a line", "fourth"]
    assert [r["body"] for r in load_rows(str(d / "2.txt"), text_field="body")] == [texts[2]]
    assert len(load_rows(str(d / "*.txt"))) == 3
    assert len(load_rows(str(d / "**" / "*.jsonl"))) == 1
    assert len(load_rows(str(d), n=2)) == 2


def test_missing_empty_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(DataError, match="file 'missing.jsonl' not found"):
        load_rows("missing.jsonl")
    with pytest.raises(DataError, match="file 'data/train/part-0' not found"):
        load_rows("data/train/part-0")  # not shaped like a hub name: a path
    for name in ("empty.jsonl", "empty.txt", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(DataError, match=f"{name}' .*has no rows") as e:
            load_rows(str(tmp_path / name))
        assert "\n" not in str(e.value)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": broken}\n')
    with pytest.raises(DataError, match=r"bad.jsonl' line 3 is not valid JSON"):
        load_rows(str(tmp_path / "bad.jsonl"))
    (tmp_path / "list.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl' line 2 is not a JSON object"):
        load_rows(str(tmp_path / "list.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"bad.parquet' could not be read as parquet") as e:
        load_rows(str(tmp_path / "bad.parquet"))
    assert "\n" not in str(e.value)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt' is not UTF-8"):
        load_rows(str(tmp_path / "latin1.txt"))
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        load_rows(str(tmp_path / "*.xlsx"))
    with pytest.raises(DataError, match="matches no files"):
        load_rows(str(tmp_path / "*.nothing"))
    (tmp_path / "nothing_here").mkdir()
    with pytest.raises(DataError, match="directory with no"):
        load_rows(str(tmp_path / "nothing_here"))


@pytest.fixture
def offline(monkeypatch):
    """Fail hub look-ups at once instead of retrying a network that is not there."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_failure_is_one_line(offline):
    with pytest.raises(DataError, match="'someone/not-a-dataset' is neither a local file nor a loadable hub") as e:
        load_rows("someone/not-a-dataset")
    assert "\n" not in str(e.value)


def test_hub_unknown_split(monkeypatch):
    import datasets

    def load_dataset(name, split):
        raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"'org/name' has no split 'val': Unknown split"):
        load_rows("org/name", "val")


def test_hub_rows_become_dicts(monkeypatch):
    import datasets

    seen = {}

    def load_dataset(name, split):
        seen.update(name=name, split=split)
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_rows("org/name", "test", n=1) == ROWS[:1]
    assert seen == {"name": "org/name", "split": "test"}
    assert sources._local_files("org/name") is None
