"""The built-in task world: deterministic tasks with verifiable answers, rendered for every stage.

    aligner pretrain                 # data.source: world:pretrain
    data: {source: world:sft}        # chat conversations; also world:preference and world:rl

Four kinds of task (arithmetic, compare, letters, word), each at difficulty levels 1 (easy) to 4
(hard); their generators are in aligner.data.world_tasks, and this module splits, filters and renders.

Every task has a question, reasoning steps and an answer. A task's split (train / val / test) is a
function of a hash of its normalised question alone (see `normalise`), so no question appears in two
splits, whatever the rendering. Train tasks go further: one is dropped when its reasoning states the
answer to a held-out question (a step "7 + 5 = 12" when "What is 7 + 5?" is a test question; a
three-way comparison that orders a held-out pair), so no train text, pretraining corpus included,
answers a val or test question, not even in passing.

`extract_answer` and `is_correct` are the one answer checker: rewards and evals use them too.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from aligner.data.world_tasks import GENERATORS, compare_steps, letter_steps
from aligner.errors import DataError

KINDS = ("arithmetic", "compare", "letters", "word")
LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "val", "test")
DEFAULT_ROWS = {"train": 20000, "val": 1000, "test": 1000}
# prompts/system.txt holds the same text (a test keeps them equal); recipes may point at that file.
SYSTEM_PROMPT = (
    'Solve the task step by step, then give the result on a last line of the form "Final answer: <answer>".'
)


@dataclass
class Task:
    id: str
    kind: str
    level: int
    question: str
    answer: str
    steps: list[str]

    def solution(self) -> str:
        """The well-formed assistant reply: reasoning steps, then the final-answer line."""
        return "\n".join(self.steps) + f"\nFinal answer: {self.answer}"


_COMMUTATIVE = re.compile(r"what is (\d+) ([+*]) (\d+)\?")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalise(question: str) -> str:
    """The split key: lower case, single spaces, operands of + and * and the numbers compared in order,
    so "What is 4 + 3?" and "What is 3 + 4?" (or "9.9 or 9.11" and "9.11 or 9.9") share a split."""
    q = " ".join(question.lower().split())
    m = _COMMUTATIVE.fullmatch(q)
    if m:
        a, op, b = m.groups()
        a, b = sorted((a, b), key=int)
        return f"what is {a} {op} {b}?"
    if q.startswith("which is the largest") or q.startswith("which is larger"):
        return "largest of " + ", ".join(sorted(_NUMBER.findall(q), key=float))
    return q


def split_of(question: str) -> str:
    """val for 5% of questions, test for 5%, train for the rest, by a stable hash of the normalised text."""
    bucket = int.from_bytes(hashlib.sha256(normalise(question).encode()).digest()[:4], "big") % 100
    return "val" if bucket < 5 else "test" if bucket < 10 else "train"


# a binary fact stated in a step ("7 + 5 = 12"), not part of a longer expression
FACT = re.compile(r"(?<![-+*] )(?<![\d(])(\d+) ([-+*]) (\d+) = (\d+)(?![\d.]| [-+*])")


@functools.lru_cache(maxsize=1 << 16)
def _held_out(question: str) -> bool:
    return split_of(question) != "train"


def answers_held_out(kind: str, question: str, steps: list[str]) -> bool:
    """Whether a task's reasoning answers a held-out question (a train task that does is never used)."""
    if kind == "compare":
        a, b, *c = _NUMBER.findall(question.split(":", 1)[1])
        pairs = [(a, b), (a, c[0]), (b, c[0])] if c else []
        return any(_held_out(f"Which is larger: {x} or {y}?") for x, y in pairs)
    if kind in ("arithmetic", "word"):
        return any(_held_out(f"What is {a} {op} {b}?") for step in steps for a, op, b, _ in FACT.findall(step))
    return False


def _task(kind: str, level: int, question: str, answer: str, steps: list[str]) -> Task:
    return Task(hashlib.sha256(question.encode()).hexdigest()[:12], kind, level, question, answer, steps)


