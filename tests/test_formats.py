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
        ({"messages": [{"role": "robot", "content": "x"}, A]}, "role 'robot' .*tool"),
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


# --- preference data ------------------------------------------------------------------------------

from aligner.data.preferences import parse_hh, to_preference_records  # noqa: E402

PU = {"role": "user", "content": "Which is larger: 9.9 or 9.11?"}
PGOOD = {"role": "assistant", "content": "9.90 > 9.11\nFinal answer: 9.9"}
PBAD = {"role": "assistant", "content": "Final answer: 9.11"}


def test_preference_strings_and_message_lists():
    recs, report = to_preference_records(
        [
            {"prompt": PU["content"], "chosen": PGOOD["content"], "rejected": PBAD["content"], "margin": 2},
            {"prompt": [PU], "chosen": [PGOOD], "rejected": [PBAD]},
        ]
    )
    assert recs[0] == {"prompt": [PU], "chosen": [PGOOD], "rejected": [PBAD], "margin": 2.0}
    assert recs[1] == {"prompt": [PU], "chosen": [PGOOD], "rejected": [PBAD]}
    assert report == {"rows": 2, "kept": 2, "identical": 0}


def test_whole_conversations_share_their_prompt():
    system = {"role": "system", "content": "Be brief."}
    rows = [{"prompt": PU["content"], "chosen": [system, PU, PGOOD], "rejected": [system, PU, PBAD]}]
    (rec,), _ = to_preference_records(rows)
    assert rec == {"prompt": [system, PU], "chosen": [PGOOD], "rejected": [PBAD]}
    (rec,), _ = to_preference_records([{"chosen": [PU, PGOOD], "rejected": [PU, PBAD]}])  # no prompt column
    assert rec["prompt"] == [PU]


def test_hh_strings():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 4"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: 2+2?\n\nAssistant: 5"
    (rec,), _ = to_preference_records([{"chosen": chosen, "rejected": rejected}])
    assert [m["role"] for m in rec["prompt"]] == ["user", "assistant", "user"]
    assert rec["chosen"] == [{"role": "assistant", "content": "4"}] and rec["rejected"][0]["content"] == "5"
    assert parse_hh("Human: q\n\nAssistant: a", "x") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]


def test_unpaired_rows_for_kto():
    recs, _ = to_preference_records(
        [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}]
    )
    assert recs[0] == {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
        "label": True,
    }
    assert recs[1]["label"] is False


