"""The one data-loading entry every trainer uses: the built-in task world, local files, or the hub.

    data:
      source: world:sft            # the task world (kinds: pretrain, sft, preference, rl)
      source: data/train.jsonl     # a local .jsonl / .json / .parquet / .csv / .txt file,
      source: data/                #   a directory of them (sorted, recursive), or a glob (data/*.parquet)
      source: snapshots/gsm8k      # a dataset repository snapshot (README.md front matter with configs:)
      source: org/dataset          # anything else shaped like a hub name: a Hugging Face hub dataset
      subset: main                 # the config of a hub dataset or snapshot (openai/gsm8k: main, socratic)
      columns: {question: prompt}  # renames applied to every row right after loading
      streaming: true              # read only the rows asked for (data.num_rows), not the whole dataset

Hub names go to `datasets.load_dataset(name, subset, split=split)`. So does a local directory that is a
dataset repository snapshot (a README.md whose YAML front matter has `configs:` or `dataset_info:`, as every
hub dataset repository has): a downloaded snapshot of openai/gsm8k loads exactly like the hub name, with the
same config and split names. Any other directory, and every file, goes through
`datasets.load_dataset(<builder>, data_files=...)` and is one split: `split` and `subset` select nothing
there (point `eval_source` at a second file). A .txt or .md file is one document, split further wherever a
line holds only `<|endoftext|>`: the text between separators becomes one row {text_field: document}.

Rows come back as a list of plain dicts, the first `n` when `n` is given; with `streaming`
(`datasets.load_dataset(..., streaming=True)`) only those `n` rows are read, so a dataset too large to
download whole can be used. `columns` renames columns (old -> new) in every row after loading; a column
already named like a target gives way to the renamed one. Every failure is a `DataError` with a one-line
message naming the source: a missing file, an unknown config or split (with the ones there are), a column
to rename that the rows lack (with the columns they have).

`mix_rows` draws a weighted mixture from several sources' rows (`data.mix`): weights are relative shares of
the training rows; with a total n, source i gives round(n * w_i / sum w) rows, a seeded random sample of its
rows, repeated (with a printed notice) when it has fewer than its share; without one, n is the largest total
for which no row repeats. The mixed rows are shuffled together.
"""

from __future__ import annotations

import codecs
import glob
import itertools
import json
import logging
import math
import random
import re
from pathlib import Path

import yaml

from aligner.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = {".txt", ".md"}
DOC_SEPARATOR = "<|endoftext|>"
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "name" or "org/name"; anything else is a path


def load_rows(
    source: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    levels=(1, 2, 3, 4),
    world_kind: str = "sft",
    text_field: str = "text",
    subset: str | None = None,
    streaming: bool = False,
    columns: dict[str, str] | None = None,
) -> list[dict]:
    """Rows of `source` (split `split`), at most the first `n`, columns renamed by `columns` (old -> new).
    Raises DataError with one line.

    `seed`, `levels` and `world_kind` only concern the task world; `text_field` only .txt files; `subset` (a
    config name) only hub datasets and snapshot directories. `streaming` reads just the first `n` rows.
    """
    if streaming and n is None:
        raise DataError(f"data source '{source}': streaming reads only the first rows; set data.num_rows")
    if source == "world" or source.startswith("world:"):
        from aligner.data import world

        kind = source.split(":", 1)[1] if ":" in source else world_kind
        rows = world.world_rows(kind, split=split, n=n, seed=seed, levels=tuple(levels))
    elif (repo := _dataset_repo(source)) is not None:
        rows = _load_dataset(str(repo), source, split, subset, streaming, n)
    else:
        files = _local_files(source)
        if files is None:
            rows = _load_dataset(source, source, split, subset, streaming, n)
        else:
            rows = []
            for f in files:
                rows.extend(_read_file(f, text_field, None if n is None else n - len(rows), streaming))
                if n is not None and len(rows) >= n:
                    break
    if n is not None:
        rows = rows[:n]
    if not rows:
        raise DataError(f"data source '{source}' (split {split}) has no rows; check the file or the split")
    return rename_columns(rows, columns, source) if columns else rows


def rename_columns(rows: list[dict], columns: dict[str, str], source: str = "dataset") -> list[dict]:
    """Rows with their columns renamed, old -> new (a column already named like a target gives way). A column
    to rename that a row lacks is a DataError naming it and listing the row's columns."""
    targets = set(columns.values())
    out = []
    for i, row in enumerate(rows):
        for old, new in columns.items():
            if old not in row:
                where = f"data source '{source}'" + (f" row {i + 1}" if i else "")
                raise DataError(
                    f"{where} has no column '{old}' to rename to '{new}' (columns: {', '.join(sorted(row))}); "
                    "fix data.columns"
                )
        out.append({columns.get(k, k): v for k, v in row.items() if k in columns or k not in targets})
    return out


def mix_shares(weights: list[float], n: int) -> list[int]:
    """Rows per source for a mix of `n` rows: round(n * w_i / sum w).

    >>> mix_shares([3, 1], 10)
    [8, 2]
    """
    total = sum(weights)
    return [round(n * w / total) for w in weights]


