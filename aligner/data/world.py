"""The built-in task world: deterministic tasks with verifiable answers, rendered for every stage.

    aligner pretrain                 # data.source: world:pretrain
    data: {source: world:sft}        # chat conversations; also world:preference and world:rl

Four kinds of task, each at difficulty levels 1 (easy) to 4 (hard):
  arithmetic   add / subtract / multiply; more digits and two-step expressions at higher levels
  compare      which number is larger, including the 9.9 vs 9.11 trap and three-way comparisons
  letters      how many times a letter appears in a word (or two words)
  word         short word problems about people and objects, one to three steps

Every task has a question, a list of reasoning steps and an answer. A task's split (train / val /
test) is a function of a hash of its question text alone, so no question ever appears in two
splits, whatever the rendering: the pretraining corpus, SFT conversations, preference pairs and RL
prompts of the train split never contain a val or test question.

`extract_answer` and `is_correct` are the one answer checker: rewards and evals use them too.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

KINDS = ("arithmetic", "compare", "letters", "word")
LEVELS = (1, 2, 3, 4)
SPLITS = ("train", "val", "test")
SYSTEM_PROMPT = (Path(__file__).resolve().parents[2] / "prompts" / "system.txt").read_text().strip()
DEFAULT_ROWS = {"train": 20000, "val": 1000, "test": 1000}


@dataclass(frozen=True)
class Task:
    id: str
    kind: str
    level: int
    question: str
    answer: str
    steps: tuple[str, ...]

    def solution(self) -> str:
        """The well-formed assistant reply: reasoning steps, then the final-answer line."""
        return "\n".join(self.steps) + f"\nFinal answer: {self.answer}"


def split_of(question: str) -> str:
    """val for 5% of questions, test for 5%, train for the rest, by a stable hash of the text."""
    normalised = " ".join(question.lower().split())
    bucket = int(hashlib.sha256(normalised.encode()).hexdigest()[:8], 16) % 100
    return "val" if bucket < 5 else "test" if bucket < 10 else "train"


# --- task generators ------------------------------------------------------------------------------


def _arithmetic(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    if level == 1:
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        if rng.random() < 0.5:
            return f"What is {a} + {b}?", str(a + b), [f"{a} + {b} = {a + b}"]
        a, b = max(a, b), min(a, b)
        return f"What is {a} - {b}?", str(a - b), [f"{a} - {b} = {a - b}"]
    if level == 2:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            return f"What is {a} * {b}?", str(a * b), [f"{a} * {b} = {a * b}"]
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return _add_sub(a, b, op)
    if level == 3:
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(13, 99), rng.randint(3, 9)
            tens, ones = a // 10 * 10, a % 10
            steps = [f"{a} * {b} = {tens} * {b} + {ones} * {b}", f"{tens * b} + {ones * b} = {a * b}"]
            return f"What is {a} * {b}?", str(a * b), steps
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return _add_sub(a, b, op)
    a, b, c = rng.randint(10, 60), rng.randint(10, 60), rng.randint(3, 9)
    if rng.random() < 0.5:
        s = a + b
        return f"What is ({a} + {b}) * {c}?", str(s * c), [f"{a} + {b} = {s}", f"{s} * {c} = {s * c}"]
    p = a * c
    return f"What is {a} * {c} - {b}?", str(p - b), [f"{a} * {c} = {p}", f"{p} - {b} = {p - b}"]


def _add_sub(a: int, b: int, op: str) -> tuple[str, str, list[str]]:
    if op == "-":
        a, b = max(a, b), min(a, b)
        hundreds = b // 100 * 100
        steps = (
            [f"{a} - {b} = {a - b}"]
            if b < 100
            else [f"{a} - {hundreds} = {a - hundreds}", f"{a - hundreds} - {b - hundreds} = {a - b}"]
        )
        return f"What is {a} - {b}?", str(a - b), steps
    tens_a, tens_b = a // 10 * 10, b // 10 * 10
    steps = [
        f"{tens_a} + {tens_b} = {tens_a + tens_b}",
        f"{a % 10} + {b % 10} = {a % 10 + b % 10}",
        f"{tens_a + tens_b} + {a % 10 + b % 10} = {a + b}",
    ]
    return f"What is {a} + {b}?", str(a + b), steps


def _decimal(rng: random.Random, whole: int, places: int) -> str:
    return f"{whole}.{rng.randint(1, 10**places - 1):0{places}d}".rstrip("0")


def _compare(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    if level == 1:
        a, b = rng.sample(range(0, 100), 2)
        nums = [str(a), str(b)]
    elif level == 2:
        w = rng.randint(0, 20)
        nums = [_decimal(rng, w + rng.randint(0, 1), 1), _decimal(rng, w, 1)]
    else:  # same whole part, different numbers of decimal places: the 9.9 vs 9.11 trap
        w = rng.randint(0, 20)
        nums = [_decimal(rng, w, 1), _decimal(rng, w, 2)]
        if level == 4:
            nums.append(_decimal(rng, w, 3))
    nums = list(dict.fromkeys(nums))
    if len(nums) < 2 or len({float(x) for x in nums}) < len(nums):
        return _compare(rng, level)
    rng.shuffle(nums)
    best = max(nums, key=float)
    width = max(len(x.split(".")[1]) if "." in x else 0 for x in nums)
    padded = [f"{float(x):.{width}f}" for x in nums]
    steps = []
    if width:
        steps.append("Write them with the same number of decimal places: " + ", ".join(padded) + ".")
    if width:
        steps.append(f"The largest is {float(best):.{width}f}, which is {best}.")
    else:
        steps.append(f"{best} is the largest.")
    if len(nums) == 2:
        question = f"Which is larger: {nums[0]} or {nums[1]}?"
    else:
        question = f"Which is the largest: {', '.join(nums[:-1])} or {nums[-1]}?"
    return question, best, steps


WORDS = """apple banana cherry grape lemon mango melon orange peach pear plum berry strawberry raspberry
blueberry coconut pineapple avocado tomato potato carrot pepper onion garlic lettuce cabbage broccoli
spinach celery pumpkin cucumber zucchini mushroom almond peanut walnut cashew hazelnut butter cheese
bread pasta rice noodle cookie muffin pancake waffle biscuit cracker sandwich burger pizza salad soup
coffee tea juice water milk sugar honey salt vinegar mustard ketchup mayonnaise cinnamon vanilla
chocolate caramel marshmallow lollipop bubble balloon banner basket bottle bucket button candle carpet
castle circle cotton curtain desert dinner doctor dollar dragon engine feather finger flower forest
garden guitar hammer harbor helmet island jacket kettle kitten ladder letter lizard magnet marble
mirror monkey needle office paddle parrot pebble pencil pillow planet pocket puzzle rabbit riddle
rocket saddle school shadow silver spider spirit summer sunset supper tennis ticket tiger toffee
tunnel turtle velvet violin wallet window winter wizard yellow zipper apartment assessment bookkeeper
committee coffee mississippi tennessee necessary occasion possession accommodation address embarrass
millennium parallel balloon broccoli cappuccino giraffe hippopotamus kangaroo penguin elephant
butterfly dragonfly grasshopper caterpillar hummingbird woodpecker alligator chimpanzee crocodile
flamingo mosquito porcupine rhinoceros squirrel tarantula umbrella volleyball basketball baseball
football skateboard snowflake thunderstorm rainbow waterfall mountain volcano glacier canyon meadow
river ocean island lagoon valley prairie tundra savanna jungle""".split()
WORDS = list(dict.fromkeys(WORDS))


def _letters(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    lengths = {1: (3, 5), 2: (6, 8), 3: (9, 20), 4: (3, 20)}[level]
    pool = [w for w in WORDS if lengths[0] <= len(w) <= lengths[1]]
    text = rng.choice(pool)
    if level == 4:
        text = f"{text} {rng.choice(WORDS)}"
    letters = [c for c in text if c != " "]
    # usually a letter that occurs (often twice or more), sometimes one that does not
    letter = rng.choice(letters) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = text.count(letter)
    spelled = " ".join("-".join(word) for word in text.split())
    positions = [str(i + 1) for i, c in enumerate(letters) if c == letter]
    steps = [f"Spell it out: {spelled}."]
    if positions:
        steps.append(f"The letter {letter} is at positions {', '.join(positions)}.")
    steps.append(f"So {letter} appears {count} time{'s' if count != 1 else ''}.")
    return f'How many times does the letter "{letter}" appear in "{text}"?', str(count), steps


NAMES = "Mia Leo Ava Noah Emma Liam Zoe Omar Ivy Ben Lucy Sam Nora Eli Ruby Max Ada Kai Lily Finn".split()
THINGS = "apples pencils marbles stickers cookies books coins shells cards balloons stamps candies".split()


def _word(rng: random.Random, level: int) -> tuple[str, str, list[str]]:
    a, b = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    if level == 1:
        x, y = rng.randint(1, 20), rng.randint(1, 20)
        q = f"{a} has {x} {thing}. {b} gives {a} {y} more. How many {thing} does {a} have now?"
        return q, str(x + y), [f"{a} starts with {x} and gets {y} more: {x} + {y} = {x + y}"]
    if level == 2:
        x = rng.randint(10, 60)
        y = rng.randint(1, x)
        q = f"{a} has {x} {thing}. {a} gives {y} to {b}. How many {thing} does {a} have left?"
        return q, str(x - y), [f"{a} gives away {y} of {x}: {x} - {y} = {x - y}"]
    if level == 3:
        k, n = rng.randint(2, 9), rng.randint(3, 12)
        q = f"{a} buys {k} boxes of {thing}. Each box holds {n} {thing}. How many {thing} does {a} buy?"
        return q, str(k * n), [f"{k} boxes of {n} each: {k} * {n} = {k * n}"]
    x, k, n = rng.randint(5, 30), rng.randint(2, 6), rng.randint(3, 10)
    total = x + k * n
    y = rng.randint(1, total - 1)
    q = (
        f"{a} has {x} {thing} and buys {k} packs of {n}. Then {a} gives {y} to {b}. "
        f"How many {thing} does {a} have now?"
    )
    steps = [f"The packs hold {k} * {n} = {k * n}", f"{x} + {k * n} = {total}", f"{total} - {y} = {total - y}"]
    return q, str(total - y), steps


GENERATORS = {"arithmetic": _arithmetic, "compare": _compare, "letters": _letters, "word": _word}


def make_task(rng: random.Random, kind: str, level: int) -> Task:
    question, answer, steps = GENERATORS[kind](rng, level)
    tid = hashlib.sha256(question.encode()).hexdigest()[:12]
    return Task(tid, kind, level, question, answer, tuple(steps))


def tasks(split: str, n: int, seed: int = 0, levels=LEVELS, kinds=KINDS, stream: str = "") -> list[Task]:
    """`n` tasks of `split`, unique by question while the task space allows, deterministic by seed."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}' (use one of {', '.join(SPLITS)})")
    rng = random.Random(f"{seed}:{split}:{stream}")
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        task = make_task(rng, rng.choice(kinds), rng.choice(levels))
        if split_of(task.question) != split:
            continue
        if task.question in seen and attempts < 50 * n:
            continue
        seen.add(task.question)
        out.append(task)
    return out


