"""Dataset rows -> canonical records.

Every conversation format becomes {"messages": [{"role": ..., "content": ...}, ...]} with roles
system / user / assistant / tool; plain text becomes {"text": ...}. Other columns of a row are kept
(the task world's `answer`, for example) unless they clash with those names. A message keeps the keys
chat templates read beside role and content when it has them: `reasoning_content` (an assistant turn's
reasoning, a string), `tool_calls`, `name` and `tool_call_id`; an assistant turn that only calls tools may
have no content (it becomes "").

    format       columns                                   example source
    messages     messages: [{role, content}, ...]          the task world's `world:sft`, ultrachat_200k
    sharegpt     conversations: [{from, value}, ...]       ShareGPT-style dumps
    alpaca       instruction, output (+ input)             Alpaca-style instruction sets
    prompt_completion  prompt, completion (strings or message lists)
    text         text                                      plain text (pretraining)

Each row's format is detected from its columns (those not null), so a mix of differently shaped sources
works; a recipe can name one format for all rows instead (`data.format`). A row that fits none gets one
line naming its columns, the formats it could be and the `data.columns` renames that would make it fit
(`--data.columns '{question: prompt, response: completion}'`), from a small table of usual column names.

Preference data has a module of its own (aligner.data.preferences).
"""

from __future__ import annotations

from collections.abc import Callable

from aligner.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
MESSAGE_KEYS = ("reasoning_content", "tool_calls", "name", "tool_call_id")  # kept beside role and content

# format -> the columns that identify it (checked in this order)
SIGNATURES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}

# column aligner reads -> names other datasets give it, for the data.columns renames suggested in errors
PROMPT_NAMES = ("question", "instruction", "query", "problem", "input")
REPLY_NAMES = ("response", "output", "solution", "reply", "answer")
ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": PROMPT_NAMES,
    "completion": REPLY_NAMES,
    "instruction": ("prompt", *PROMPT_NAMES),  # the alpaca columns, when a recipe names that format
    "output": ("completion", *REPLY_NAMES),
    "messages": ("conversation", "dialog", "dialogue", "chat", "turns"),
    "chosen": ("chosen_response", "response_chosen", "chosen_answer", "preferred", "accepted"),
    "rejected": ("rejected_response", "response_rejected", "rejected_answer", "dispreferred"),
}


def _fit(columns) -> str | None:
    cols = set(columns)
    return next((name for name, needed in SIGNATURES.items() if set(needed) <= cols), None)


def detect_format(columns, source: str = "dataset") -> str:
    """The first format whose identifying columns are all present."""
    fmt = _fit(columns)
    if fmt is None:
        raise DataError(_no_format(dict.fromkeys(columns), source))
    return fmt


def _no_format(row: dict, where: str) -> str:
    expected = "; ".join(f"{name} ({', '.join(cols_)})" for name, cols_ in SIGNATURES.items())
    return (
        f"{where}: columns {', '.join(sorted(row)) or '(none)'} fit no known format; "
        f"expected one of: {expected} (or set data.format); "
        + _hint(_sft_renames(row), "<prompt column>: prompt, <reply column>: completion")
    )


def _renames(row: dict, targets) -> dict[str, str] | None:
    """{column: target} for each target the row lacks, from ALIASES; None when one has no alias in the row."""
    out: dict[str, str] = {}
    for target in targets:
        if target in row:
            continue
        alias = next((a for a in ALIASES.get(target, ()) if a in row and a != target and a not in out), None)
        if alias is None:
            return None
        out[alias] = target
    return out


def _sft_renames(row: dict) -> dict[str, str] | None:
    """Renames that make a row a conversation: a messages-like column, else prompt and completion."""
    alias = next((a for a in ALIASES["messages"] if a in row), None)
    if alias is not None:
        turns = row[alias]
        sharegpt = isinstance(turns, list) and bool(turns) and isinstance(turns[0], dict) and "from" in turns[0]
        return {alias: "conversations" if sharegpt else "messages"}
    renames = _renames(row, ("prompt", "completion"))
    return renames or None


def _hint(renames: dict[str, str] | None, fallback: str) -> str:
    """ "map one with data.columns, e.g. --data.columns '{question: prompt}'" (`fallback` when no renames)."""
    mapping = ", ".join(f"{old}: {new}" for old, new in renames.items()) if renames else fallback
    return f"map one with data.columns, e.g. --data.columns '{{{mapping}}}'"


def _where(source: str, i: int) -> str:
    return f"{source} row {i + 1}"  # 1-based, like file lines


