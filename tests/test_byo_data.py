"""Bring your own data: local snapshots shaped like three hub datasets (openai/gsm8k, ultrachat_200k,
ultrafeedback_binarized) through sources, formats and `load_splits`, with subsets, renames, streaming
and weighted mixes of sources."""

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from hub_fixtures import write_gsm8k, write_ultrachat, write_ultrafeedback

from aligner.config import DataConfig, MixSource, Recipe
from aligner.data.formats import to_prompt_records, to_records
from aligner.data.preferences import to_preference_records
from aligner.data.sources import load_rows, mix_rows, mix_shares
from aligner.errors import DataError
from aligner.trainers.setup import load_splits


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "gsm8k": str(write_gsm8k(root / "gsm8k")),
        "ultrachat": str(write_ultrachat(root / "ultrachat")),
        "ultrafeedback": str(write_ultrafeedback(root / "ultrafeedback")),
    }


def splits(**data) -> tuple[list[dict], list[dict]]:
    return load_splits(Recipe(data=DataConfig(**data)), "sft")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- the snapshots ----------------------------------------------------------------------------------------


def test_snapshots_have_the_hub_layout(hub, tmp_path):
    front = yaml.safe_load(Path(hub["gsm8k"], "README.md").read_text().split("---")[1])
    assert [c["config_name"] for c in front["configs"]] == ["main", "socratic"]
    assert front["configs"][0]["data_files"] == [
        {"split": "train", "path": "main/train-*"},
        {"split": "test", "path": "main/test-*"},
    ]
    assert pq.read_schema(Path(hub["gsm8k"], "main/train-00000-of-00001.parquet")).names == ["question", "answer"]
    schema = pq.read_schema(Path(hub["ultrafeedback"], "data/train_prefs-00000-of-00001.parquet"))
    assert schema.names == ["prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"]
    again = write_gsm8k(tmp_path / "again")
    for f in sorted(Path(hub["gsm8k"]).rglob("*.*")):
        assert (again / f.relative_to(hub["gsm8k"])).read_bytes() == f.read_bytes(), f  # deterministic


def test_gsm8k_prompts_keep_the_answer(hub):
    rows = load_rows(hub["gsm8k"], "train", subset="main", columns={"question": "prompt"})
    records = to_prompt_records(rows)
    assert len(records) == 8
    for rec in records:
        assert [m["role"] for m in rec["prompt"]] == ["user"] and rec["prompt"][0]["content"].endswith("?")
        assert re.search(r"<<[\d+*/ -]+=\d+>>", rec["answer"]) and re.search(r"\n#### \d+$", rec["answer"])
    with pytest.raises(DataError, match=r"--data.columns '\{question: prompt\}'"):
        to_prompt_records(load_rows(hub["gsm8k"], "train", subset="main"))


def test_ultrachat_conversations(hub):
    records = to_records(load_rows(hub["ultrachat"], "train_sft"))
    assert len(records) == 8 and all(r["messages"][0]["content"] == r["prompt"] for r in records)
    assert {len(r["messages"]) for r in records} > {2}  # multi-turn conversations among them
    assert all(set(r) == {"prompt", "prompt_id", "messages"} for r in records)


def test_ultrafeedback_pairs_split_off_their_prompt(hub):
    rows = load_rows(hub["ultrafeedback"], "test_prefs")
    records, counts = to_preference_records(rows)
    assert counts == {"rows": 4, "kept": 4, "identical": 0}
    for row, rec in zip(rows, records):
        assert rec["prompt"] == [{"role": "user", "content": row["prompt"]}]
        assert rec["chosen"] == [row["chosen"][1]] and rec["rejected"] == [row["rejected"][1]]


# --- load_splits: subset, columns, streaming ----------------------------------------------------------


def test_subset_and_columns_reach_the_eval_rows(hub):
    columns = {"question": "prompt"}
    train, evals = splits(
        source=hub["gsm8k"], subset="main", columns=columns, eval_source=hub["gsm8k"], eval_split="test"
    )
    assert len(train) == 8 and len(evals) == 4
    assert all(set(r) == {"prompt", "answer"} for r in train + evals)
    train, evals = splits(
        source=hub["ultrachat"], split="train_sft", eval_source=hub["ultrachat"], eval_split="test_sft"
    )
    assert (len(train), len(evals)) == (8, 4)