# --- renderings -----------------------------------------------------------------------------------


def _meta(t: Task) -> dict:
    return {"answer": t.answer, "kind": t.kind, "level": t.level, "id": t.id}


def prompt_messages(t: Task) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": t.question}]


def _worked(rng: random.Random, t: Task) -> str:
    style = rng.randrange(3)
    if style == 0:
        return f"Question: {t.question}\n" + t.solution()
    if style == 1:
        return f"Q: {t.question}\nA: " + " ".join(t.steps) + f"\nFinal answer: {t.answer}"
    return f"{t.question} Let us work it out. " + " ".join(t.steps) + f" The answer is {t.answer}."


def pretrain_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Plain-text documents of 3 to 6 worked problems each, in varied phrasings."""
    n = DEFAULT_ROWS[split] if n is None else n
    pool = tasks(split, n * 4, seed, levels, stream="pretrain")
    rng = random.Random(f"{seed}:{split}:pretrain-docs")
    docs, i = [], 0
    while len(docs) < n:
        k = rng.randint(3, 6)
        chunk = [pool[(i + j) % len(pool)] for j in range(k)]
        i += k
        docs.append({"text": "\n\n".join(_worked(rng, t) for t in chunk)})
    return docs


def sft_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    n = DEFAULT_ROWS[split] if n is None else n
    rows = []
    for t in tasks(split, n, seed, levels, stream="sft"):
        messages = prompt_messages(t) + [{"role": "assistant", "content": t.solution()}]
        rows.append({"messages": messages, **_meta(t)})
    return rows


def _wrong_answer(rng: random.Random, t: Task) -> str:
    if t.kind == "compare":
        nums = re.findall(r"\d+(?:\.\d+)?", t.question.split(":", 1)[1])
        wrong = rng.choice([x for x in nums if x != t.answer])
    else:
        wrong = str(int(t.answer) + rng.choice([-2, -1, 1, 2, 10]))
        if wrong == t.answer or wrong.startswith("-"):
            wrong = str(int(t.answer) + 1)
    steps = list(t.steps)
    steps[-1] = steps[-1].replace(t.answer, wrong) if t.answer in steps[-1] else steps[-1]
    return "\n".join(steps) + f"\nFinal answer: {wrong}"


def preference_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """chosen = correct and well formed; rejected = wrong answer, wrong format, or no reasoning."""
    n = DEFAULT_ROWS[split] if n is None else n
    rng = random.Random(f"{seed}:{split}:preference-rejections")
    rows = []
    for t in tasks(split, n, seed, levels, stream="preference"):
        kind = rng.choice(["wrong_answer", "wrong_answer", "wrong_format", "no_reasoning"])
        if kind == "wrong_answer":
            rejected = _wrong_answer(rng, t)
        elif kind == "wrong_format":
            rejected = " ".join(t.steps) + f" So it is {t.answer}."
        else:
            rejected = f"Final answer: {t.answer}"
        rows.append(
            {
                "prompt": prompt_messages(t),
                "chosen": [{"role": "assistant", "content": t.solution()}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "rejection": kind,
                **_meta(t),
            }
        )
    return rows


def rl_rows(split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    n = DEFAULT_ROWS[split] if n is None else n
    return [{"prompt": prompt_messages(t), **_meta(t)} for t in tasks(split, n, seed, levels, stream="rl")]


RENDERINGS = {"pretrain": pretrain_rows, "sft": sft_rows, "preference": preference_rows, "rl": rl_rows}


def world_rows(kind: str, split: str = "train", n: int | None = None, seed: int = 0, levels=LEVELS) -> list[dict]:
    """Rows of one rendering of the task world (kind: pretrain, sft, preference or rl)."""
    from aligner.errors import DataError

    if kind not in RENDERINGS:
        raise DataError(f"data.source: unknown task-world kind '{kind}' (use one of {', '.join(RENDERINGS)})")
    if split not in SPLITS:
        raise DataError(f"data split '{split}' is not a task-world split (use one of {', '.join(SPLITS)})")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise DataError(f"data.world_levels must be a non-empty subset of {list(LEVELS)}, got {list(levels)}")
    return RENDERINGS[kind](split, n, seed, tuple(levels))


# --- the answer checker ---------------------------------------------------------------------------

_FINAL = re.compile(r"final answer\s*[:=]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The answer on the last "Final answer:" line, normalised; None when there is none.

    >>> extract_answer("12 + 30 = 42\\nFinal answer: 42.")
    '42'
    >>> extract_answer("Final answer: 1,234 ")
    '1234'
    >>> extract_answer("The answer is 42.") is None
    True
    """
    matches = _FINAL.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip().rstrip(".").strip().strip('"').strip()
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer):
        answer = answer.replace(",", "")
    return answer or None


def is_correct(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals `answer` (numerically when both are numbers).

    >>> is_correct("9.90 > 9.11\\nFinal answer: 9.9", "9.9")
    True
    >>> is_correct("Final answer: 9.11", "9.9")
    False
    >>> is_correct("no final line 9.9", "9.9")
    False
    """
    got = extract_answer(completion)
    if got is None:
        return False
    try:
        return float(got) == float(answer)
    except ValueError:
        return got.strip().lower() == str(answer).strip().lower()
