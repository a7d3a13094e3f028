"""The one data-loading entry every trainer uses: the built-in task world, local files, or the hub.

    data:
      source: world:sft            # the task world (kinds: pretrain, sft, preference, rl)
      source: data/train.jsonl     # a local .jsonl / .json / .parquet / .csv / .txt file,
      source: data/                #   a directory of them (sorted, recursive), or a glob (data/*.parquet)
      source: org/dataset          # anything else shaped like a hub name: a Hugging Face hub dataset

Local files go through `datasets.load_dataset(<builder>, data_files=...)`. A local source is one split:
`split` selects nothing there (point `eval_source` at a second file). A .txt or .md file is one
document, split further wherever a line holds only `<|endoftext|>`: the text between separators
becomes one row {text_field: document}. Rows come back as a list of plain dicts, the first `n` when
`n` is given. Every failure is a `DataError` with a one-line message naming the source.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

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
) -> list[dict]:
    """Rows of `source` (split `split`), at most the first `n`. Raises DataError with one line.

    `seed`, `levels` and `world_kind` only concern the task world; `text_field` only .txt files.
    """
    if source == "world" or source.startswith("world:"):
        from aligner.data import world

        kind = source.split(":", 1)[1] if ":" in source else world_kind
        rows = world.world_rows(kind, split=split, n=n, seed=seed, levels=tuple(levels))
    else:
        files = _local_files(source)
        if files is None:
            rows = _load_hub(source, split)
        else:
            rows = []
            for f in files:
                rows.extend(_read_file(f, text_field))
                if n is not None and len(rows) >= n:
                    break
    if n is not None:
        rows = rows[:n]
    if not rows:
        raise DataError(f"data source '{source}' (split {split}) has no rows; check the file or the split")
    return rows


def _supported(path: Path) -> bool:
    suffix = path.suffix.lower()
    return suffix in BUILDERS or suffix in TEXT_SUFFIXES


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


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


def _read_file(path: Path, text_field: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data source '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
        docs = re.split(rf"^{re.escape(DOC_SEPARATOR)}[ \t]*$", text, flags=re.MULTILINE)
        return [{text_field: d.strip("\n")} for d in docs if d.strip()]
    if suffix not in BUILDERS:
        raise DataError(f"data source '{path}': unsupported file type '{suffix}' (use jsonl, json, parquet, csv, txt)")
    if path.stat().st_size == 0:
        return []
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for malformed files
        if suffix == ".jsonl":
            _check_jsonl(path)
        raise DataError(f"data source '{path}' could not be read as {suffix[1:]}: {_first_line(e)}") from None
    return ds.to_list()


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


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split...
        message = _first_line(e)
        if "Unknown split" in message:
            problem = f"has no split '{split}': {message}"
        else:
            problem = f"is neither a local file nor a loadable hub dataset: {message}"
        raise DataError(f"data source '{name}' {problem}") from None
    return ds.to_list()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
