"""Conversations -> token ids and an assistant-only loss mask, with any chat template.

    aligner sft recipes/chat.yaml      # renders the task world's conversations with prompts/chatml.jinja

Rendering uses the tokenizer's own template (`apply_chat_template`) or a template file named in the
recipe (`sft.chat_template`). Stock templates have no `{% generation %}` tags, so transformers'
`return_assistant_tokens_mask` gives all zeros for them (transformers #34172). The mask here does not
need the template's cooperation: for assistant turn i it renders the conversation prefix up to turn i
with the generation prompt (where the reply starts) and the prefix through turn i (where it ends),
checks that both are prefixes of the full rendering, and marks the tokens whose first character lies
in between. The end-of-turn token (`<|im_end|>`, `<|eot_id|>`, `</s>`, `<end_of_turn>`) is inside that
span, so it is in the loss; whitespace the template puts after it (a newline) is not.

The full text is tokenized once with `add_special_tokens=False`: the template alone decides where BOS
goes, so it is never doubled. A template that renders earlier turns differently once later turns
exist (one that strips reasoning from past turns, say) cannot be masked this way and is an error
(`sft.train_on: last` still works with it).

An assistant turn's `reasoning_content` is rendered by templates that mention it (prompts/qwen3.jinja);
for any other template it is inlined into the content as "<think>\n{reasoning}\n</think>\n\n{content}"
(the DeepSeek-R1 / Qwen3 layout) rather than dropped, and counted in the report. Either way it lies inside
the assistant span, so it is in the loss.

A reply that starts with whitespace can share a token with the template text before it: Qwen2's
pre-tokenizer makes "assistant\n" + "\nHi" one token "ĊĊ" that straddles the span start, so the mask would
miss the reply's first character and the generation prompt would not be a token prefix of the training
sequence. When a token straddles an assistant span's start, that reply's leading whitespace is stripped and
the conversation rendered again (counted in the report): the mask is then exact, and `encode_prompt` (which
strips such replies in the prompt's history too) gives a token prefix of the training ids. Replies without
leading whitespace are never touched.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from aligner.errors import DataError
from aligner.logprobs import IGNORE_INDEX
from aligner.tracking import phase


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False, template: str | None = None) -> str:
    """The conversation as text, exactly as the template renders it (raises DataError on template errors)."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; set sft.chat_template (for example prompts/chatml.jinja)")
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja2 TemplateError from raise_exception, or a template bug
        raise DataError(f"chat template: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def renders_reasoning(tokenizer, template: str | None = None) -> bool:
    """Whether the template (or the tokenizer's own) renders `reasoning_content` itself."""
    text = template if template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):  # named templates
        text = " ".join(map(str, text.values()))
    return isinstance(text, str) and "reasoning_content" in text


def inline_reasoning(messages: list[dict]) -> tuple[list[dict], int]:
    """Messages with each assistant turn's reasoning_content moved into its content as a <think> block, and
    how many turns had one: "<think>\n{reasoning}\n</think>\n\n{content}" (DeepSeek-R1 / Qwen3)."""
    out, inlined = [], 0
    for m in messages:
        reasoning = m.get("reasoning_content")
        if m.get("role") == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            reasoning, content = reasoning.strip("\n"), m["content"].lstrip("\n")
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = f"<think>\n{reasoning}\n</think>\n\n{content}"
            inlined += 1
        out.append(m)
    return out, inlined


def _prepared(tokenizer, messages: list[dict], template: str | None) -> tuple[list[dict], int]:
    return (messages, 0) if renders_reasoning(tokenizer, template) else inline_reasoning(messages)


