"""The built-in task world: deterministic tasks with verifiable answers, rendered for every stage.

    aligner pretrain                 # data.source: world:pretrain
    data: {source: world:sft}        # chat conversations; also world:preference and world:rl

Four kinds of task, each at difficulty levels 1 (easy) to 4 (hard):
  arithmetic   add / subtract / multiply; more digits at higher levels, two operations at level 4
  compare      which number is larger: whole numbers, decimals, the 9.9 vs 9.11 trap, three numbers
  letters      how many times a letter appears in a word (level 4: in two words)
  word         short word problems about people and objects, one to three steps

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
from pathlib import Path

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


# --- task generators: (rng, level) -> (question, answer, steps) -------------------------------------


def _add_chain(a: int, b: int, op: str) -> list[str]:
    """a + b (or a - b) by adding (subtracting) b's hundreds, tens and ones in turn."""
    steps, acc = [], a
    for part in (b // 100 * 100, b // 10 % 10 * 10, b % 10):
        if part:
            new = acc + part if op == "+" else acc - part
            steps.append(f"{acc} {op} {part} = {new}")
            acc = new
    return steps or [f"{a} {op} {b} = {a}"]


def _times(a: int, c: int) -> list[str]:
    """a * c, splitting a two-digit a into tens and ones."""
    if a < 13 or a % 10 == 0:
        return [f"{a} * {c} = {a * c}"]
    t, o = a // 10 * 10, a % 10
    return [f"{a} * {c} = {t} * {c} + {o} * {c}", f"{t} * {c} = {t * c}", f"{o} * {c} = {o * c}",
            f"{t * c} + {o * c} = {a * c}"]  # fmt: skip


def _arithmetic(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    r = rng.randint
    if level == 1:
        a, b, op = r(0, 40), r(0, 40), rng.choice("+-")
        if op == "-" and a < b:
            a, b = b, a
        c = a + b if op == "+" else a - b
        return f"What is {a} {op} {b}?", str(c), [f"{a} {op} {b} = {c}"]
    if level in (2, 3):
        op = rng.choice("+-*")
        if op == "*":
            a, b = (r(2, 12), r(2, 12)) if level == 2 else (r(13, 99), r(3, 9))
            return f"What is {a} * {b}?", str(a * b), _times(a, b)
        lo, hi = (10, 99) if level == 2 else (100, 999)
        a, b = r(lo, hi), r(lo, hi)
        if op == "-" and a < b:
            a, b = b, a
        return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b), _add_chain(a, b, op)
    a, b, c, form = r(10, 99), r(10, 99), r(2, 9), r(0, 2)
    if form == 0:
        s = a + b
        return f"What is ({a} + {b}) * {c}?", str(s * c), [f"{a} + {b} = {s}", *_times(s, c)]
    if form == 1:
        a, b = max(a, b), min(a, b)
        s = a - b
        return f"What is ({a} - {b}) * {c}?", str(s * c), [f"{a} - {b} = {s}", *_times(s, c)]
    p = a * c
    if b > p:
        b = r(1, p)
    return f"What is {a} * {c} - {b}?", str(p - b), [*_times(a, c), f"{p} - {b} = {p - b}"]


def _decimal(rng: random.Random, whole: int, places: int) -> str:
    return f"{whole}.{rng.randint(1, 10**places - 1):0{places}d}".rstrip("0")


def _places(x: str) -> int:
    return len(x) - x.index(".") - 1 if "." in x else 0


def _compare_steps(nums: list[str], best: str) -> list[str]:
    """Pad to a common number of decimal places, then order: `best` first (a wrong claim when it is not)."""
    places = [_places(x) for x in nums]
    width = max(places)
    padded = {x: (x if "." in x or not width else x + ".") + "0" * (width - p) for x, p in zip(nums, places)}
    ordered = [best] + sorted((x for x in nums if x != best), key=float, reverse=True)
    steps = []
    if min(places) != width:
        s = "s" if width > 1 else ""
        steps.append(f"Write them with {width} decimal place{s}: {', '.join(padded[x] for x in nums)}.")
    word = "larger" if len(nums) == 2 else "largest"
    steps.append(f"{' > '.join(padded[x] for x in ordered)}, so the {word} is {best}.")
    return steps


def _compare(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    if level == 1:
        nums = [str(x) for x in rng.sample(range(100), 2)]
    else:
        w = rng.randint(0, 20)
        if level == 2:
            nums = [_decimal(rng, w + rng.randint(0, 1), 1), _decimal(rng, w, 1)]
        else:  # same whole part, different numbers of decimal places: the 9.9 vs 9.11 trap
            nums = [_decimal(rng, w, 1), _decimal(rng, w, 2)] + ([_decimal(rng, w, 3)] if level == 4 else [])
        if len({float(x) for x in nums}) < len(nums):  # floats order these short decimals exactly
            return _compare(rng, level)
        rng.shuffle(nums)
    best = max(nums, key=float)
    if len(nums) == 2:
        question = f"Which is larger: {nums[0]} or {nums[1]}?"
    else:
        question = f"Which is the largest: {nums[0]}, {nums[1]} or {nums[2]}?"
    return question, best, _compare_steps(nums, best)


# Words for the letter-counting tasks, one per line.
_WORD_LIST = (Path(__file__).with_name("words.txt")).read_text()
WORDS = sorted(set(_WORD_LIST.split()))
_LETTER_POOLS = {
    1: [w for w in WORDS if len(w) <= 5],
    2: [w for w in WORDS if 6 <= len(w) <= 8],
    3: [w for w in WORDS if len(w) >= 9],
}
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _letter_steps(text: str, letter: str, positions: list[int]) -> list[str]:
    spelled = " ".join("-".join(word) for word in text.split())
    steps = [f"Spell it out: {spelled}."]
    if positions:
        where = ", ".join(map(str, positions))
        steps.append(f"The letter {letter} is at position{'s' if len(positions) > 1 else ''} {where}.")
    count = len(positions)
    steps.append(f"So {letter} appears {count} time{'' if count == 1 else 's'}.")
    return steps


def _letters(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    text = rng.choice(WORDS) + " " + rng.choice(WORDS) if level == 4 else rng.choice(_LETTER_POOLS[level])
    # mostly a letter of the text (so letters that repeat come up often), sometimes any letter at all
    letter = rng.choice(text.replace(" ", "")) if rng.random() < 0.8 else rng.choice(_ALPHABET)
    positions = [i + 1 for i, c in enumerate(text.replace(" ", "")) if c == letter]
    question = f'How many times does the letter "{letter}" appear in "{text}"?'
    return question, str(len(positions)), _letter_steps(text, letter, positions)


SHE = "Mia Ava Emma Zoe Ivy Lucy Nora Ruby Ada Lily Sara Maya Elena Rosa Hana Chloe Grace Amara".split()
HE = "Leo Noah Liam Omar Ben Sam Eli Max Kai Finn Hugo Ravi Theo Jonas Felix Mateo Owen Arjun".split()
THINGS = """apples pencils marbles stickers cookies books coins shells cards balloons stamps candies crayons
buttons beads rocks erasers oranges muffins seeds""".split()


def _word(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    a, b = rng.sample(SHE + HE, 2)
    pron = "She" if a in SHE else "He"
    thing = rng.choice(THINGS)
    r, form = rng.randint, rng.random() < 0.5
    if level == 1:
        x, y = r(1, 20), r(1, 20)
        if form:
            q = f"{a} has {x} {thing}. {b} gives {a} {y} more. How many {thing} does {a} have now?"
        else:
            q = f"{a} finds {x} {thing} in the morning and {y} after lunch. How many {thing} does {a} find in all?"
        return q, str(x + y), [f"{a} has {x} and gets {y} more: {x} + {y} = {x + y}"]
    if level == 2:
        x = r(10, 60)
        y = r(1, x)
        if form:
            q = f"{a} has {x} {thing}. {pron} gives {y} to {b}. How many {thing} does {a} have now?"
        else:
            q = f"There are {x} {thing} in a box. {a} takes out {y}. How many {thing} are left in the box?"
        return q, str(x - y), [f"{y} of the {x} are gone: {x} - {y} = {x - y}"]
    if level == 3:
        k, n = r(2, 9), r(3, 12)
        if form:
            q = f"{a} buys {k} bags of {thing}. Each bag holds {n} {thing}. How many {thing} does {a} buy?"
        else:
            q = f"{a} puts {thing} in {k} rows with {n} in each row. How many {thing} are there?"
        return q, str(k * n), [f"{k} groups of {n}: {k} * {n} = {k * n}"]
    if form:
        x, k, n = r(5, 30), r(2, 6), r(3, 10)
        total = x + k * n
        y = r(1, total - 1)
        q = (
            f"{a} has {x} {thing} and buys {k} packs of {n}. Then {pron.lower()} gives {y} to {b}. "
            f"How many {thing} does {a} have now?"
        )
        steps = [f"The packs hold {k} * {n} = {k * n}", f"{x} + {k * n} = {total}", f"{total} - {y} = {total - y}"]
        return q, str(total - y), steps
    x, d = r(5, 40), r(2, 20)
    q = f"{a} has {x} {thing}. {b} has {d} more {thing} than {a}. How many {thing} do they have together?"
    return q, str(2 * x + d), [f"{b} has {x} + {d} = {x + d}", f"Together: {x} + {x + d} = {2 * x + d}"]


GENERATORS = {"arithmetic": _arithmetic, "compare": _compare, "letters": _letters, "word": _word}
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
        steps = _compare_steps(nums, wrong)
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
        steps = _letter_steps(text, letter, positions)
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
