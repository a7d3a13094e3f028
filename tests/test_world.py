"""The task world: determinism, disjoint splits, correct answers, and the shared answer checker."""

import random
import re
from fractions import Fraction

import pytest

from aligner.data import world as W
from aligner.errors import DataError


def test_deterministic_by_seed():
    assert W.world_rows("sft", "train", n=50, seed=1) == W.world_rows("sft", "train", n=50, seed=1)
    assert W.world_rows("sft", "train", n=50, seed=1) != W.world_rows("sft", "train", n=50, seed=2)


def test_no_question_in_two_splits_in_any_rendering():
    held_out = {r["messages"][1]["content"] for s in ("val", "test") for r in W.world_rows("sft", s, n=400)}
    held_out |= {r["prompt"][1]["content"] for s in ("val", "test") for r in W.world_rows("rl", s, n=400)}
    assert all(W.split_of(q) in ("val", "test") for q in held_out)
    for kind, key in (("sft", "messages"), ("preference", "prompt"), ("rl", "prompt")):
        train = {r[key][1]["content"] for r in W.world_rows(kind, "train", n=3000)}
        assert not train & held_out, kind
    corpus = "\n".join(r["text"] for r in W.world_rows("pretrain", "train", n=1500))
    assert not [q for q in held_out if q in corpus]


def _evaluate(expr: str) -> Fraction:
    assert re.fullmatch(r"[\d+\-*() ]+", expr)
    return Fraction(eval(expr))  # digits and + - * ( ) only


def check(task: W.Task) -> None:
    q = task.question
    if task.kind == "arithmetic":
        assert Fraction(task.answer) == _evaluate(q.removeprefix("What is ").removesuffix("?"))
    elif task.kind == "compare":
        nums = re.findall(r"\d+(?:\.\d+)?", q.split(":", 1)[1])
        assert task.answer == max(nums, key=float) and task.answer in nums
    elif task.kind == "letters":
        letter, text = re.fullmatch(r'How many times does the letter "(.)" appear in "(.+)"\?', q).groups()
        assert int(task.answer) == text.count(letter)
    else:
        nums = [int(x) for x in re.findall(r"\d+", q)]
        if "gives" in q and "more" in q:
            expected = nums[0] + nums[1]
        elif "Each box" in q:
            expected = nums[0] * nums[1]
        elif "packs" in q:
            expected = nums[0] + nums[1] * nums[2] - nums[3]
        else:
            expected = nums[0] - nums[1]
        assert int(task.answer) == expected, q
    # every step with an equation is arithmetically right
    for step in task.steps:
        for chain in re.findall(r"[\d(][\d+\-*() ]*(?:=[\d+\-*() ]+)+", step):
            sides = [_evaluate(side.strip()) for side in chain.split("=")]
            assert len(set(sides)) == 1, step


@pytest.mark.parametrize("kind", W.KINDS)
@pytest.mark.parametrize("level", W.LEVELS)
def test_answers_are_right(kind, level):
    rng = random.Random(f"{kind}{level}")
    for _ in range(200):
        task = W.make_task(rng, kind, level)
        check(task)
        assert W.is_correct(task.solution(), task.answer)


def test_levels_and_kinds_present_and_few_duplicates():
    rows = W.world_rows("sft", "train", n=4000)
    assert {r["level"] for r in rows} == set(W.LEVELS)
    assert {r["kind"] for r in rows} == set(W.KINDS)
    questions = [r["messages"][1]["content"] for r in rows]
    assert len(set(questions)) == len(questions)
    only_level_1 = W.world_rows("rl", "val", n=100, levels=(1,))
    assert {r["level"] for r in only_level_1} == {1}


def test_rendering_shapes():
    sft = W.world_rows("sft", "train", n=3)[0]
    assert [m["role"] for m in sft["messages"]] == ["system", "user", "assistant"]
    assert sft["messages"][0]["content"] == W.SYSTEM_PROMPT
    assert sft["messages"][2]["content"].endswith(f"Final answer: {sft['answer']}")
    rl = W.world_rows("rl", "test", n=3)[0]
    assert [m["role"] for m in rl["prompt"]] == ["system", "user"] and rl["answer"]
    doc = W.world_rows("pretrain", "train", n=2)[0]["text"]
    assert 200 < len(doc) < 3000


def test_preference_pairs_are_labelled_honestly():
    rows = W.world_rows("preference", "train", n=400)
    assert {r["rejection"] for r in rows} == {"wrong_answer", "wrong_format", "no_reasoning"}
    for r in rows:
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        assert chosen != rejected
        assert W.is_correct(chosen, r["answer"])
        if r["rejection"] == "wrong_answer":
            assert W.extract_answer(rejected) is not None and not W.is_correct(rejected, r["answer"])
        elif r["rejection"] == "wrong_format":
            assert W.extract_answer(rejected) is None
        else:
            assert W.is_correct(rejected, r["answer"]) and "\n" not in rejected


def test_answer_checker():
    assert W.extract_answer("a\nFinal answer: 42\nFinal answer: 43.") == "43"
    assert W.extract_answer("final answer:  1,234") == "1234"
    assert W.extract_answer("FINAL ANSWER: 9.9") == "9.9"
    assert W.extract_answer("nothing here") is None
    assert W.is_correct("Final answer: 9.90", "9.9")
    assert not W.is_correct("Final answer: 9.11", "9.9")
    assert W.is_correct("Final answer: 007", "7")


def test_system_prompt_file_is_the_source():
    assert W.SYSTEM_PROMPT == (W.Path(W.__file__).resolve().parents[2] / "prompts" / "system.txt").read_text().strip()


def test_bad_arguments():
    with pytest.raises(DataError, match="unknown task-world kind 'chat'"):
        W.world_rows("chat")
    with pytest.raises(DataError, match="split 'dev'"):
        W.world_rows("sft", "dev")
    with pytest.raises(DataError, match="world_levels"):
        W.world_rows("sft", levels=(5,))
