"""The task world's four kinds of task: generators (rng, level) -> (question, answer, reasoning steps).

    from aligner.data.world_tasks import GENERATORS
    question, answer, steps = GENERATORS["arithmetic"](random.Random(0), 2)

  arithmetic   add / subtract / multiply; more digits at higher levels, two operations at level 4
  compare      which number is larger: whole numbers, decimals, the 9.9 vs 9.11 trap, three numbers
  letters      how many times a letter appears in a word (level 4: in two words)
  word         short word problems about people and objects, one to three steps

Splits, the held-out filter and every rendering of the tasks are in aligner.data.world.
"""

from __future__ import annotations

import random
from pathlib import Path


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


def compare_steps(nums: list[str], best: str) -> list[str]:
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
    return question, best, compare_steps(nums, best)


# Words for the letter-counting tasks, one per line.
_WORD_LIST = (Path(__file__).with_name("words.txt")).read_text()
WORDS = sorted(set(_WORD_LIST.split()))
_LETTER_POOLS = {
    1: [w for w in WORDS if len(w) <= 5],
    2: [w for w in WORDS if 6 <= len(w) <= 8],
    3: [w for w in WORDS if len(w) >= 9],
}
_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def letter_steps(text: str, letter: str, positions: list[int]) -> list[str]:
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
    return question, str(len(positions)), letter_steps(text, letter, positions)


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
