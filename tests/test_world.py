"""The task world: determinism, disjoint splits, correct answers, honest preference pairs, the answer checker."""

import doctest
import random
import re
from decimal import Decimal
from pathlib import Path

import pytest

from aligner.data import world as W
from aligner.errors import DataError

REPO = Path(__file__).resolve().parents[1]
RENDERINGS = ("pretrain", "sft", "preference", "rl")


def question_of(kind: str, row: dict) -> str:
    return row["messages"][1]["content"] if kind == "sft" else row["prompt"][1]["content"]


# --- determinism and splits ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", RENDERINGS)
def test_deterministic_by_seed(kind):
    a = W.world_rows(kind, "train", n=40, seed=1)
    assert a == W.world_rows(kind, "train", n=40, seed=1)
    assert a != W.world_rows(kind, "train", n=40, seed=2)
    assert W.world_rows(kind, "val", n=10, seed=1) == W.world_rows(kind, "val", n=10, seed=1)


def test_split_key_ignores_spacing_case_and_operand_order():
    assert W.normalise("What is 4 + 3?") == W.normalise("what is  3 + 4?")
    assert W.normalise("Which is larger: 9.9 or 9.11?") == W.normalise("Which is larger: 9.11 or 9.9?")
    assert W.normalise("What is 4 - 3?") != W.normalise("What is 3 - 4?")
    assert W.split_of("What is 12 * 7?") == W.split_of("What is 7 * 12?")
    shares = [W.split_of(f"What is {a} + {b}?") for a in range(60) for b in range(60)]
    assert 0.03 < shares.count("val") / len(shares) < 0.07 and 0.03 < shares.count("test") / len(shares) < 0.07


@pytest.fixture(scope="module")
def held_out() -> set[str]:
    out = set()
    for split in ("val", "test"):
        for kind in ("sft", "preference", "rl"):
            rows = W.world_rows(kind, split, n=300)
            assert all(W.split_of(question_of(kind, r)) == split for r in rows)
            out |= {question_of(kind, r) for r in rows}
    return out


@pytest.fixture(scope="module")
def train_texts() -> dict[str, list[str]]:
    """What a model trains on: the pretraining corpus, SFT answers, chosen answers (all train split)."""
    sft = W.world_rows("sft", "train", n=3000)
    pref = W.world_rows("preference", "train", n=1500)
    return {
        "pretrain": [r["text"] for r in W.world_rows("pretrain", "train", n=800)],
        "sft": [r["messages"][2]["content"] for r in sft],
        "chosen": [r["chosen"][0]["content"] for r in pref],
        "questions": [question_of("sft", r) for r in sft] + [question_of("preference", r) for r in pref],
    }


def test_no_question_in_two_splits_in_any_rendering(held_out, train_texts):
    assert all(W.split_of(q) == "train" for q in train_texts["questions"])
    assert not held_out & set(train_texts["questions"])
    rl = {question_of("rl", r) for r in W.world_rows("rl", "train", n=3000)}
    assert all(W.split_of(q) == "train" for q in rl) and not held_out & rl
    corpus = "\n".join(train_texts["pretrain"])
    assert not [q for q in held_out if q in corpus]
    val = {question_of("rl", r) for r in W.world_rows("rl", "val", n=300)}
    test = {question_of("rl", r) for r in W.world_rows("rl", "test", n=300)}
    assert not val & test


def _plain(x: str) -> str:
    """A padded decimal as it is written in a question: 9.90 -> 9.9, 12.0 -> 12."""
    return x.rstrip("0").rstrip(".") if "." in x else x


def test_train_text_never_states_a_held_out_answer(train_texts):
    """Every binary fact ("7 + 5 = 12") and every ordering ("9.90 > 9.11") in train text is a train question."""
    facts = comparisons = 0
    for name in ("pretrain", "sft", "chosen"):
        for text in train_texts[name]:
            for a, op, b, _ in W.FACT.findall(text):
                facts += 1
                assert W.split_of(f"What is {a} {op} {b}?") == "train", (name, f"{a} {op} {b}")
            for chain in re.findall(r"\d+(?:\.\d+)?(?: > \d+(?:\.\d+)?)+", text):
                nums = [_plain(x) for x in chain.split(" > ")]
                for i, x in enumerate(nums):
                    for y in nums[i + 1 :]:
                        comparisons += 1
                        assert W.split_of(f"Which is larger: {x} or {y}?") == "train", (name, chain)
    assert facts > 5000 and comparisons > 1000


# --- answers are right --------------------------------------------------------------------------------


def _evaluate(expr: str) -> int:
    assert re.fullmatch(r"[\d+\-*() ]+", expr), expr
    return eval(expr)  # digits, + - * and parentheses only


