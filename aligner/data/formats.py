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

Preference data (`to_preference_records`) becomes {"prompt": [messages], "chosen": [assistant turns],
"rejected": [assistant turns]} (+ "margin" when the row has one):

    format       columns
    preference   chosen, rejected (+ prompt): strings or message lists; whole conversations that
                 repeat the prompt (binarized preference sets) have their shared prefix taken as the prompt
    hh           chosen, rejected as "\n\nHuman: ... \n\nAssistant: ..." strings (Anthropic HH style)
    unpaired     prompt, completion, label (KTO: label true = desirable)
"""

from __future__ import annotations

import re
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


# --- preference data ---------------------------------------------------------------------------------

HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str, where: str) -> list[dict]:
    """ "\n\nHuman: q\n\nAssistant: a" -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))  # ["", "Human", q, "Assistant", a, ...]
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: not a '\\n\\nHuman: ... \\n\\nAssistant: ...' conversation")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def _split_shared_prefix(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list, list, list]:
    """Conversations that repeat the prompt: (shared prefix, chosen rest, rejected rest)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    prompt, c, r = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or any(m["role"] != "assistant" for m in c + r):
        raise DataError(
            f"{where}: chosen and rejected conversations must share the prompt turns and differ only in the "
            "assistant's reply (their prefixes do not match)"
        )
    return prompt, c, r


def _preference(row: dict, where: str) -> dict:
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists")
    if isinstance(chosen, str):
        chosen, rejected = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
    else:
        chosen, rejected = _check_turns(chosen, where, "chosen"), _check_turns(rejected, where, "rejected")
        if chosen and chosen[0]["role"] != "assistant":  # whole conversations that repeat the prompt
            shared, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
            if isinstance(prompt, str) and not any(m["content"] == prompt for m in shared):
                raise DataError(f"{where}: the chosen/rejected conversations do not contain the row's prompt")
            prompt = shared
    if prompt is None:
        raise DataError(f"{where}: replies without the conversation need a 'prompt' column")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = _check_turns(prompt, where, "prompt")
    if not any(m["content"].strip() for m in prompt):
        raise DataError(f"{where}: empty prompt")
    if not chosen or not rejected:
        raise DataError(f"{where}: empty chosen or rejected reply")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _hh(row: dict, where: str) -> dict:
    chosen, rejected = parse_hh(row["chosen"], where), parse_hh(row["rejected"], where)
    prompt, c, r = _split_shared_prefix(chosen, rejected, where)
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _check_turns(turns, where: str, column: str) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{column}' must be a string or a list of messages")
    out = []
    for j, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m or "content" not in m or m["role"] not in ROLES:
            raise DataError(f"{where}: {column} message {j} needs a role ({', '.join(ROLES)}) and content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


PREFERENCE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "unpaired": ("prompt", "completion", "label"),
    "preference": ("chosen", "rejected"),
}


def detect_preference_format(row: dict, source: str) -> str:
    cols = set(row)
    if {"chosen", "rejected"} <= cols:
        text = row["chosen"]
        return "hh" if "prompt" not in cols and isinstance(text, str) and HH_TURN.search(text) else "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    raise DataError(
        f"{source}: rows have columns {', '.join(sorted(cols)) or '(none)'}, which fit no preference format; "
        "expected chosen + rejected (+ prompt), or prompt + completion + label (or set data.format)"
    )


def to_preference_records(rows: list[dict], fmt: str | None = None, source: str = "dataset") -> tuple[list, dict]:
    """Canonical preference records and counts {"rows", "kept", "identical"}: pairs whose chosen and rejected
    replies are identical carry no preference and are dropped (counted); anything malformed is an error."""
    if not rows:
        raise DataError(f"{source} has no rows")
    fmt = fmt or detect_preference_format(rows[0], source)
    needed = {"hh": ("chosen", "rejected"), **PREFERENCE_SIGNATURES}.get(fmt)
    if needed is None:
        raise DataError(f"data.format '{fmt}' is not a preference format (preference, hh, unpaired)")
    records, identical = [], 0
    for i, row in enumerate(rows):
        where = _where(source, i)
        missing = [c for c in needed if row.get(c) is None]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (format {fmt} needs {', '.join(needed)})")
        if fmt == "unpaired":
            rec = _preference(
                {"prompt": row["prompt"], "chosen": row["completion"], "rejected": row["completion"]}, where
            )
            records.append({"prompt": rec["prompt"], "completion": rec["chosen"], "label": bool(row["label"])})
            continue
        rec = _hh(row, where) if fmt == "hh" else _preference(row, where)
        if rec["chosen"] == rec["rejected"]:
            identical += 1
            continue
        if row.get("margin") is not None:
            rec["margin"] = float(row["margin"])
        records.append(rec)
    if not records:
        raise DataError(f"{source}: no usable pairs ({identical} of {len(rows)} have identical chosen and rejected)")
    return records, {"rows": len(rows), "kept": len(records), "identical": identical}


def unpair(records: list[dict]) -> list[dict]:
    """Paired records -> unpaired (KTO) ones: each chosen reply desirable, each rejected one undesirable."""
    out = []
    for rec in records:
        out.append({"prompt": rec["prompt"], "completion": rec["chosen"], "label": True})
        out.append({"prompt": rec["prompt"], "completion": rec["rejected"], "label": False})
    return out


def with_kl_partners(records: list[dict]) -> list[dict]:
    """Give each unpaired record a mismatched reply for KTO's KL estimate: the reply of the record before
    it (TRL pairs each prompt with another row's completion; a fixed pairing lets reference
    log-probs be precomputed)."""
    return [{**rec, "kl": records[i - 1]["completion"]} for i, rec in enumerate(records)]


def to_prompt_records(rows: list[dict], source: str = "dataset") -> list[dict]:
    """RL rows -> {"prompt": messages, **the row's other columns}. `prompt` is a string (one user turn) or a
    message list without assistant turns at the end; a row without one is an error naming it."""
    if not rows:
        raise DataError(f"{source} has no rows")
    out = []
    for i, row in enumerate(rows):
        where = _where(source, i)
        if "prompt" not in row:
            raise DataError(f"{where}: no 'prompt' column (columns: {', '.join(row)}); RL rows need a prompt")
        turns = _as_turns(row["prompt"], "user", where, "prompt")
        if not turns or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in turns):
            raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")
        bad = [m["role"] for m in turns if m.get("role") not in ROLES]
        if bad:
            raise DataError(f"{where}: prompt message with role '{bad[0]}' (use one of {', '.join(ROLES)})")
        if turns[-1]["role"] == "assistant":
            raise DataError(f"{where}: the prompt ends with an assistant turn; it should end where the reply starts")
        out.append({**row, "prompt": [{"role": m["role"], "content": m["content"]} for m in turns]})
    return out