def mix_rows(
    parts: list[list[dict]], weights: list[float], n: int | None = None, seed: int = 0, names: list[str] | None = None
) -> list[dict]:
    """A weighted mixture of several sources' rows, shuffled together with `seed`.

    Weights are relative shares. With `n`, source i gives round(n * w_i / sum w) rows (`mix_shares`): a random
    sample of its rows (seeded by `seed` and i), or, when it has fewer rows than its share, all of them as
    often as they fit and a random sample for the rest, with a printed notice. Without `n`, n is the largest
    total whose exact shares fit every source, min_i floor(len_i * sum w / w_i), so no row repeats. A repeated
    row is the same dict object each time (so a held-out row can take its copies out of training too).
    """
    names = names or [f"source {i}" for i in range(len(parts))]
    if not parts or len(weights) != len(parts) or min(weights) <= 0:
        raise DataError("data.mix needs one positive weight per source")
    if n is None:
        total = sum(weights)
        n = min(math.floor(len(rows) * total / w) for rows, w in zip(parts, weights))
    mixed = []
    for i, (rows, share) in enumerate(zip(parts, mix_shares(weights, n))):
        rng = random.Random(f"{seed}:mix:{i}")
        if share <= len(rows):
            mixed.extend(rng.sample(rows, share))
            continue
        print(f"data.mix: {names[i]} has {len(rows)} rows for a share of {share}; its rows repeat", flush=True)
        mixed.extend(rows * (share // len(rows)) + rng.sample(rows, share % len(rows)))
    random.Random(seed).shuffle(mixed)
    return mixed


def _supported(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in BUILDERS or suffix in TEXT_SUFFIXES


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _dataset_repo(source: str) -> Path | None:
    """The directory, when `source` is a dataset repository snapshot: a README.md with `configs:` or
    `dataset_info:` in its YAML front matter (every hub dataset repository has one)."""
    p = Path(source).expanduser()
    readme = p / "README.md"
    if not (p.is_dir() and readme.is_file()):
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    front = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.DOTALL)
    if front is None:
        return None
    try:
        meta = yaml.safe_load(front.group(1))
    except yaml.YAMLError:
        return None
    return p if isinstance(meta, dict) and ("configs" in meta or "dataset_info" in meta) else None


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, or None when it is a hub name."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f) and not _hidden(f, p))
        if not files:
            raise DataError(f"data source '{source}' is a directory with no .jsonl/.json/.parquet/.csv/.txt files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"data source '{source}' matches no files")
        return files
    if p.is_file():
        return [p]
    if _supported(p) or not _HUB_NAME.fullmatch(source) or source.startswith("."):
        raise DataError(f"data source: file '{source}' not found (relative paths start at {Path.cwd()})")
    return None


def _read_file(path: Path, text_field: str, limit: int | None = None, streaming: bool = False) -> list[dict]:
    """The file's rows; with `streaming`, only the first `limit` are read."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            _check_utf8(path)
            raise
        docs = re.split(rf"^{re.escape(DOC_SEPARATOR)}[ \t]*$", text, flags=re.MULTILINE)
        return [{text_field: d.strip("\n")} for d in docs if d.strip()]
    if suffix not in BUILDERS:
        raise DataError(f"data source '{path}': unsupported file type '{suffix}' (use jsonl, json, parquet, csv, txt)")
    if path.stat().st_size == 0:
        return []
    import datasets

    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")  # its readers log a malformed file's error too: the one line below says it
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train", streaming=streaming)
        return [dict(row) for row in itertools.islice(ds, limit)] if streaming else ds.to_list()
    except Exception as e:  # datasets raises many types for malformed files, some only while rows are read
        if suffix != ".parquet":
            _check_utf8(path)
        if suffix == ".jsonl":
            _check_jsonl(path)
        raise DataError(f"data source '{path}' could not be read as {suffix[1:]}: {_first_line(e)}") from None
    finally:
        logger.setLevel(level)


def _check_utf8(path: Path) -> None:
    """Name the first byte of a text file that is not UTF-8, with its line (read in chunks, any size)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as f:
        while True:
            chunk = f.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                at = offset - pending + e.start  # e.start counts the bytes held over from the last chunk too
                line += chunk[: max(0, e.start - pending)].count(b"\n")
                raise DataError(
                    f"data source '{path}' is not UTF-8: byte {at} (line {line}) is 0x{e.object[e.start]:02x} "
                    f"({e.reason}); save the file as UTF-8"
                ) from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


def _check_jsonl(path: Path) -> None:
    """Name the first malformed line of a file datasets could not read (its own error does not)."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data source '{path}' line {i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"data source '{path}' line {i} is not a JSON object")


def _load_dataset(
    name: str, source: str, split: str, subset: str | None, streaming: bool, n: int | None
) -> list[dict]:
    """Rows of a hub dataset or a snapshot directory `name` (named `source` in errors)."""
    import datasets

    datasets.disable_progress_bars()
    args = (name, subset) if subset else (name,)
    try:
        ds = datasets.load_dataset(*args, split=split, **({"streaming": True} if streaming else {}))
        if streaming:
            return [dict(row) for row in itertools.islice(ds, n)]
    except Exception as e:  # offline, unknown name, config or split...
        raise DataError(f"data source '{source}' {_dataset_problem(e, name, split, subset)}") from None
    if n is not None and n < len(ds):
        ds = ds.select(range(n))
    return ds.to_list()


def _dataset_problem(e: Exception, name: str, split: str, subset: str | None) -> str:
    """What datasets' error means, in a few words, with the configs or splits it lists."""
    message = _first_line(e)
    found = re.search(r"\[([^\]]*)\]", str(e))
    listed = ", ".join(x.strip().strip("'\"") for x in found.group(1).split(",")) if found else ""
    if "Config name is missing" in message:
        return f"has several configs ({listed}); choose one with data.subset"
    if "BuilderConfig" in message and "not found" in message:
        return f"has no config '{subset}' (configs: {listed or message})"
    if "Unknown split" in message or "Bad split" in message:
        config = f" in config '{subset}'" if subset else ""
        return f"has no split '{split}'{config} (splits: {listed or message})"
    if Path(name).is_dir():
        return f"could not be loaded as a dataset repository: {message}"
    return f"is neither a local file nor a loadable hub dataset: {message}"


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