WORD_PROBLEMS = [  # (pattern, answer from the numbers in the question)
    (r"\w+ has (\d+) [a-z]+\. \w+ gives \w+ (\d+) more\. How many .*", lambda x, y: x + y),
    (r"\w+ finds (\d+) [a-z]+ in the morning and (\d+) after lunch\. .*", lambda x, y: x + y),
    (r"\w+ has (\d+) [a-z]+\. (?:She|He) gives (\d+) to \w+\. How many .*", lambda x, y: x - y),
    (r"There are (\d+) [a-z]+ in a box\. \w+ takes out (\d+)\. .*", lambda x, y: x - y),
    (r"\w+ buys (\d+) bags of [a-z]+\. Each bag holds (\d+) .*", lambda k, n: k * n),
    (r"\w+ puts [a-z]+ in (\d+) rows with (\d+) in each row\. .*", lambda k, n: k * n),
    (r"\w+ has (\d+) [a-z]+ and buys (\d+) packs of (\d+)\. Then (?:she|he) gives (\d+) to .*",
     lambda x, k, n, y: x + k * n - y),
    (r"\w+ has (\d+) [a-z]+\. \w+ has (\d+) more [a-z]+ than \w+\. How many [a-z]+ do they have together\?",
     lambda x, d: 2 * x + d),
]  # fmt: skip


def expected_answer(task: W.Task) -> str:
    """The answer recomputed from the question text alone."""
    q = task.question
    if task.kind == "arithmetic":
        return str(_evaluate(re.fullmatch(r"What is (.+)\?", q).group(1)))
    if task.kind == "compare":
        nums = re.findall(r"\d+(?:\.\d+)?", q)
        assert len(nums) == (3 if task.level == 4 else 2) and len({Decimal(x) for x in nums}) == len(nums)
        return max(nums, key=Decimal)
    if task.kind == "letters":
        letter, text = re.fullmatch(r'How many times does the letter "([a-z])" appear in "([a-z ]+)"\?', q).groups()
        return str(text.count(letter))
    matches = [(m, f) for pattern, f in WORD_PROBLEMS if (m := re.fullmatch(pattern, q))]
    assert len(matches) == 1, q
    m, f = matches[0]
    return str(f(*map(int, m.groups())))


def check_steps(task: W.Task) -> None:
    for step in task.steps:  # every equation chain in a step holds
        for chain in re.findall(r"[\d(][\d+\-*() ]*(?:=[\d+\-*() ]+)+", step):
            values = [_evaluate(side.strip()) for side in chain.split("=")]
            assert len(set(values)) == 1, step
        for chain in re.findall(r"\d+(?:\.\d+)?(?: > \d+(?:\.\d+)?)+", step):  # and every ordering
            values = [Decimal(x) for x in chain.split(" > ")]
            assert values == sorted(values, reverse=True) and len(set(values)) == len(values), step
    if task.kind == "letters":
        letter, text = re.findall(r'"([^"]+)"', task.question)
        letters = text.replace(" ", "")
        positions = [str(i + 1) for i, c in enumerate(letters) if c == letter]
        assert ("is at position" in "".join(task.steps)) == bool(positions)
        if positions:
            assert task.steps[1].endswith(" " + ", ".join(positions) + "."), task.steps
    if task.kind in ("arithmetic", "word"):
        assert task.steps[-1].endswith(f"= {task.answer}")


@pytest.mark.parametrize("level", W.LEVELS)
@pytest.mark.parametrize("kind", W.KINDS)
def test_answers_and_steps_are_right(kind, level):
    rng = random.Random(f"{kind}{level}")
    for _ in range(300):
        task = W.make_task(rng, kind, level)
        assert task.answer == expected_answer(task), task
        check_steps(task)
        assert W.is_correct(task.solution(), task.answer)
        assert int(Decimal(task.answer)) >= 0


def test_every_rendering_carries_right_answers():
    for r in W.world_rows("sft", "train", n=400) + W.world_rows("sft", "test", n=100):
        task = W.Task(r["id"], r["kind"], r["level"], question_of("sft", r), r["answer"], [])
        assert r["answer"] == expected_answer(task)
        assert W.is_correct(r["messages"][2]["content"], r["answer"])
    for r in W.world_rows("rl", "val", n=100):
        task = W.Task(r["id"], r["kind"], r["level"], question_of("rl", r), r["answer"], [])
        assert r["answer"] == expected_answer(task)


