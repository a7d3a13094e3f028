"""The one data-loading entry every trainer uses: the built-in task world, local files, or the hub.

    data:
      source: world:sft            # the task world (kinds: pretrain, sft, preference, rl)
      source: corpus.txt           # local .jsonl / .json / .parquet / .csv / .txt, a directory, or a glob
      source: org/dataset          # anything else is a Hugging Face hub dataset name

Local .txt files give one row per file, split further into documents wherever a line holds only
`<|endoftext|>`. Rows come back as a list of plain dicts.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from aligner.errors import DataError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = {".txt", ".md"}
DOC_SEPARATOR = "<|endoftext|>"


def load_rows(
    source: str,
    split: str = "train",
    *,
    n: int | None = None,
    seed: int = 0,
    levels=(1, 2, 3, 4),
    world_kind: str = "sft",
    text_field: str = "text",
) -> list[dict]:
    """Rows of `source` (split `split`), at most the first `n`. Raises DataError with one line."""
    if source == "world" or source.startswith("world:"):
        from aligner.data import world

        kind = source.split(":", 1)[1] if ":" in source else world_kind
        rows = world.world_rows(kind, split=split, n=n, seed=seed, levels=tuple(levels))
    else:
        files = _local_files(source)
        if files is not None:
            rows = []
            for f in files:
                rows.extend(_read_file(f, text_field))
        else:
            rows = _load_hub(source, split)
    if n is not None:
        rows = rows[:n]
    if not rows:
        raise DataError(f"data source '{source}' (split {split}) has no rows")
    return rows


def _local_files(source: str) -> list[Path] | None:
    """The files a local source names, or None when it looks like a hub name."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in BUILDERS or f.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"data source '{source}' is a directory with no .jsonl/.json/.parquet/.csv/.txt files")
        return files
    if any(ch in source for ch in "*?["):
        files = sorted(Path(f) for f in glob.glob(source, recursive=True))
        if not files:
            raise DataError(f"data source '{source}' matches no files")
        return files
    if p.is_file():
        return [p]
    if p.suffix in BUILDERS or p.suffix in TEXT_SUFFIXES or source.startswith((".", "/", "~")):
        raise DataError(f"data source: file '{source}' not found")
    return None


def _read_file(path: Path, text_field: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise DataError(f"data source '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
        docs = [d.strip("\n") for d in text.split(f"\n{DOC_SEPARATOR}\n")] if DOC_SEPARATOR in text else [text]
        return [{text_field: d} for d in docs if d.strip()]
    if suffix not in BUILDERS:
        raise DataError(f"data source '{path}': unsupported file type '{suffix}' (use jsonl, json, parquet, csv, txt)")
    if suffix == ".jsonl":
        _check_jsonl(path)
    if path.stat().st_size == 0:
        return []
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data source '{path}' could not be read: {first}") from None
    return ds.to_list()


def _check_jsonl(path: Path) -> None:
    """Name the first malformed line (datasets' own error does not)."""
    with path.open() as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"data source '{path}' line {i} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"data source '{path}' line {i} is not a JSON object")


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data source '{name}' is neither a local file nor a loadable hub dataset: {first}") from None
    return ds.to_list()