def assistant_spans(
    tokenizer, messages: list[dict], template: str | None = None, train_on: str = "all"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans [start, end) of the assistant replies to train on.

    A span runs from the end of the generation prompt to the end of the turn, trailing whitespace excluded.
    """
    text, spans = _turn_spans(tokenizer, messages, template, train_on)
    return text, [(start, end) for _, start, end in spans]


def _turn_spans(
    tokenizer, messages: list[dict], template: str | None, train_on: str
) -> tuple[str, list[tuple[int, int, int]]]:
    """assistant_spans, each span with the index of its message: (i, start, end)."""
    text = render(tokenizer, messages, template=template)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = []
    for i in turns:
        if i == 0:
            raise DataError("the conversation starts with an assistant turn; it needs a user turn before it")
        start_text = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
        end_text = render(tokenizer, messages[: i + 1], template=template)
        if not (text.startswith(start_text) and text.startswith(end_text) and end_text.startswith(start_text)):
            raise DataError(
                "the chat template renders earlier turns differently once later turns exist, so the assistant "
                "mask cannot be computed from prefixes; use a template that renders turns independently, or "
                "train on the last assistant turn only (sft.train_on: last)"
            )
        end = len(end_text.rstrip())
        if end > len(start_text):
            spans.append((i, len(start_text), end))
    return text, spans


def _offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def _straddled(offsets: list[tuple[int, int]], pos: int) -> bool:
    """Whether a token starts before character `pos` and ends after it."""
    k = bisect_left([s for s, _ in offsets], pos)
    return k > 0 and offsets[k - 1][0] < pos < offsets[k - 1][1]


def _lstrip_turns(messages: list[dict], turns: list[int]) -> list[dict]:
    return [{**m, "content": m["content"].lstrip()} if i in turns else m for i, m in enumerate(messages)]


def _leading_space(text: str, messages: list[dict], i: int, start: int) -> bool:
    return text[start : start + 1].isspace() and messages[i]["content"][:1].isspace()


def encode_conversation(
    tokenizer, messages: list[dict], template: str | None = None, train_on: str = "all", report=None
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a 0/1 mask, 1 on assistant tokens (end-of-turn included).

    A token is in the loss when its first character lies inside an assistant span. reasoning_content is
    inlined for templates that do not render it, and a reply whose leading whitespace shares a token with
    the template text before it loses that whitespace (module docstring); both are counted in `report`
    (an EncodeReport) when one is given.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("assistant masks need a fast tokenizer (character offsets); load one with use_fast=True")
    messages, inlined = _prepared(tokenizer, messages, template)
    text, spans = _turn_spans(tokenizer, messages, template, train_on)
    ids, offsets = _offsets(tokenizer, text)
    starts = {i: start for i, start, _ in spans}

    def straddles(i: int) -> bool:  # turns in the loss: in the full text; others (train_on last): as encode_prompt
        if i in starts:
            return _leading_space(text, messages, i, starts[i]) and _straddled(offsets, starts[i])
        return _turn_straddles(tokenizer, messages, i, template)

    stripped = [i for i in range(len(messages)) if straddles(i)]
    if stripped:
        messages = _lstrip_turns(messages, stripped)
        text, spans = _turn_spans(tokenizer, messages, template, train_on)
        ids, offsets = _offsets(tokenizer, text)
    if report is not None:
        report.reasoning_inlined += inlined
        report.whitespace_stripped += len(stripped)
    mask = [0] * len(ids)
    k = 0
    for t, (s, e) in enumerate(offsets):
        while k < len(spans) and spans[k][2] <= s:
            k += 1
        if k < len(spans) and spans[k][1] <= s < spans[k][2] and e > s:
            mask[t] = 1
    return ids, mask


def encode_prompt(tokenizer, messages: list[dict], template: str | None = None) -> list[int]:
    """Token ids of a prompt ending in the generation prompt, rendered exactly as in training (reasoning
    inlined and straddling leading whitespace stripped in earlier assistant turns, as encode_conversation does)."""
    messages, _ = _prepared(tokenizer, messages, template)
    stripped = [i for i, m in enumerate(messages) if _turn_straddles(tokenizer, messages, i, template)]
    if stripped:
        messages = _lstrip_turns(messages, stripped)
    text = render(tokenizer, messages, add_generation_prompt=True, template=template)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turn_straddles(tokenizer, messages: list[dict], i: int, template: str | None) -> bool:
    """Whether assistant turn i's reply starts inside a token, rendered as the last turn."""
    m = messages[i]
    if m.get("role") != "assistant" or not (m.get("content") or "")[:1].isspace():
        return False
    if not getattr(tokenizer, "is_fast", False):  # no character offsets to look at
        return False
    start = render(tokenizer, messages[:i], add_generation_prompt=True, template=template)
    end = render(tokenizer, messages[: i + 1], template=template)
    if not end.startswith(start) or not _leading_space(end, messages, i, len(start)):
        return False
    return _straddled(_offsets(tokenizer, end)[1], len(start))


def reply_stop_ids(tokenizer, template: str | None = None) -> list[int]:
    """Ids that end a reply under this template (the special token closing an assistant turn), plus EOS."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    out = []
    try:
        ids, mask = encode_conversation(tokenizer, probe, template)
        last = ids[max(i for i, m in enumerate(mask) if m)]
        if tokenizer.convert_ids_to_tokens(last) in tokenizer.get_added_vocab():
            out.append(last)
    except (DataError, ValueError):  # no template, or nothing masked
        pass
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


def shifted_example(ids: list[int], mask: list[int], keep_last: bool = False) -> dict:
    """{"input_ids": ids[:-1], "labels": ids[1:] where the mask is 1, else IGNORE_INDEX} as int64 tensors.
    keep_last: input_ids are all of ids (a reward model reads the final token) and labels end with one
    more IGNORE_INDEX."""
    import torch

    ids_t = torch.tensor(ids, dtype=torch.int64)
    labels = torch.where(torch.tensor(mask[1:], dtype=torch.bool), ids_t[1:], IGNORE_INDEX)
    if keep_last:
        return {"input_ids": ids_t, "labels": torch.cat([labels, torch.tensor([IGNORE_INDEX])])}
    return {"input_ids": ids_t[:-1], "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else EOS (labels come from masks, not ids)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# --- datasets of conversations ------------------------------------------------------------------


@dataclass
class EncodeReport:
    """What happened to each conversation on the way to training examples."""

    conversations: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_loss: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    reasoning_inlined: int = 0  # assistant turns whose reasoning_content became a <think> block in the content
    whitespace_stripped: int = 0  # replies whose leading whitespace shared a token with the template text

    def summary(self) -> str:
        parts = [f"{self.conversations} conversations -> {self.kept} examples"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to the max length")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} dropped as longer than the max length")
        if self.dropped_no_loss:
            parts.append(f"{self.dropped_no_loss} dropped with no assistant tokens left")
        if self.reasoning_inlined:
            parts.append(
                f"{self.reasoning_inlined} assistant turns' reasoning_content inlined as <think> blocks "
                "(the template does not render it)"
            )
        if self.whitespace_stripped:
            parts.append(
                f"{self.whitespace_stripped} replies' leading whitespace stripped (it shared a token with the "
                "template text before it)"
            )
        parts.append(f"{self.loss_tokens}/{self.tokens} tokens in the loss")
        return ", ".join(parts)


def encode_dataset(
    records: Sequence[dict],
    tokenizer,
    max_len: int,
    *,
    template: str | None = None,
    train_on: str = "all",
    overlong: str = "truncate",
    source: str = "dataset",
) -> tuple[list[dict], EncodeReport]:
    """Records {"messages": [...]} -> examples {"input_ids", "labels"} (labels shifted, IGNORE_INDEX off-mask).

    `max_len` counts model inputs (one less than the conversation's tokens). Over-long conversations are
    cut to max_len (`overlong: truncate`) or left out (`drop`); either way they are counted. A dataset
    with no assistant token anywhere is an error, never a silent zero loss.
    """
    if overlong not in ("truncate", "drop", "error"):
        raise DataError(f"sft.overlong must be truncate, drop or error, got '{overlong}'")
    report = EncodeReport(conversations=len(records))
    examples = []
    for i, rec in enumerate(phase(records, f"encoding {source}", "conversation")):
        try:
            ids, mask = encode_conversation(tokenizer, rec["messages"], template, train_on, report=report)
        except DataError as e:
            raise DataError(f"{source} row {i + 1}: {e}") from None
        if len(ids) - 1 > max_len:
            if overlong == "error":
                raise DataError(
                    f"{source} row {i + 1}: {len(ids)} tokens, longer than the max length {max_len} + 1; "
                    "raise data.seq_len or set sft.overlong to truncate or drop"
                )
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, mask = ids[: max_len + 1], mask[: max_len + 1]
            report.truncated += 1
        if sum(mask[1:]) == 0:
            report.dropped_no_loss += 1
            continue
        examples.append(shifted_example(ids, mask))
        report.kept += 1
        report.tokens += len(ids) - 1
        report.loss_tokens += sum(mask[1:])
    if not examples:
        why = (
            "every conversation was longer than the max length"
            if report.dropped_overlong == report.conversations
            else "no conversation has assistant tokens to train on (the assistant masks are all zero)"
        )
        raise DataError(f"{source}: {why}; {report.summary()}")
    return examples, report


# --- preference pairs --------------------------------------------------------------------------------


def encode_reply(tokenizer, prompt: list[dict], reply: list[dict], template: str | None = None, report=None):
    """Token ids of prompt + reply and a 0/1 mask on the reply's assistant tokens only (end-of-turn included)."""
    ids, mask = encode_conversation(tokenizer, prompt + reply, template, report=report)
    n_prompt = len(encode_prompt(tokenizer, prompt, template))
    return ids, [0] * n_prompt + mask[n_prompt:]


REPLY_SIDES = ("chosen", "rejected", "completion", "kl")  # the replies a preference or KTO record may hold


def encode_preferences(
    records: Sequence[dict],
    tokenizer,
    max_len: int,
    *,
    template: str | None = None,
    overlong: str = "truncate",
    source: str = "dataset",
    keep_last: bool = False,
) -> tuple[list[dict], EncodeReport]:
    """Paired records -> {"chosen": example, "rejected": example, "margin"?}, or unpaired (KTO) records ->
    {"completion": example, "kl"?: example, "label"} (kl: the prompt with another row's reply), with
    SFT-style shifted labels on the replies only. Over-long sequences lose the end of the reply
    (`truncate`) or the record (`drop`); a record left without reply tokens on any side is dropped;
    all counted in the report. keep_last: input_ids keep the final token (reward models read it)."""
    report = EncodeReport(conversations=len(records))
    out = []
    for i, rec in enumerate(phase(records, f"encoding {source}", "pair")):
        names = [k for k in REPLY_SIDES if k in rec]
        try:
            sides = [encode_reply(tokenizer, rec["prompt"], rec[k], template, report=report) for k in names]
        except DataError as e:
            raise DataError(f"{source} row {i + 1}: {e}") from None
        if any(len(ids) - 1 > max_len for ids, _ in sides):
            if overlong == "error":
                raise DataError(f"{source} row {i + 1}: longer than the max length {max_len} + 1 tokens")
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            sides = [(ids[: max_len + 1], mask[: max_len + 1]) for ids, mask in sides]
            report.truncated += 1
        if any(sum(mask[1:]) == 0 for _, mask in sides):
            report.dropped_no_loss += 1
            continue
        pair = {name: shifted_example(*side, keep_last=keep_last) for name, side in zip(names, sides)}
        pair.update({k: rec[k] for k in ("margin", "label") if k in rec})
        out.append(pair)
        report.kept += 1
        report.tokens += sum(len(ids) - 1 for ids, _ in sides)
        report.loss_tokens += sum(sum(mask[1:]) for _, mask in sides)
    if not out:
        raise DataError(f"{source}: no row has reply tokens within the max length; {report.summary()}")
    return out, report