def _message(m, where: str, label: str) -> dict:
    """A message checked and normalised: role, content, and the optional MESSAGE_KEYS that are not null."""
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise DataError(f"{where}: {label} needs 'role' and 'content' keys")
    if m["role"] not in ROLES:
        raise DataError(f"{where}: {label} has role '{m['role']}' (use one of {', '.join(ROLES)})")
    content = m.get("content")
    if content is None and m["role"] == "assistant" and m.get("tool_calls"):
        content = ""  # an assistant turn that only calls tools
    if not isinstance(content, str):
        raise DataError(f"{where}: {label} content must be a string")
    out = {"role": m["role"], "content": content}
    for key in MESSAGE_KEYS:
        if m.get(key) is not None:
            out[key] = m[key]
    if not isinstance(out.get("reasoning_content", ""), str):
        raise DataError(f"{where}: {label} reasoning_content must be a string")
    if not isinstance(out.get("tool_calls", []), list):
        raise DataError(f"{where}: {label} tool_calls must be a list")
    return out


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation")
    out = [_message(m, where, f"message {j}") for j, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: conversation has no assistant turn to train on")
    for j, m in enumerate(out):  # an empty reply would teach the model to end its turn at once
        if m["role"] == "assistant" and not (
            m["content"].strip() or m.get("tool_calls") or m.get("reasoning_content")
        ):
            raise DataError(f"{where}: message {j} is an empty assistant reply; fix the row or leave it out")
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
    """Canonical records for `rows`, each row's format detected from its non-null columns unless `fmt` is given."""
    if not rows:
        raise DataError(f"{source} has no rows")
    if fmt is not None and fmt not in SIGNATURES:
        raise DataError(f"data.format '{fmt}' is not one of {', '.join(SIGNATURES)}")
    detected: dict[tuple, str | None] = {}  # rows of one source share their columns: detect once per set
    records, first = [], None
    for i, row in enumerate(rows):
        where = _where(source, i)
        row_fmt = fmt
        if row_fmt is None:
            present = tuple(k for k, v in row.items() if v is not None)
            if present not in detected:
                detected[present] = _fit(present)
            if detected[present] is None and first is None:
                raise DataError(_no_format(row, where))
            row_fmt = detected[present] or first  # a row that fits nothing: what it lacks for the first row's format
            first = first or row_fmt
        missing = [c for c in SIGNATURES[row_fmt] if row.get(c) is None]
        if missing:
            raise DataError(
                f"{where}: format {row_fmt} needs column(s) {', '.join(missing)}; rows have "
                f"{', '.join(sorted(row))}; {_hint(_renames(row, missing), f'<column>: {missing[0]}')}"
            )
        if row_fmt == "text":
            text = row.get("text")
            if not isinstance(text, str):
                raise DataError(f"{where}: 'text' must be a string")
            records.append({**row, "text": text})
            continue
        messages = _check_messages(CONVERTERS[row_fmt](row, where), where)
        consumed = set(SIGNATURES[row_fmt]) | ({"input"} if row_fmt == "alpaca" else set())
        extra = {k: v for k, v in row.items() if k not in consumed}
        records.append({**extra, "messages": messages})
    return records


def to_prompt_records(rows: list[dict], source: str = "dataset") -> list[dict]:
    """RL rows -> {"prompt": messages, **the row's other columns}. `prompt` is a string (one user turn) or a
    message list without assistant turns at the end; a row without one is an error naming it and the
    data.columns rename that would give it one."""
    if not rows:
        raise DataError(f"{source} has no rows")
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i)
        if "prompt" not in row:
            raise DataError(
                f"{where}: no 'prompt' column (columns: {', '.join(sorted(row))}); "
                + _hint(_renames(row, ("prompt",)), "<column>: prompt")
            )
        turns = _as_turns(row["prompt"], "user", where, "prompt")
        if not turns or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in turns):
            raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")
        bad = [m["role"] for m in turns if m.get("role") not in ROLES]
        if bad:
            raise DataError(f"{where}: prompt message with role '{bad[0]}' (use one of {', '.join(ROLES)})")
        if not any(m["content"].strip() for m in turns):
            raise DataError(f"{where}: empty prompt")
        if turns[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn; it should end where the reply starts")
        out.append({**row, "prompt": [_message(m, where, f"prompt message {j}") for j, m in enumerate(turns)]})
    return out


def add_system_prompt(records: list[dict], text: str | None) -> list[dict]:
    """Records whose conversation (`messages`) or prompt (`prompt`) has no system turn get `text` as one,
    first (data.system_prompt); the rest are left as they are. None or '' changes nothing."""
    if not text:
        return records
    out = []
    for rec in records:
        key = "messages" if "messages" in rec else "prompt"
        turns = rec.get(key)
        if isinstance(turns, list) and turns and turns[0].get("role") != "system":
            rec = {**rec, key: [{"role": "system", "content": text}, *turns]}
        out.append(rec)
    return out
