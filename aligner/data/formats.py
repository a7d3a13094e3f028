"""Dataset rows -> canonical records.

Every conversation format becomes {"messages": [{"role": ..., "content": ...}, ...]} with roles
system / user / assistant; plain text becomes {"text": ...}. Other columns of a row are kept
(the task world's `answer`, for example) unless they clash with those names.

    format       columns                                   example source
    messages     messages: [{role, content}, ...]          the task world's `world:sft`
    sharegpt     conversations: [{from, value}, ...]       ShareGPT-style dumps
    alpaca       instruction, output (+ input)             Alpaca-style instruction sets
    prompt_completion  prompt, completion (strings or message lists)
    text         text                                      plain text (pretraining)

`detect_format` picks the format from the columns of the first row; a recipe can name it instead.
A dataset that fits none gets one line naming the columns it has and the formats it could be.
"""

from __future__ import annotations

from collections.abc import Callable

from aligner.errors import DataError

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# format -> the columns that identify it (checked in this order)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}


def detect_format(columns, source: str = "dataset") -> str:
    """The first format whose identifying columns are all present."""
    cols = set(columns)
    for name, needed in SIGNATURES.items():
        if set(needed) <= cols:
            return name
    expected = "; ".join(f"{name} ({', '.join(cols_)})" for name, cols_ in SIGNATURES.items())
    raise DataError(
        f"{source}: rows have columns {', '.join(sorted(cols)) or '(none)'}, which fit no known format; "
        f"expected one of: {expected} (or set data.format)"
    )


def _where(source: str, i: int) -> str:
    return f"{source} row {i + 1}"  # 1-based, like file lines


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation")
    out = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {j} needs 'role' and 'content' keys")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {j} has role '{m['role']}' (use one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: message {j} content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    return out


def _messages(row: dict, where: str) -> list[dict]:
    return row["messages"]


def _sharegpt(row: dict, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    out = []
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise DataError(f"{where}: turn {j} needs 'from' and 'value' keys")
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise DataError(f"{where}: turn {j} is from '{t['from']}' (use one of {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": role, "content": t["value"]})
    return out


def _alpaca(row: dict, where: str) -> list[dict]:
    instruction = row["instruction"] or ""
    extra = row.get("input") or ""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _as_turns(value, role: str, where: str, column: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return list(value)
    raise DataError(f"{where}: '{column}' must be a string or a list of messages")


def _prompt_completion(row: dict, where: str) -> list[dict]:
    return _as_turns(row["prompt"], "user", where, "prompt") + _as_turns(
        row["completion"], "assistant", where, "completion"
    )


CONVERTERS: dict[str, Callable[[dict, str], list[dict]]] = {
    "messages": _messages,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
}


def to_records(rows: list[dict], fmt: str | None = None, source: str = "dataset") -> list[dict]:
    """Canonical records for `rows` (format detected from the first row unless `fmt` is given)."""
    if not rows:
        raise DataError(f"{source} has no rows")
    fmt = fmt or detect_format(rows[0].keys(), source)
    if fmt not in SIGNATURES:
        raise DataError(f"data.format '{fmt}' is not one of {', '.join(SIGNATURES)}")
    missing = [c for c in SIGNATURES[fmt] if c not in rows[0]]
    if missing:
        raise DataError(f"{source}: format {fmt} needs column(s) {', '.join(missing)}; rows have {', '.join(rows[0])}")
    records = []
    for i, row in enumerate(rows):
        where = _where(source, i)
        if fmt == "text":
            text = row.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string")
            records.append({**row, "text": text})
            continue
        messages = _check_messages(CONVERTERS[fmt](row, where), where)
        consumed = set(SIGNATURES[fmt]) | ({"input"} if fmt == "alpaca" else set())
        extra = {k: v for k, v in row.items() if k not in consumed}
        records.append({**extra, "messages": messages})
    return records
