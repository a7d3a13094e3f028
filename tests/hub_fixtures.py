"""Small local copies of three Hugging Face hub datasets, laid out as their repository snapshots.

    write_ultrachat(d)       HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages; splits train_sft, test_sft,
                             train_gen, test_gen under data/
    write_ultrafeedback(d)   HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id, chosen, rejected, messages,
                             score_chosen, score_rejected; splits train_prefs, test_prefs, train_sft, test_sft,
                             train_gen, test_gen under data/
    write_gsm8k(d)           openai/gsm8k: question, answer (worked steps with <<a*b=c>> calculator annotations,
                             then "#### <number>"); configs main/ and socratic/, splits train and test

Each writes a README.md whose YAML front matter has the `configs:` and `dataset_info:` blocks the real
repositories have, and one parquet file per split with the real column names and types, so
`datasets.load_dataset(d, "main", split="train")` reads it exactly as it reads the hub name. The content
is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])


def _prompt_id(prompt: str) -> str:
    return hashlib.sha256(prompt.encode()).hexdigest()


def _write_repo(root: Path, pretty_name: str, configs: dict[str, dict[str, tuple[str, pa.Table]]]) -> Path:
    """configs: config name -> split -> (file path pattern prefix, table). Writes the files and the README."""
    root.mkdir(parents=True, exist_ok=True)
    config_entries, info_entries = [], []
    for config, splits in configs.items():
        data_files, split_info = [], []
        features = None
        for split, (folder, table) in splits.items():
            path = root / folder / f"{split}-00000-of-00001.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
            data_files.append({"split": split, "path": f"{folder}/{split}-*"})
            split_info.append({"name": split, "num_bytes": table.nbytes, "num_examples": table.num_rows})
            features = _features(table.schema)
        config_entries.append({"config_name": config, "data_files": data_files})
        info = {"features": features, "splits": split_info}
        info_entries.append({"config_name": config, **info} if len(configs) > 1 else info)
    front = {
        "language": ["en"],
        "license": "mit",
        "pretty_name": pretty_name,
        "configs": config_entries,
        "dataset_info": info_entries if len(configs) > 1 else info_entries[0],
    }
    body = f"# {pretty_name}\n\nA small local copy with the layout and columns of the hub dataset.\n"
    (root / "README.md").write_text("---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body)
    return root


def _features(schema: pa.Schema) -> list[dict]:
    out = []
    for f in schema:
        if pa.types.is_list(f.type):
            out.append({"name": f.name, "list": [{"name": k, "dtype": "string"} for k in ("content", "role")]})
        else:
            out.append({"name": f.name, "dtype": {pa.string(): "string", pa.float64(): "float64"}[f.type]})
    return out


def _messages_table(rows: list[dict], columns: dict[str, pa.DataType]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema(list(columns.items())))


# --- ultrachat_200k ---------------------------------------------------------------------------------------

TOPICS = [
    ("the water cycle", "Water evaporates from oceans and lakes, condenses into clouds and falls back as rain"),
    ("photosynthesis", "Plants use sunlight, water and carbon dioxide to make glucose and release oxygen"),
    ("compound interest", "Interest is added to the principal, so each period earns interest on earlier interest"),
    ("the French Revolution", "It began in 1789 and replaced the absolute monarchy with a republic"),
    ("how vaccines work", "A vaccine shows the immune system a harmless piece of a germ so it learns to fight it"),
    ("sourdough bread", "A starter of wild yeast and lactic acid bacteria leavens the dough and gives it its tang"),
    ("plate tectonics", "The crust is split into plates that drift a few centimetres a year on the mantle"),
    ("binary search", "It halves a sorted range at every step, so it needs about log2(n) comparisons"),
]
ASKS = [
    "Can you explain {topic} in simple terms?",
    "Write a short paragraph about {topic} for a school newsletter.",
    "What are the key facts about {topic}?",
]
FOLLOW_UPS = [
    ("Can you make it shorter?", "In one sentence: {fact_lower}."),
    ("Give me one example.", "For example: {fact}. That is the core idea in practice."),
]


def _ultrachat_rows(split: str, n: int) -> list[dict]:
    rng = random.Random(f"ultrachat:{split}")
    rows = []
    for i in range(n):
        topic, fact = TOPICS[(i + len(split)) % len(TOPICS)]
        prompt = rng.choice(ASKS).format(topic=topic)
        if i:
            prompt += f" (part {i + 1})"
        messages = [
            {"content": prompt, "role": "user"},
            {"content": f"Sure! {fact}. In short, {topic} is easier to follow step by step.", "role": "assistant"},
        ]
        for _ in range(rng.randint(0, 2)):  # multi-turn, as most ultrachat conversations are
            ask, reply = rng.choice(FOLLOW_UPS)
            messages.append({"content": ask, "role": "user"})
            messages.append(
                {"content": reply.format(fact=fact, fact_lower=fact[0].lower() + fact[1:]), "role": "assistant"}
            )
        rows.append({"prompt": prompt, "prompt_id": _prompt_id(prompt), "messages": messages})
    return rows


def write_ultrachat(dir, n_train: int = 8, n_test: int = 4) -> Path:
    """A HuggingFaceH4/ultrachat_200k snapshot: config default, splits train_sft / test_sft / train_gen /
    test_gen (data/<split>-*.parquet), columns prompt, prompt_id, messages [{content, role}]."""
    columns = {"prompt": pa.string(), "prompt_id": pa.string(), "messages": pa.list_(MESSAGE)}
    sizes = {"train_sft": n_train, "test_sft": n_test, "train_gen": n_train, "test_gen": n_test}
    splits = {s: ("data", _messages_table(_ultrachat_rows(s, n), columns)) for s, n in sizes.items()}
    return _write_repo(Path(dir), "UltraChat 200k", {"default": splits})


# --- ultrafeedback_binarized ----------------------------------------------------------------------------

QUESTIONS = [
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs, like insects."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra.", "Sydney is the capital."),
    (
        "Is a tomato a fruit or a vegetable?",
        "Botanically a tomato is a fruit: it grows from the flower and "
        "holds the seeds. Cooks treat it as a vegetable.",
        "A tomato is a vegetable.",
    ),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'.", "Buenas noches."),
    ("What does HTTP stand for?", "HTTP stands for HyperText Transfer Protocol.", "It means High Tech Transfer."),
    (
        "Why is the sky blue?",
        "Air molecules scatter short blue wavelengths of sunlight more than red ones "
        "(Rayleigh scattering), so the sky looks blue.",
        "Because it reflects the ocean.",
    ),
]


def _ultrafeedback_rows(split: str, n: int) -> list[dict]:
    rng = random.Random(f"ultrafeedback:{split}")
    rows = []
    for i in range(n):
        question, good, bad = QUESTIONS[(i + len(split)) % len(QUESTIONS)]
        prompt = question if i < len(QUESTIONS) else f"{question} Please answer briefly ({i + 1})."
        user = {"content": prompt, "role": "user"}
        chosen = [user, {"content": good, "role": "assistant"}]
        rejected = [user, {"content": bad, "role": "assistant"}]
        score_chosen = float(rng.choice([7.0, 8.0, 8.5, 9.0, 10.0]))
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": _prompt_id(prompt),
                "chosen": chosen,
                "rejected": rejected,
                "messages": chosen,
                "score_chosen": score_chosen,
                "score_rejected": score_chosen - rng.choice([1.0, 2.5, 4.0, 5.0]),
            }
        )
    return rows


def write_ultrafeedback(dir, n_train: int = 8, n_test: int = 4) -> Path:
    """A HuggingFaceH4/ultrafeedback_binarized snapshot: config default, splits train_prefs / test_prefs /
    train_sft / test_sft / train_gen / test_gen (data/<split>-*.parquet), columns prompt, prompt_id, chosen and
    rejected ([user, assistant] message lists, the user turn equal to prompt), messages, score_chosen,
    score_rejected."""
    columns = {
        "prompt": pa.string(),
        "prompt_id": pa.string(),
        "chosen": pa.list_(MESSAGE),
        "rejected": pa.list_(MESSAGE),
        "messages": pa.list_(MESSAGE),
        "score_chosen": pa.float64(),
        "score_rejected": pa.float64(),
    }
    names = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
    sizes = {s: n_train if s.startswith("train") else n_test for s in names}
    splits = {s: ("data", _messages_table(_ultrafeedback_rows(s, n), columns)) for s, n in sizes.items()}
    return _write_repo(Path(dir), "UltraFeedback Binarized", {"default": splits})


# --- gsm8k ------------------------------------------------------------------------------------------------


def _clips(rng: random.Random) -> tuple[str, list[tuple[str, str]], int]:
    a = 2 * rng.randint(12, 40)
    h, t = a // 2, a + a // 2
    name = rng.choice(["Natalia", "Priya", "Tomas"])
    question = (
        f"{name} sold clips to {a} of her friends in April, and then she sold half as many clips in May. "
        f"How many clips did {name} sell altogether in April and May?"
    )
    steps = [
        (f"How many clips did {name} sell in May?", f"{name} sold {a}/2 = <<{a}/2={h}>>{h} clips in May."),
        (
            f"How many clips did {name} sell altogether in April and May?",
            f"{name} sold {a}+{h} = <<{a}+{h}={t}>>{t} clips altogether in April and May.",
        ),
    ]
    return question, steps, t


def _wallet(rng: random.Random) -> tuple[str, list[tuple[str, str]], int]:
    cost = 20 * rng.randint(5, 10)
    half = cost // 2
    parents = 5 * rng.randint(1, (half - 5) // 15)  # what is left to pay stays positive
    grand = 2 * parents
    left = cost - half - grand - parents
    question = (
        f"Betty is saving money for a new wallet which costs ${cost}. Betty has only half of the money she needs. "
        f"Her parents decided to give her ${parents} for that purpose, and her grandparents twice as much as her "
        "parents. How much more money does Betty need to buy the wallet?"
    )
    steps = [
        (
            "How much money does Betty have?",
            f"In the beginning, Betty has only {cost} / 2 = $<<{cost}/2={half}>>{half}.",
        ),
        (
            "How much money did Betty's grandparents give her?",
            f"Betty's grandparents gave her {parents} * 2 = $<<{parents}*2={grand}>>{grand}.",
        ),
        (
            "How much more money does Betty need to buy the wallet?",
            f"This means, Betty needs {cost} - {half} - {grand} - {parents} = "
            f"$<<{cost}-{half}-{grand}-{parents}={left}>>{left} more.",
        ),
    ]
    return question, steps, left


def _letters(rng: random.Random) -> tuple[str, list[tuple[str, str]], int]:
    pages, friends = rng.randint(2, 5), rng.randint(2, 4)
    week, total = pages * 2 * friends, pages * 2 * friends * 52
    question = (
        f"James writes a {pages}-page letter to {friends} different friends twice a week. "
        "How many pages does he write a year?"
    )
    steps = [
        (
            "How many pages does he write each friend every week?",
            f"He writes each friend {pages}*2={pages * 2} pages a week",
        ),
        (
            "How many pages does he write every week?",
            f"So he writes {pages * 2}*{friends}=<<{pages * 2}*{friends}={week}>>{week} pages every week",
        ),
        (
            "How many pages does he write a year?",
            f"That means he writes {week}*52=<<{week}*52={total}>>{total} pages a year",
        ),
    ]
    return question, steps, total


def _earnings(rng: random.Random) -> tuple[str, list[tuple[str, str]], int]:
    rate, hours = rng.choice([12, 15, 18, 20]), rng.randint(3, 8)
    days = rng.randint(2, 5)
    daily, total = rate * hours, rate * hours * days
    question = (
        f"Weng earns ${rate} an hour for babysitting. She babysits {hours} hours a day for {days} days. "
        "How much does she earn?"
    )
    steps = [
        ("How much does Weng earn a day?", f"Weng earns {rate} * {hours} = $<<{rate}*{hours}={daily}>>{daily} a day."),
        (
            "How much does she earn in all?",
            f"In {days} days she earns {daily} * {days} = $<<{daily}*{days}={total}>>{total}.",
        ),
    ]
    return question, steps, total


PROBLEMS = (_clips, _wallet, _letters, _earnings)


def _gsm8k_rows(split: str, n: int, socratic: bool) -> list[dict]:
    rows = []
    for i in range(n):
        rng = random.Random(f"gsm8k:{split}:{i}")  # the same problem in main and socratic
        question, steps, answer = PROBLEMS[i % len(PROBLEMS)](rng)
        lines = [f"{q} ** {s}" if socratic else s for q, s in steps]
        rows.append({"question": question, "answer": "\n".join(lines) + f"\n#### {answer}"})
    return rows


def write_gsm8k(dir, n_train: int = 8, n_test: int = 4) -> Path:
    """An openai/gsm8k snapshot: configs main and socratic (no default), splits train and test
    (main/<split>-*.parquet, socratic/<split>-*.parquet), columns question and answer."""
    columns = {"question": pa.string(), "answer": pa.string()}
    configs = {
        config: {
            split: (config, _messages_table(_gsm8k_rows(split, n, config == "socratic"), columns))
            for split, n in (("train", n_train), ("test", n_test))
        }
        for config in ("main", "socratic")
    }
    return _write_repo(Path(dir), "Grade School Math 8K", configs)