def make_task(rng: random.Random, kind: str, level: int) -> Task:
    """One task of `kind` and `level`, whatever its split."""
    return _task(kind, level, *GENERATORS[kind](rng, level))


def _check(split: str, levels) -> None:
    if split not in SPLITS:
        raise DataError(f"data split '{split}' is not a task-world split (use one of {', '.join(SPLITS)})")
    if not levels or any(lv not in LEVELS for lv in levels):
        raise DataError(f"data.world_levels must be a non-empty subset of {list(LEVELS)}, got {list(levels)}")


def tasks(split: str, n: int, seed: int = 0, levels=LEVELS, kinds=KINDS, stream: str = "") -> list[Task]:
    """`n` tasks of `split`, balanced over (kind, level), deterministic by seed.

    Questions are unique while a (kind, level) cell has unused ones; a cell that runs out (only the
    smallest, e.g. level-1 arithmetic, ever does) repeats questions rather than skewing the mix.
    """
    _check(split, levels)
    rng = random.Random(f"{seed}:{split}:{stream}")
    cells = [(kind, level) for kind in kinds for level in levels]
    out, seen = [], set()
    for _ in range(n):
        kind, level = rng.choice(cells)
        gen, found, repeats = GENERATORS[kind], None, 0
        for _ in range(5000):
            q, answer, steps = gen(rng, level)
            if split_of(q) != split or (split == "train" and answers_held_out(kind, q, steps)):
                continue
            found = q, answer, steps
            if q not in seen:
                break
            repeats += 1
            if repeats == 8:  # this cell looks used up: take a repeat
                break
        if found is None:
            raise RuntimeError(f"no {split} question found for {kind} level {level}")
        seen.add(found[0])
        out.append(_task(kind, level, *found))
    return out


# --- renderings -----------------------------------------------------------------------------------


def _meta(t: Task) -> dict:
    return {"answer": t.answer, "kind": t.kind, "level": t.level, "id": t.id}


def prompt_messages(t: Task) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": t.question}]


def _prose(steps: list[str]) -> str:
    return " ".join(s if s.endswith(".") else s + "." for s in steps)


def _worked(t: Task, style: int) -> str:
    if style == 0:
        return f"Question: {t.question}\nReasoning: {_prose(t.steps)}\nAnswer: {t.answer}"
    if style == 1:
        return f"Q: {t.question}\nA: {_prose(t.steps)} The answer is {t.answer}."
    if style == 2:
        return f"{t.question}\n{t.solution()}"
    bullets = "".join(f"- {s}\n" for s in t.steps)
    return f"Problem: {t.question}\nSolution:\n{bullets}So the answer is {t.answer}."


def _fact(t: Task, style: int) -> str:
    return t.question.removeprefix("What is ").removesuffix("?") + f" = {t.answer}"


def _comparison(t: Task, style: int) -> str:
    if style % 2:
        return f"{t.question} {t.steps[-1]}"
    nums = _NUMBER.findall(t.question.split(":", 1)[1])
    others = " and ".join(x for x in nums if x != t.answer)
    return f"{t.answer} is larger than {others}: {t.steps[-1].split(', so')[0]}."


def _spelling(t: Task, style: int) -> str:
    letter, text = re.findall(r'"([^"]+)"', t.question)
    spelled = " ".join("-".join(word) for word in text.split())
    n = int(t.answer)
    count = ("no", "one")[n] if n < 2 else str(n)
    count += f" {letter}" + ("" if n == 1 else "'s")
    return f"{spelled} has {count}." if style % 2 else f'"{text}" is spelled {spelled}, so it has {count}.'


# (kind the fragments come from or None for any, headings, renderer, phrasings, separator, fragments per doc)
_DOCS = [
    (None, [""], _worked, 4, "\n\n", (3, 7)),
    ("arithmetic", ["Arithmetic facts:\n", "Practice sheet\n", "Drill:\n", ""], _fact, 1, "\n", (16, 48)),
    ("compare", ["To compare decimals, line up the decimal points, write every number with the same number of "
                 "digits after the point, then compare digit by digit from the left. More digits after the "
                 "point do not make a number larger.\n", "Comparing numbers:\n", ""], _comparison, 2, "\n", (6, 18)),
    ("letters", ["To count a letter, spell the word one letter at a time and count each match.\n",
                 "Spelling practice:\n", ""], _spelling, 2, "\n", (8, 24)),
]  # fmt: skip
_DOC_WEIGHTS = [5, 2, 2, 2]


