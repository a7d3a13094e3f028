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
    with pytest.raises(DataError, match=r"'org/name' has no split 'val' \(splits: train, test\)$"):
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


# --- renames, dataset snapshots, streaming -----------------------------------------------------------------

from hub_fixtures import write_gsm8k, write_ultrachat  # noqa: E402


def test_columns_are_renamed_after_loading(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": str(i), "prompt": "old"}) + "\n" for i in range(3))
    )
    rows = load_rows(str(path), columns={"question": "prompt"})
    assert rows[0] == {"prompt": "q0", "answer": "0"}  # a column named like a target gives way
    assert load_rows(str(path), n=1, columns={"question": "answer", "answer": "question"})[0] == {
        "answer": "q0",
        "question": "0",
        "prompt": "old",
    }
    assert load_rows("world:rl", n=1, columns={"answer": "target"})[0]["target"]
    with pytest.raises(DataError) as e:
        load_rows(str(path), columns={"query": "prompt"})
    assert str(e.value) == (
        f"data source '{path}' has no column 'query' to rename to 'prompt' (columns: answer, prompt, question); "
        "fix data.columns"
    )


def test_dataset_snapshot_has_configs_and_splits(tmp_path):
    gsm8k = str(write_gsm8k(tmp_path / "gsm8k"))
    main = load_rows(gsm8k, "train", subset="main")
    socratic = load_rows(gsm8k, "train", subset="socratic")
    assert len(main) == 8 and len(load_rows(gsm8k, "test", subset="main", n=3)) == 3
    assert [r["question"] for r in main] == [r["question"] for r in socratic]  # the same problems
    assert " ** " in socratic[0]["answer"] and " ** " not in main[0]["answer"]
    with pytest.raises(DataError) as e:
        load_rows(gsm8k, "train", subset="mian")
    assert str(e.value) == f"data source '{gsm8k}' has no config 'mian' (configs: main, socratic)"
    with pytest.raises(DataError, match=r"has several configs \(main, socratic\); choose one with data.subset$"):
        load_rows(gsm8k, "train")
    with pytest.raises(DataError, match=r"has no split 'val' in config 'main' \(splits: train, test\)$"):
        load_rows(gsm8k, "val", subset="main")
    ultrachat = str(write_ultrachat(tmp_path / "ultrachat"))
    assert len(load_rows(ultrachat, "test_sft")) == 4
    with pytest.raises(DataError, match=r"no split 'train' \(splits: train_sft, test_sft, train_gen, test_gen\)"):
        load_rows(ultrachat)
    # a directory whose README.md has no dataset front matter is still a directory of files
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "README.md").write_text("---\ntitle: notes\n---\nSome notes.\n")
    (tmp_path / "plain" / "a.jsonl").write_text(json.dumps({"text": "row"}) + "\n")
    assert sources._dataset_repo(str(tmp_path / "plain")) is None
    assert [r["text"] for r in load_rows(str(tmp_path / "plain"))][-1] == "row"


def test_streaming_reads_the_first_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    assert load_rows(str(path), n=3, streaming=True) == load_rows(str(path), n=3)
    gsm8k = str(write_gsm8k(tmp_path / "gsm8k"))
    assert load_rows(gsm8k, "test", subset="main", n=2, streaming=True) == load_rows(gsm8k, "test", subset="main")[:2]
    with pytest.raises(DataError, match=r"has no split 'val'.*\(splits: train, test\)"):
        load_rows(gsm8k, "val", subset="main", n=2, streaming=True)
    with pytest.raises(DataError, match="streaming reads only the first rows; set data.num_rows"):
        load_rows(str(path), streaming=True)


def test_hub_names_get_subset_and_streaming(monkeypatch):
    import datasets

    seen = []

    def load_dataset(*args, split, streaming=False):
        seen.append((args, split, streaming))
        ds = datasets.Dataset.from_list(ROWS)
        return ds.to_iterable_dataset() if streaming else ds

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_rows("openai/gsm8k", "train", subset="main", n=1, streaming=True) == ROWS[:1]
    assert load_rows("openai/gsm8k", "test", subset="socratic") == ROWS
    assert seen == [(("openai/gsm8k", "main"), "train", True), (("openai/gsm8k", "socratic"), "test", False)]