def test_bad_preference_rows():
    ok = {"prompt": "q", "chosen": "a", "rejected": "b"}
    with pytest.raises(DataError, match="row 2: missing rejected"):
        to_preference_records([ok, {"prompt": "q", "chosen": "a"}], fmt="preference", source="p.jsonl")
    with pytest.raises(DataError, match="fit no preference format"):
        to_preference_records([{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="row 1: empty prompt"):
        to_preference_records([{"prompt": "  ", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="prefixes do not match"):
        to_preference_records([{"chosen": [PU, PGOOD], "rejected": [{"role": "user", "content": "other"}, PBAD]}])
    recs, report = to_preference_records([ok, {"prompt": "q", "chosen": "same", "rejected": "same"}])
    assert report["identical"] == 1 and len(recs) == 1
    with pytest.raises(DataError, match="identical chosen and rejected"):
        to_preference_records([{"prompt": "q", "chosen": "same", "rejected": "same"}])


# --- rows of several shapes, extra message keys, and errors that suggest data.columns ---------------------

from aligner.data.formats import to_prompt_records  # noqa: E402


def test_each_row_is_detected_on_its_own():
    rows = [
        {"messages": [U, A], "conversations": None},  # the columns datasets gives a mix: unused ones null
        {"messages": None, "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"instruction": "Hi", "output": "Hello"},
        {"prompt": "Hi", "completion": "Hello"},
    ]
    assert [r["messages"] for r in to_records(rows)] == [[U, A]] * 4
    recs, _ = to_preference_records(
        [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"chosen": [U, A], "rejected": [U, {**A, "content": "x"}]}]
    )
    assert [r["prompt"] for r in recs] == [[{"role": "user", "content": "q"}], [U]]


def test_messages_keep_reasoning_and_tool_keys():
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    messages = [
        {"role": "user", "content": "1 + 2?", "reasoning_content": None, "tool_calls": None},
        {"role": "assistant", "content": None, "tool_calls": [call], "reasoning_content": "Use the tool."},
        {"role": "tool", "content": "3", "tool_call_id": "call_0", "name": "add"},
        {"role": "assistant", "content": "3", "reasoning_content": "It returned 3.", "name": None},
    ]
    (rec,) = to_records([{"messages": messages}])
    assert rec["messages"] == [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [call], "reasoning_content": "Use the tool."},
        {"role": "tool", "content": "3", "tool_call_id": "call_0", "name": "add"},
        {"role": "assistant", "content": "3", "reasoning_content": "It returned 3."},
    ]
    with pytest.raises(DataError, match="row 1: message 1 reasoning_content must be a string"):
        to_records([{"messages": [U, {**A, "reasoning_content": ["x"]}]}])
    with pytest.raises(DataError, match="row 1: message 1 content must be a string"):
        to_records([{"messages": [U, {"role": "assistant", "content": None}]}])  # None only beside tool calls


def test_errors_suggest_the_columns_mapping():
    with pytest.raises(DataError) as e:
        to_prompt_records([{"question": "q", "answer": "72"}])
    assert str(e.value) == (
        "dataset row 1: no 'prompt' column (columns: answer, question); map one with data.columns, "
        "e.g. --data.columns '{question: prompt}'"
    )
    with pytest.raises(DataError, match=r"--data.columns '\{<column>: prompt\}'"):
        to_prompt_records([{"text": "q"}])
    cases = [
        ({"instruction": "q", "response": "r", "context": ""}, "{instruction: prompt, response: completion}"),
        ({"conversation": [{"role": "user", "content": "q"}]}, "{conversation: messages}"),
        ({"dialog": [{"from": "human", "value": "q"}]}, "{dialog: conversations}"),
        ({"body": "q"}, "{<prompt column>: prompt, <reply column>: completion}"),
    ]
    for row, mapping in cases:
        with pytest.raises(DataError) as e:
            to_records([row], source="data.source 'x.jsonl'")
        assert str(e.value).endswith(f"--data.columns '{mapping}'") and "x.jsonl' row 1" in str(e.value)
    with pytest.raises(DataError, match=r"format alpaca needs column\(s\) instruction; .*'\{question: instruction"):
        to_records([{"question": "q", "output": "o"}], fmt="alpaca")
    with pytest.raises(DataError, match=r"'\{chosen_response: chosen, rejected_response: rejected\}'$"):
        to_preference_records([{"prompt": "q", "chosen_response": "a", "rejected_response": "b"}])
    with pytest.raises(DataError, match=r"'\{chosen_response: chosen, rejected_response: rejected, query: prompt\}'"):
        to_preference_records([{"query": "q", "chosen_response": "a", "rejected_response": "b"}])


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "row 1: empty chosen reply"),
        ({"prompt": "q", "chosen": "a", "rejected": "  "}, "row 1: empty rejected reply"),
        ({"prompt": [PU], "chosen": [PGOOD], "rejected": [{"role": "assistant", "content": ""}]}, "empty rejected"),
        ({"chosen": [PU, {"role": "assistant", "content": ""}], "rejected": [PU, PBAD]}, "empty chosen"),
        ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: "}, "empty rejected"),
        ({"prompt": "q", "completion": "", "label": True}, "row 1: empty completion reply"),
    ],
)
def test_empty_replies_are_errors(row, match):
    with pytest.raises(DataError, match=match) as e:
        to_preference_records([row])
    assert "\n" not in str(e.value)