def pretrain_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Plain-text documents of a few hundred to about 1,500 characters: worked problems in varied phrasings,
    arithmetic facts, decimal comparisons, spelled-out letter counts. Every line renders a task of `split`.

    Documents draw on a pool of `n` tasks, walking each kind's list in order and wrapping around, so a
    task comes back in later documents, each time in its next phrasing where it has several.
    """
    n = DEFAULT_ROWS[split] if n is None else n
    pool = tasks(split, max(n, 200), seed, levels, stream="pretrain")
    by_kind = {None: pool, **{k: [t for t in pool if t.kind == k] for k in KINDS}}
    cursor, rendered = dict.fromkeys(by_kind, 0), {}
    rng = random.Random(f"{seed}:{split}:pretrain-docs")

    def lines(kind, render, styles: int, rounds: int) -> list[str]:
        """Every task of `kind` rendered as on its `rounds`-th use (phrasing (index + rounds) % styles)."""
        key = (kind, rounds % styles)
        if key not in rendered:
            items = by_kind[kind]
            rendered[key] = [render(t, (i + rounds) % styles) for i, t in enumerate(items)]
        return rendered[key]

    docs = []
    while len(docs) < n:
        kind, headings, render, styles, sep, (lo, hi) = rng.choices(_DOCS, _DOC_WEIGHTS)[0]
        size = len(by_kind[kind])
        if not size:  # a kind missing from a tiny pool
            continue
        parts, start = [], cursor[kind]
        end = cursor[kind] = start + rng.randint(lo, hi)
        while start < end:  # fragments start..end-1 of this kind, wrapping round its list
            index, rounds = start % size, start // size
            take = min(end - start, size - index)
            parts += lines(kind, render, styles, rounds)[index : index + take]
            start += take
        docs.append({"text": rng.choice(headings) + sep.join(parts)})
    return docs


def sft_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Conversations: system prompt, question, step-by-step answer ending in "Final answer: X"."""
    n = DEFAULT_ROWS[split] if n is None else n
    return [
        {"messages": prompt_messages(t) + [{"role": "assistant", "content": t.solution()}], **_meta(t)}
        for t in tasks(split, n, seed, levels, stream="sft")
    ]


def _near_miss(rng: random.Random, answer: int) -> int:
    deltas = [-2, -1, 1, 2, 10, -10] + ([100, -100] if answer >= 100 else [])
    wrong = answer + rng.choice(deltas)
    return wrong if wrong >= 0 and wrong != answer else answer + rng.choice([1, 2, 10])


def _wrong_answer(rng: random.Random, t: Task) -> str:
    """Plausible reasoning that ends in a near-miss answer."""
    if t.kind == "compare":
        nums = _NUMBER.findall(t.question.split(":", 1)[1])
        wrong = rng.choice([x for x in nums if x != t.answer])
        steps = compare_steps(nums, wrong)
        if len(nums) == 2 and "." in wrong and "." in t.answer:
            frac_w, frac_b = wrong.split(".")[1], t.answer.split(".")[1]
            if int(frac_w) > int(frac_b):  # the classic slip: 9.11 > 9.9 because 11 > 9
                steps = [f"Compare the digits after the decimal point: {int(frac_w)} > {int(frac_b)}.",
                         f"So the larger is {wrong}."]  # fmt: skip
    elif t.kind == "letters":
        letter, text = re.findall(r'"([^"]+)"', t.question)
        positions = [i + 1 for i, c in enumerate(text.replace(" ", "")) if c == letter]
        if positions:  # miss one occurrence (the strawberry mistake)
            positions.pop(rng.randrange(len(positions)))
        else:
            positions = [rng.randint(1, len(text.replace(" ", "")))]
        steps = letter_steps(text, letter, positions)
        wrong = str(len(positions))
    else:  # every arithmetic and word-problem task's last step ends in "= <answer>"
        wrong = str(_near_miss(rng, int(t.answer)))
        steps = t.steps[:-1] + [t.steps[-1].rsplit("= ", 1)[0] + f"= {wrong}"]
    return "\n".join(steps) + f"\nFinal answer: {wrong}"


