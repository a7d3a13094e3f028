"""Reward functions for online RL: plain functions `(prompts, completions, **row) -> list[float]`.

    grpo:
      rewards: [correct_answer, format_reward]     # names from REWARDS, or module:function
      reward_weights: [1.0, 0.2]

`prompts` and `completions` are aligned lists (one entry per completion: a prompt repeats for each of
its samples); completions are decoded text. Every other column of the prompt's row arrives as a
keyword argument holding one value per completion (`answer`, `kind`, ...), as TRL passes them, plus
`completion_ids` (the generated token ids). A function returns one float per completion.

`correct_answer` is the task world's answer checker (`aligner.data.world.is_correct`), the same one
the evals use. `math_answer` checks the answers general chat models write on gsm8k- and MATH-style
problems (a boxed answer, "The answer is ...", "#### N", else the last number) against the row's
answer (a bare one or a worked solution ending in "#### N"), as numbers where both are. A reward
model scores through `RewardModelScorer`. `RewardSet` combines several functions with weights and
turns a function that raises, returns the wrong number of values or a non-finite one into a one-line
error naming it.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

import torch

from aligner.data.world import extract_answer, is_correct
from aligner.errors import ConfigError, DataError

RewardFn = Callable[..., list[float]]


def correct_answer(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the completion's "Final answer:" equals the row's answer, else 0.0.

    >>> correct_answer(["q", "q"], ["7 + 5 = 12\\nFinal answer: 12", "Final answer: 13"], answer=["12", "12"])
    [1.0, 0.0]
    """
    return [float(is_correct(c, a)) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **_) -> list[float]:
    """1.0 for reasoning followed by exactly one "Final answer:" line that ends the reply, else 0.0.

    >>> format_reward(["q"] * 3, ["2 + 2 = 4\\nFinal answer: 4", "Final answer: 4", "The answer is 4."])
    [1.0, 0.0, 0.0]
    """
    out = []
    for text in completions:
        lines = [line for line in text.strip().splitlines() if line.strip()]
        finals = [line for line in lines if extract_answer(line) is not None]
        ok = len(lines) >= 2 and len(finals) == 1 and extract_answer(lines[-1]) is not None
        out.append(float(ok))
    return out


def length_penalty(prompts, completions, completion_ids=None, max_tokens: int = 160, buffer: int = 40, **_):
    """DAPO's soft overlong penalty (Yu et al. 2025, eq. 13): 0 up to max_tokens - buffer tokens, then
    falling linearly to -1 at max_tokens (and -1 beyond). Counts characters when no ids are given.

    >>> length_penalty(["q"] * 3, ["", "", ""], completion_ids=[[0] * 100, [0] * 140, [0] * 160])
    [0.0, -0.5, -1.0]
    """
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c) for c in completions]
    start = max_tokens - max(buffer, 0)
    return [-1.0 if n >= max_tokens else -max(0.0, (n - start) / buffer) if n > start else 0.0 for n in lengths]


# --- answers of general chat models (gsm8k, MATH) ------------------------------------------------------

_BOXED = "\\boxed"
_ANSWER_IS = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*([^\n]*)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")


