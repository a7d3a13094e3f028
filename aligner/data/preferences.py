"""Preference rows -> canonical records (DPO, KTO, reward models).

Preference data (`to_preference_records`) becomes {"prompt": [messages], "chosen": [assistant turns],
"rejected": [assistant turns]} (+ "margin" when the row has one):

    format       columns
    preference   chosen, rejected (+ prompt): strings or message lists; whole conversations that
                 repeat the prompt (binarized preference sets such as ultrafeedback_binarized) have their
                 shared prefix taken as the prompt
    hh           chosen, rejected as "\n\nHuman: ... \n\nAssistant: ..." strings (Anthropic HH style)
    unpaired     prompt, completion, label (KTO: label true = desirable)

An empty (or blank) chosen, rejected or completion reply is an error naming the row.
"""

from __future__ import annotations

import math
import re

from aligner.data.formats import _hint, _message, _renames, _where
from aligner.errors import DataError

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
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _check_reply(turns: list[dict], where: str, name: str) -> None:
    if not any(m["content"].strip() or m.get("tool_calls") for m in turns):
        raise DataError(f"{where}: empty {name} reply")


def _hh(row: dict, where: str) -> dict:
    chosen, rejected = parse_hh(row["chosen"], where), parse_hh(row["rejected"], where)
    prompt, c, r = _split_shared_prefix(chosen, rejected, where)
    return {"prompt": prompt, "chosen": c, "rejected": r}


def _check_turns(turns, where: str, column: str) -> list[dict]:
    if not isinstance(turns, list):
        raise DataError(f"{where}: '{column}' must be a string or a list of messages")
    return [_message(m, where, f"{column} message {j}") for j, m in enumerate(turns)]


PREFERENCE_SIGNATURES: dict[str, tuple[str, ...]] = {
    "unpaired": ("prompt", "completion", "label"),
    "preference": ("chosen", "rejected"),
}


def detect_preference_format(row: dict, source: str) -> str:
    cols = {k for k, v in row.items() if v is not None}
    if {"chosen", "rejected"} <= cols:
        text = row["chosen"]
        return "hh" if "prompt" not in cols and isinstance(text, str) and HH_TURN.search(text) else "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "unpaired"
    raise DataError(
        f"{source}: columns {', '.join(sorted(row)) or '(none)'} fit no preference format; "
        "expected chosen + rejected (+ prompt), or prompt + completion + label (or set data.format); "
        + _hint(_preference_renames(row), "<better reply column>: chosen, <worse reply column>: rejected")
    )


def _preference_renames(row: dict) -> dict[str, str] | None:
    renames = _renames(row, ("chosen", "rejected"))
    if renames and "prompt" not in row:
        renames.update(_renames(row, ("prompt",)) or {})
    return renames or None


def to_preference_records(
    rows: list[dict], fmt: str | None = None, source: str = "dataset", allow_empty: bool = False
) -> tuple[list, dict]:
    """Canonical preference records and counts {"rows", "kept", "identical"}: pairs whose chosen and rejected
    replies are identical carry no preference and are dropped (counted); anything malformed, an empty reply
    among it (unless `allow_empty`: replies sampled from a model), is an error. Each row's format is
    detected from its columns unless `fmt` is given."""
    if not rows:
        raise DataError(f"{source} has no rows")
    all_needed = {"hh": ("chosen", "rejected"), **PREFERENCE_SIGNATURES}
    if fmt is not None and fmt not in all_needed:
        raise DataError(f"data.format '{fmt}' is not a preference format (preference, hh, unpaired)")
    records, identical, first = [], 0, None
    for i, row in enumerate(rows):
        where = _where(source, i)
        try:
            row_fmt = fmt or detect_preference_format(row, where)
        except DataError:
            if first is None:
                raise
            row_fmt = first  # a row that fits no format: say what it lacks for the format of the first row
        first = first or row_fmt
        needed = all_needed[row_fmt]
        missing = [c for c in needed if row.get(c) is None]
        if missing:
            raise DataError(
                f"{where}: missing {', '.join(missing)} (format {row_fmt} needs {', '.join(needed)}); "
                + _hint(_renames(row, missing), f"<column>: {missing[0]}")
            )
        if row_fmt == "unpaired":
            rec = _preference(
                {"prompt": row["prompt"], "chosen": row["completion"], "rejected": row["completion"]}, where
            )
            _check_reply(rec["chosen"], where, "completion")
            records.append(
                {"prompt": rec["prompt"], "completion": rec["chosen"], "label": _label(row["label"], where)}
            )
            continue
        rec = _hh(row, where) if row_fmt == "hh" else _preference(row, where)
        if not allow_empty:  # a dataset's empty reply is a mistake; a sampled one (allow_empty) is a real reply
            _check_reply(rec["chosen"], where, "chosen")
            _check_reply(rec["rejected"], where, "rejected")
        if rec["chosen"] == rec["rejected"]:
            identical += 1
            continue
        if row.get("margin") is not None:
            rec["margin"] = _finite(row["margin"], where, "margin")
        records.append(rec)
    if not records:
        raise DataError(f"{source}: no usable pairs ({identical} of {len(rows)} have identical chosen and rejected)")
    return records, {"rows": len(rows), "kept": len(records), "identical": identical}


def _label(value, where: str) -> bool:
    """KTO's label: true / false (or 1 / 0); anything else (NaN, text) is an error naming the row."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: 'label' must be true or false (desirable or not), got {value!r}")


def _finite(value, where: str, column: str) -> float:
    """A number column's value as a float; NaN, infinities and non-numbers are errors naming the row."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: '{column}' must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise DataError(f"{where}: '{column}' is {x}; give a finite number (or leave the cell empty)")
    return x


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