REJECTIONS = ("wrong_answer", "wrong_format", "no_reasoning")


def preference_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """chosen = correct and well formed; rejected = wrong answer (half the pairs), a correct answer without
    the "Final answer:" line, or a bare final answer with no reasoning. `rejection` says which."""
    n = DEFAULT_ROWS[split] if n is None else n
    rng = random.Random(f"{seed}:{split}:preference-rejections")
    rows = []
    for t in tasks(split, n, seed, levels, stream="preference"):
        rejection = rng.choice(("wrong_answer", "wrong_answer", "wrong_format", "no_reasoning"))
        if rejection == "wrong_answer":
            rejected = _wrong_answer(rng, t)
        elif rejection == "wrong_format":
            ending = rng.choice(["The answer is {}.", "Answer: {}", "So it is {}."])
            rejected = "\n".join(t.steps) + "\n" + ending.format(t.answer)
        else:
            rejected = f"Final answer: {t.answer}"
        rows.append(
            {
                "prompt": prompt_messages(t),
                "chosen": [{"role": "assistant", "content": t.solution()}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rejection": rejection,
                **_meta(t),
            }
        )
    return rows


def rl_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Prompts (system + question) with the ground-truth answer, for rewards and evals."""
    n = DEFAULT_ROWS[split] if n is None else n
    return [{"prompt": prompt_messages(t), **_meta(t)} for t in tasks(split, n, seed, levels, stream="rl")]


RENDERINGS = {"pretrain": pretrain_rows, "sft": sft_rows, "preference": preference_rows, "rl": rl_rows}


def world_rows(kind: str, split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Rows of one rendering of the task world (kind: pretrain, sft, preference or rl)."""
    if kind not in RENDERINGS:
        raise DataError(f"data.source: unknown task-world kind '{kind}' (use world:{', world:'.join(RENDERINGS)})")
    _check(split, levels)
    return RENDERINGS[kind](split, n, seed, tuple(levels))


# --- the answer checker ---------------------------------------------------------------------------

_FINAL = re.compile(r"final answer[ \t]*[:=][ \t]*([^\n]*)", re.IGNORECASE)
_NUMERIC = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")


def _clean(answer: str) -> str:
    answer = re.sub(r"^[\s*`$\"']+|[\s*`$\"'.]+$", "", answer)  # markdown, quotes, a trailing period
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer


def extract_answer(text: str) -> str | None:
    """The answer on the last "Final answer:" line, cleaned; None when there is none.

    >>> extract_answer("12 + 30 = 42\\nFinal answer: 42.")
    '42'
    >>> extract_answer("Final answer:  1,234 ")
    '1234'
    >>> extract_answer("final answer: 7\\nFINAL ANSWER: **9.11**")
    '9.11'
    >>> extract_answer("The answer is 42.") is None
    True
    """
    matches = _FINAL.findall(text)
    return (_clean(matches[-1]) or None) if matches else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the completion's final answer equals `answer`: as numbers when both are, else as strings.

    >>> is_correct("9.90 > 9.11, so the larger is 9.9.\\nFinal answer: 9.90", "9.9")
    True
    >>> is_correct("Final answer: 9.11", "9.9")
    False
    >>> is_correct("Final answer: 1,000", "1000")
    True
    >>> is_correct("the answer is 9.9", "9.9")
    False
    """
    got = extract_answer(completion)
    if got is None:
        return False
    want = _clean(str(answer))
    if _NUMERIC.fullmatch(got) and _NUMERIC.fullmatch(want):
        try:
            return Decimal(got) == Decimal(want)
        except InvalidOperation:
            return False
    return got == want