def _last_boxed(text: str) -> str | None:
    r"""The content of the last \boxed{...} (nested braces balanced), or None."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    i, depth = start + len(_BOXED) + 1, 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _normal(answer: str) -> str:
    """An answer without LaTeX wrappers, dollar signs, thousands separators, markdown or a final period."""
    a = answer.strip()
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", a)
    a = re.sub(r"\\[()\[\]]|\\!|\\,|\\left|\\right", "", a)
    a = a.replace("\\$", "").replace("$", "").replace("**", "").strip(" .`'\"")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    return a


def extract_math_answer(text: str) -> str | None:
    r"""The final answer of a free-form solution, in the order general chat models write it: the last
    \boxed{...}, else what follows the last "The answer is" / "Final answer:", else after "####"
    (gsm8k's own solutions), else the last number in the text; None when there is none.

    >>> extract_math_answer("So 3 * 4 = 12. \\boxed{12}")
    '12'
    >>> extract_math_answer("She pays $1,250 in total. The answer is $1,250.")
    '1250'
    >>> extract_math_answer("48/2 = <<48/2=24>>24 clips in May.\n#### 72")
    '72'
    >>> extract_math_answer("First 5, then 7, so 12 apples")
    '12'
    >>> extract_math_answer("\\boxed{\\frac{1}{2}}")
    '\\frac{1}{2}'
    >>> extract_math_answer("no numbers here") is None
    True
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return _normal(boxed) or None
    for pattern in (_ANSWER_IS, _HASHES):
        found = [m for m in pattern.findall(text) if m.strip()]
        if found:
            numbers = _NUMBER.findall(found[-1])
            return _normal(numbers[0] if numbers else found[-1]) or None
    numbers = _NUMBER.findall(text)
    return _normal(numbers[-1]) if numbers else None


def _as_number(a: str) -> Fraction | None:
    try:
        return Fraction(a.replace(",", "").lstrip("+"))
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(got: str | None, want: str | None) -> bool:
    """Whether two extracted answers agree: as numbers when both are (1/2 = 0.5, 72.0 = 72), else as strings.

    >>> math_equal("72.0", "72"), math_equal("1/2", "0.5"), math_equal("x+1", "x + 1"), math_equal("7", "8")
    (True, True, True, False)
    """
    if got is None or want is None:
        return False
    a, b = _as_number(got), _as_number(want)
    if a is not None and b is not None:
        return a == b
    return re.sub(r"\s+", "", got) == re.sub(r"\s+", "", want)


def reference_answer(answer) -> str:
    r"""The answer a row states: the final answer of a worked solution ("... #### 72", "... \boxed{72}"),
    else the whole value, normalised.

    >>> reference_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"), reference_answer(" 1,000 ")
    ('72', '1000')
    """
    text = str(answer)
    return (extract_math_answer(text) or "") if ("####" in text or _BOXED in text) else _normal(text)


def math_answer(prompts, completions, answer, **_) -> list[float]:
    r"""1.0 where the completion's final answer (`extract_math_answer`: \boxed{}, "The answer is", "####",
    else the last number) equals the row's answer (`reference_answer`: a bare answer, or a worked solution
    ending in "#### N" as in gsm8k or in a \boxed{} as in MATH), as numbers where both are, else 0.0.

    >>> math_answer(["q"] * 3, ["... \\boxed{72}", "The answer is 72.", "It is 71"], answer=["... #### 72"] * 3)
    [1.0, 1.0, 0.0]
    """
    return [float(math_equal(extract_math_answer(c), reference_answer(a))) for c, a in zip(completions, answer)]


def boxed_format(prompts, completions, **_) -> list[float]:
    r"""1.0 when the completion puts exactly one answer in \boxed{...}, else 0.0 (a format reward for
    models asked to box their final answer).

    >>> boxed_format(["q"] * 3, ["so \\boxed{4}", "4", "\\boxed{4} or \\boxed{5}"])
    [1.0, 0.0, 0.0]
    """
    return [float(c.count(_BOXED + "{") == 1 and _last_boxed(c) is not None) for c in completions]


REWARDS: dict[str, RewardFn] = {
    "correct_answer": correct_answer,
    "format_reward": format_reward,
    "length_penalty": length_penalty,
    "math_answer": math_answer,
    "boxed_format": boxed_format,
}
# answer checkers (reward functions that judge a reply against the row's `answer`) and how each reads the
# answer out of a reply, for evals that vote over samples (maj@k)
ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {
    "correct_answer": extract_answer,
    "math_answer": extract_math_answer,
}


class RewardModelScorer:
    """A saved reward model (aligner rm) as a reward function: the score of prompt + completion,
    rendered with the reward model's chat template as in its training."""

    def __init__(self, path: str, batch_size: int = 32, device=None):
        from aligner.model.heads import load_reward_model
        from aligner.model.load import load_tokenizer

        self.model = load_reward_model(path).eval()
        if device is not None:
            self.model.to(device)
        self.tokenizer = load_tokenizer(path)
        self.batch_size = batch_size
        self.__name__ = f"reward_model({path})"

    def __call__(self, prompts, completions, **_) -> list[float]:
        conversations = []
        for prompt, completion in zip(prompts, completions):
            turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
            conversations.append(list(turns) + [{"role": "assistant", "content": completion}])
        return score_conversations(self.model, self.tokenizer, conversations, self.batch_size)


@torch.inference_mode()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 32) -> list[float]:
    """Reward of each conversation (a message list ending with the assistant reply), rendered with the
    tokenizer's chat template exactly as in training. Batches are cut from the conversations sorted by
    length, so a batch pads little; the scores come back in the given order."""
    from aligner.data.chat import encode_conversation, pad_token_id, shifted_example
    from aligner.data.collate import pad_examples

    device = next(model.parameters()).device
    rows = [shifted_example(*encode_conversation(tokenizer, m), keep_last=True) for m in conversations]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = pad_examples([rows[i] for i in chunk], pad_token_id(tokenizer))
        lengths = torch.tensor([len(rows[i]["input_ids"]) for i in chunk])
        values = model.sequence_scores(batch["input_ids"].to(device), batch["labels"].to(device), lengths)
        for i, v in zip(chunk, values.tolist()):
            scores[i] = v
    return scores


def resolve_reward(name: str) -> RewardFn:
    """A built-in name from REWARDS, or `module:function` importable from the working directory."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(
            f"unknown reward function '{name}' (built in: {', '.join(REWARDS)}; or module:function for your own)"
        )
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward function '{name}': {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward function '{name}' is not callable")
    return fn


class RewardSet:
    """Several reward functions with weights: `__call__` returns the weighted totals and each
    function's raw values, checked (right length, finite)."""

    def __init__(self, fns: Sequence[RewardFn], weights: Sequence[float] | None = None, names=None):
        if not fns:
            raise ConfigError("no reward function given; name at least one (e.g. correct_answer)")
        weights = [1.0] * len(fns) if not weights else list(weights)
        if len(weights) != len(fns):
            raise ConfigError(f"{len(weights)} reward weights for {len(fns)} reward functions; give one per function")
        self.fns, self.weights = list(fns), [float(w) for w in weights]
        self.names = list(names) if names else [getattr(f, "__name__", type(f).__name__) for f in fns]

    def __call__(self, prompts: list, completions: list[str], **row) -> tuple[list[float], dict[str, list[float]]]:
        n = len(completions)
        totals, each = [0.0] * n, {}
        for name, fn, w in zip(self.names, self.fns, self.weights):
            try:
                values = fn(prompts, completions, **row)
            except Exception as e:
                raise DataError(f"reward function '{name}' raised {type(e).__name__}: {e}") from None
            values = list(values) if values is not None else []
            if len(values) != n:
                raise DataError(f"reward function '{name}' returned {len(values)} values for {n} completions")
            try:
                values = [float(v) for v in values]
            except (TypeError, ValueError):
                raise DataError(f"reward function '{name}' returned a value that is not a number") from None
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise DataError(f"reward function '{name}' returned {values[bad]} for completion {bad}")
            each[name] = values
            totals = [t + w * v for t, v in zip(totals, values)]
        return totals, each
