"""Reward functions: the built-ins, user functions named module:function, weighted sets, the reward-model
scorer, and the one-line errors for functions that raise or return the wrong thing."""

import doctest

import pytest

from aligner import rewards
from aligner.errors import ConfigError, DataError
from aligner.rewards import REWARDS, RewardSet, correct_answer, format_reward, length_penalty, resolve_reward


def test_doctests():
    assert doctest.testmod(rewards).failed == 0


def test_correct_answer_is_the_eval_checker():
    from aligner.data.world import is_correct, world_rows

    rows = world_rows("sft", "val", n=20)
    good = [r["messages"][-1]["content"] for r in rows]
    bad = [g.rsplit("Final answer:", 1)[0] + "Final answer: -1" for g in good]
    answers = [r["answer"] for r in rows]
    assert correct_answer(None, good, answer=answers) == [1.0] * 20
    assert correct_answer(None, bad, answer=answers) == [float(is_correct(b, a)) for b, a in zip(bad, answers)]
    assert sum(correct_answer(None, bad, answer=answers)) == 0


def test_format_and_length():
    assert format_reward(None, ["a\nFinal answer: 1\nFinal answer: 2", "a\nFinal answer: 1\nmore"]) == [0.0, 0.0]
    assert length_penalty(None, ["x" * 10, "x" * 150], max_tokens=100, buffer=20) == [0.0, -1.0]
    assert length_penalty(None, ["x" * 90], max_tokens=100, buffer=20) == [-0.5]


def test_weighted_set_totals_and_parts():
    reward_set = RewardSet([correct_answer, format_reward], [1.0, 0.5])
    totals, parts = reward_set(["p", "p"], ["1 + 1 = 2\nFinal answer: 2", "Final answer: 3"], answer=["2", "2"])
    assert totals == [1.5, 0.0]
    assert parts == {"correct_answer": [1.0, 0.0], "format_reward": [1.0, 0.0]}


def test_user_function_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, **row):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = resolve_reward("my_rewards:short")
    assert fn(None, ["", "abc"]) == [1.0, 0.25]
    assert resolve_reward("correct_answer") is REWARDS["correct_answer"]
    with pytest.raises(ConfigError, match="unknown reward function 'nope'"):
        resolve_reward("nope")
    with pytest.raises(ConfigError, match="my_rewards:missing"):
        resolve_reward("my_rewards:missing")


@pytest.mark.parametrize(
    "fn, message",
    [
        (lambda p, c, **r: 1 / 0, "raised ZeroDivisionError"),
        (lambda p, c, **r: [1.0], "returned 1 values for 2 completions"),
        (lambda p, c, **r: [1.0, float("nan")], "returned nan for completion 1"),
        (lambda p, c, **r: ["a", "b"], "not a number"),
    ],
)
def test_bad_reward_functions_are_named(fn, message):
    with pytest.raises(DataError, match=message) as e:
        RewardSet([fn], names=["mine"])(["p", "p"], ["a", "b"])
    assert "'mine'" in str(e.value) and "\n" not in str(e.value)


def test_weights_must_match():
    with pytest.raises(ConfigError, match="2 reward weights for 1"):
        RewardSet([correct_answer], [1.0, 2.0])
    with pytest.raises(ConfigError, match="no reward function"):
        RewardSet([])


def test_reward_model_scorer_matches_score_conversations(bases, tmp_path):
    from aligner.model.gpt import GPT
    from aligner.model.heads import ScalarHeadModel
    from aligner.model.load import load_tokenizer
    from aligner.rewards import RewardModelScorer, score_conversations

    model = ScalarHeadModel.from_causal_lm(GPT.from_pretrained(bases / "gpt"))
    model.save_pretrained(tmp_path / "rm")
    load_tokenizer(bases / "gpt").save_pretrained(tmp_path / "rm")
    scorer = RewardModelScorer(str(tmp_path / "rm"))
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    replies = ["2 + 3 = 5\nFinal answer: 5", "Final answer: 6"]
    got = scorer([prompt, prompt], replies)
    want = score_conversations(
        scorer.model, scorer.tokenizer, [prompt + [{"role": "assistant", "content": r}] for r in replies]
    )
    assert got == pytest.approx(want) and got[0] != got[1]


def test_math_answer_reads_what_general_chat_models_write():
    """gsm8k's reference solutions end in "#### N"; models box the answer, say "The answer is", or just end
    on the number. Each form is read, numbers compare as numbers, and a wrong or missing answer scores 0."""
    from aligner.rewards import extract_math_answer, math_answer

    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    replies = [
        "In May she sold 24, so 48 + 24 = 72.\n\\boxed{72}",
        "She sold 72 clips altogether. The answer is 72.",
        "**Answer:** 72.0",
        "48 + 24 = 72",
        "The final answer is $\\boxed{\\text{72}}$",
        "She sold 1,000 clips. The answer is 1,000.",
        "The answer is 71",
        "I cannot tell.",
        "\\boxed{72} or maybe \\boxed{73}",  # the last box is the answer
    ]
    assert math_answer(["q"] * len(replies), replies, answer=[gold] * len(replies)) == [1, 1, 1, 1, 1, 0, 0, 0, 0]
    assert math_answer(["q"], ["So it costs $18."], answer=["18"]) == [1.0]  # a bare reference
    assert math_answer(["q"], ["\\boxed{0.5}"], answer=["\\boxed{\\frac{1}{2}}"]) == [0.0]  # LaTeX fractions: strings
    assert math_answer(["q"], ["\\boxed{1/2}"], answer=["0.5"]) == [1.0]
    assert extract_math_answer("The answer is -3.") == "-3" and extract_math_answer("") is None
    assert resolve_reward("math_answer") is math_answer and "boxed_format" in REWARDS