def test_levels_kinds_balance_and_few_duplicates():
    rows = W.world_rows("sft", "train", n=4000)
    cells = {(r["kind"], r["level"]) for r in rows}
    assert cells == {(k, lv) for k in W.KINDS for lv in W.LEVELS}
    for kind in W.KINDS:
        assert 0.2 < sum(r["kind"] == kind for r in rows) / len(rows) < 0.3
    questions = [question_of("sft", r) for r in rows]
    assert len(set(questions)) / len(questions) > 0.99
    assert len({r["id"] for r in rows}) == len(set(questions))
    easy = W.world_rows("rl", "val", n=100, levels=(1, 2))
    assert {r["level"] for r in easy} == {1, 2}


def test_rendering_shapes():
    sft = W.world_rows("sft", "train", n=3)[0]
    assert [m["role"] for m in sft["messages"]] == ["system", "user", "assistant"]
    assert sft["messages"][0]["content"] == W.SYSTEM_PROMPT
    assert sft["messages"][2]["content"].endswith(f"\nFinal answer: {sft['answer']}")
    assert set(sft) == {"messages", "answer", "kind", "level", "id"}
    rl = W.world_rows("rl", "test", n=3)[0]
    assert [m["role"] for m in rl["prompt"]] == ["system", "user"]
    assert set(rl) == {"prompt", "answer", "kind", "level", "id"}
    docs = [r["text"] for r in W.world_rows("pretrain", "train", n=300)]
    assert all(set(r) == {"text"} for r in W.world_rows("pretrain", "val", n=5))
    assert all(100 < len(d) < 2500 for d in docs) and 400 < sum(map(len, docs)) / len(docs) < 1200
    corpus = "\n".join(docs)
    for marker in ("Question: ", "Reasoning: ", "Final answer: ", " has 2 ", " is larger than ", " = "):
        assert marker in corpus, marker
    assert len(W.world_rows("pretrain", "train", n=5)) == 5


# --- preference pairs -------------------------------------------------------------------------------


def test_preference_pairs_are_labelled_honestly():
    rows = W.world_rows("preference", "train", n=600)
    counts = {k: sum(r["rejection"] == k for r in rows) for k in W.REJECTIONS}
    assert all(c > 60 for c in counts.values()), counts
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        assert chosen != rejected and W.is_correct(chosen, r["answer"])
        if r["rejection"] == "wrong_answer":
            wrong = W.extract_answer(rejected)
            assert wrong is not None and not W.is_correct(rejected, r["answer"])
            assert rejected.count("\n") >= 1  # it reasons, then ends in a wrong final answer
            if r["kind"] != "compare":
                assert abs(int(wrong) - int(r["answer"])) <= 100
        elif r["rejection"] == "wrong_format":
            assert W.extract_answer(rejected) is None and r["answer"] in rejected.splitlines()[-1]
        else:
            assert rejected == f"Final answer: {r['answer']}"


def test_wrong_decimal_reasoning_is_the_classic_slip():
    slips = [
        r["rejected"][0]["content"]
        for r in W.world_rows("preference", "train", n=2000)
        if r["rejection"] == "wrong_answer" and r["kind"] == "compare" and r["level"] == 3
    ]
    assert any(s.startswith("Compare the digits after the decimal point") for s in slips)


# --- the answer checker -----------------------------------------------------------------------------


def test_doctests():
    assert doctest.testmod(W).failed == 0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("a\nFinal answer: 42\nFinal answer: 43.", "43"),
        ("final answer:  1,234", "1234"),
        ("FINAL ANSWER: 9.9", "9.9"),
        ("Final answer:42", "42"),
        ("Final answer: **42**.", "42"),
        ("Final answer: -3", "-3"),
        ('Final answer: "9.11"', "9.11"),
        ("Final answer: Paris", "Paris"),
        ("Final answer:\n42", None),
        ("The answer is 42.", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert W.extract_answer(text) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("Final answer: 9.90", "9.9", True),
        ("Final answer: 9.11", "9.9", False),
        ("Final answer: 007", "7", True),
        ("Final answer: 1,000", "1000", True),
        ("Final answer: 42 apples", "42", False),
        ("Final answer: Paris", "Paris", True),
        ("Final answer: paris", "Paris", False),
        ("So it is 42.", "42", False),
    ],
)
def test_is_correct(completion, answer, expected):
    assert W.is_correct(completion, answer) is expected


# --- odds and ends ----------------------------------------------------------------------------------


def test_system_prompt_file_matches():
    assert (REPO / "prompts" / "system.txt").read_text().strip() == W.SYSTEM_PROMPT


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown task-world kind 'chat'"):
        W.world_rows("chat")
    with pytest.raises(DataError, match="split 'dev'"):
        W.world_rows("sft", "dev")
    with pytest.raises(DataError, match="world_levels"):
        W.world_rows("sft", levels=(5,))
    with pytest.raises(DataError, match="world_levels"):
        W.sft_rows("train", n=3, levels=())