def test_streaming_takes_the_first_rows_and_holds_out_from_them(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}"} for i in range(50)])
    train, evals = splits(source=path, num_rows=10, eval_fraction=0.2, streaming=True)
    assert (len(train), len(evals)) == (8, 2)
    assert sorted(r["text"] for r in train + evals) == sorted(f"row {i}" for i in range(10))
    assert (train, evals) == splits(source=path, num_rows=10, eval_fraction=0.2)  # what a full read gives
    with pytest.raises(DataError, match="set data.num_rows"):
        splits(source=path, streaming=True)


# --- mixes -------------------------------------------------------------------------------------------------


@pytest.fixture
def ab(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(30)])
    return a, b


def texts(rows: list[dict], prefix: str) -> list[str]:
    return [r["text"] for r in rows if r["text"].startswith(prefix)]


def test_mix_shares_of_num_rows(ab):
    a, b = ab
    mix = [MixSource(a, weight=3), MixSource(b, weight=1)]
    train, evals = splits(mix=mix, num_rows=8, num_eval_rows=0)
    assert len(texts(train, "a")) == 6 and len(texts(train, "b")) == 2 and evals == []
    assert len(set(texts(train, "a"))) == 6  # a sample without repeats
    assert train == splits(mix=mix, num_rows=8, num_eval_rows=0)[0]  # seeded
    assert train != splits(mix=mix, num_rows=8, num_eval_rows=0, world_seed=1)[0]
    assert mix_shares([1, 1, 1], 10) == [3, 3, 3]


def test_mix_without_num_rows_is_the_largest_that_repeats_nothing(ab, capsys):
    a, b = ab
    train, evals = splits(mix=[MixSource(a), MixSource(b)], eval_fraction=0.1)
    rows = train + evals
    assert len(texts(rows, "a")) == 10 and len(texts(rows, "b")) == 10 and len(evals) == 2
    assert len({r["text"] for r in rows}) == 20 and "repeat" not in capsys.readouterr().out
    train, _ = splits(mix=[MixSource(a, weight=1), MixSource(b, weight=4)], num_eval_rows=0)
    # n = min(floor(10 * 5 / 1), floor(30 * 5 / 4)) = 37: round(37 / 5) = 7 and round(37 * 4 / 5) = 30 rows
    assert (len(texts(train, "a")), len(texts(train, "b"))) == (7, 30)


def test_mix_repeats_a_small_source_with_a_notice(ab, capsys):
    a, b = ab
    mix = [MixSource(a, weight=3), MixSource(b, weight=1)]
    train, _ = splits(mix=mix, num_rows=20, num_eval_rows=0)
    assert "data.mix[0] '" in capsys.readouterr().out
    counts = [texts(train, "a").count(f"a{i}") for i in range(10)]
    assert sum(counts) == 15 and set(counts) == {1, 2}
    train, evals = splits(mix=mix, num_rows=20, eval_fraction=0.3)
    held = {r["text"] for r in evals}
    assert held and not held & {r["text"] for r in train}  # a held-out row takes its copies along
    with pytest.raises(DataError, match="one positive weight per source"):
        mix_rows([[{"text": "x"}]], [0.0])


def test_mix_of_differently_shaped_sources(hub, tmp_path):
    sharegpt = [
        {"conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i}."}]}
        for i in range(6)
    ]
    path = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    mix = [MixSource(hub["ultrachat"], split="train_sft"), MixSource(path, weight=0.5)]
    train, evals = splits(mix=mix, num_rows=9, num_eval_rows=0)
    records = to_records(train)
    assert sum("conversations" in r for r in train) == 3 and sum("prompt_id" in r for r in train) == 6
    assert all(r["messages"][-1]["role"] == "assistant" for r in records)


def test_mix_streams_only_each_share(hub):
    mix = [MixSource(hub["gsm8k"], subset="main", columns={"question": "prompt"}), MixSource("world:rl", weight=3)]
    train, evals = splits(mix=mix, num_rows=8, streaming=True, num_eval_rows=0)
    first = load_rows(hub["gsm8k"], "train", subset="main", n=2, columns={"question": "prompt"})
    assert sorted(r["prompt"] for r in train if "kind" not in r) == sorted(r["prompt"] for r in first)
    assert len(to_prompt_records(train)) == 8
