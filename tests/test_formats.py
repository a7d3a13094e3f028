"""Dataset formats -> canonical message records, detection, and one-line errors naming the row."""

import pytest

from aligner.data.formats import detect_format, to_records
from aligner.data.world import world_rows
from aligner.errors import DataError

U, A = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}


def test_each_format_becomes_messages():
    cases = [
        ({"messages": [U, A], "answer": "7"}, "messages", [U, A]),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}, "sharegpt", [U, A]),
        ({"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", [U, A]),
        ({"prompt": "Hi", "completion": "Hello"}, "prompt_completion", [U, A]),
        ({"prompt": [U], "completion": [A]}, "prompt_completion", [U, A]),
    ]
    for row, fmt, messages in cases:
        assert detect_format(row) == fmt
        (record,) = to_records([row])
        assert record["messages"] == messages, fmt
    alpaca = to_records([{"instruction": "Add", "input": "2 and 3", "output": "5"}])[0]["messages"]
    assert alpaca[0]["content"] == "Add\n\n2 and 3"
    assert to_records([{"messages": [U, A], "answer": "7"}])[0]["answer"] == "7"  # other columns kept
    assert to_records([{"text": "plain"}]) == [{"text": "plain"}]


def test_world_sft_rows_are_already_canonical():
    rows = world_rows("sft", "train", n=5)
    assert [r["messages"] for r in to_records(rows)] == [r["messages"] for r in rows]


def test_unknown_format_names_columns_and_candidates():
    with pytest.raises(DataError) as e:
        to_records([{"question": "q", "reply": "r"}], source="data.source 'x.jsonl'")
    msg = str(e.value)
    assert "x.jsonl" in msg and "question, reply" in msg and "alpaca (instruction, output)" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "row, match",
    [
        ({"messages": []}, "row 1: empty conversation"),
        ({"messages": [U]}, "row 1: conversation has no assistant turn"),
        ({"messages": [{"role": "tool", "content": "x"}, A]}, "role 'tool'"),
        ({"messages": [{"role": "user"}, A]}, "needs 'role' and 'content'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "from 'robot'"),
        ({"prompt": 3, "completion": "x"}, "'prompt' must be a string or a list"),
    ],
)
def test_bad_rows_name_the_row(row, match):
    with pytest.raises(DataError, match=match):
        to_records([row])


def test_explicit_format_with_missing_columns():
    with pytest.raises(DataError, match="format alpaca needs column"):
        to_records([{"prompt": "a", "completion": "b"}], fmt="alpaca")
    with pytest.raises(DataError, match="not one of"):
        to_records([{"text": "a"}], fmt="yaml")
