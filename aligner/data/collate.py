"""Batches: packing plain text into fixed windows, and padding variable-length examples.

An example is {"input_ids": (L,), "labels": (L,)} with labels already shifted (labels[t] is the
token that should follow input_ids[t]; IGNORE_INDEX where no loss is taken).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from aligner.logprobs import IGNORE_INDEX


class PackedText(Sequence):
    """Documents concatenated (each ending in EOS) and cut into windows of seq_len + 1 tokens.

    Consecutive windows overlap by one token so every token after the first is predicted exactly
    once. Attention may cross document boundaries inside a window (the usual pretraining choice);
    the EOS between documents tells the model where one ends.
    """

    def __init__(self, token_lists: Iterable[list[int]], seq_len: int, eos_id: int):
        flat: list[int] = []
        for ids in token_lists:
            flat.extend(ids)
            flat.append(eos_id)
        self.seq_len = seq_len
        self.tokens = torch.tensor(flat, dtype=torch.int64)
        self.num_windows = max(0, (len(flat) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        w = self.tokens[i * self.seq_len : (i + 1) * self.seq_len + 1]  # (seq_len + 1,)
        return {"input_ids": w[:-1], "labels": w[1:]}


def pad_examples(examples: Sequence[dict], pad_id: int, multiple_of: int = 1) -> dict:
    """Right-pad examples into a batch: input_ids/labels (B, T) plus n_loss and n_tokens counts.

    With right padding and a causal model, real tokens never attend to padding, so no attention
    mask is needed; padded positions carry IGNORE_INDEX labels.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    width = max(lengths)
    width = (width + multiple_of - 1) // multiple_of * multiple_of
    ids = torch.full((len(examples), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.int64)
    for row, e in enumerate(examples):
        n = lengths[row]
        ids[row, :n] = torch.as_tensor(e["input_ids"])
        labels[row, :n] = torch.as_tensor(e["labels"])
    return {
        "input_ids": ids,
        "labels": labels,
        "n_loss": int((labels != IGNORE_INDEX).sum()),
        "n_tokens": sum(lengths),
    }


def pad_examples_with(
    items: Sequence[dict], pad_id: int, per_token: Sequence[str] = (), per_row: Sequence[str] = ()
) -> dict:
    """`pad_examples` of `items` that also carry per-token values (1-D tensors as long as their input_ids,
    padded with 0 to the batch's width) and per-row numbers, stacked into (B, T) and (B,) tensors."""
    batch = pad_examples(items, pad_id)
    T = batch["input_ids"].shape[1]
    for key in per_token:
        batch[key] = torch.stack([torch.nn.functional.pad(x[key][:T], (0, T - min(T, len(x[key])))) for x in items])
    for key in per_row:
        batch[key] = torch.tensor([float(x[key]) for x in items])
    return batch


def pack_examples(examples: Sequence[dict], pad_id: int, row_len: int) -> dict:
    """Padding-free packing: put examples end to end into as few rows of `row_len` tokens as fit.

    Rows are filled first-fit, longest example first. position_ids restart at 0 for every example
    (and for the padding at the end of a row), which the GPT core and transformers models read as
    document boundaries: attention never crosses examples, so the loss and gradients are those of the
    unpacked batch, with fewer padded positions. Returns the `pad_examples` keys plus position_ids and
    `ends` (N,): where each example's last token lies in the flattened (rows x width) batch, in input order,
    and `doc_ids` (rows, width): the index of the example each position holds (-1 for padding). Examples
    that carry `position_ids` and `branch_ids` (a shared prefix and its branches, `pack_shared_pairs`) keep
    them, and the batch then has `branch_ids` (rows, width) too (0 for padding).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    row_len = max([row_len, *lengths])
    branched = any("branch_ids" in e for e in examples)
    rows: list[list[int]] = []  # example indices per row
    fill: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -lengths[i]):
        for r in range(len(rows)):
            if fill[r] + lengths[i] <= row_len:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    width = max(fill)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.zeros((len(rows), width), dtype=torch.int64)
    ends = torch.zeros(len(examples), dtype=torch.int64)
    doc_ids = torch.full((len(rows), width), -1, dtype=torch.int64)
    branches = torch.zeros((len(rows), width), dtype=torch.int64) if branched else None
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ends[i] = r * width + at + n - 1
            doc_ids[r, at : at + n] = i
            ids[r, at : at + n] = torch.as_tensor(examples[i]["input_ids"])
            labels[r, at : at + n] = torch.as_tensor(examples[i]["labels"])
            positions[r, at : at + n] = torch.as_tensor(examples[i]["position_ids"]) if branched else torch.arange(n)
            if branched:
                branches[r, at : at + n] = torch.as_tensor(examples[i]["branch_ids"])
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding is a document of its own
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
        "ends": ends,
        "doc_ids": doc_ids,
        "n_loss": int((labels != IGNORE_INDEX).sum()),
        "n_tokens": sum(lengths),
        **({"branch_ids": branches} if branched else {}),
    }


def _pad_two_sides(examples: Sequence[dict], pad_id: int, first: str, second: str) -> dict:
    """One right-padded batch of 2B rows, every example's `first` side then every `second` side, with
    `lengths` (2B,), `n_loss` = B and, when every example carries them, `ref_logps` (2B,)."""
    rows = [e[first] for e in examples] + [e[second] for e in examples]
    return _two_sided(pad_examples(rows, pad_id), rows, examples)


def _two_sided(batch: dict, rows: Sequence[dict], examples: Sequence[dict]) -> dict:
    batch["lengths"] = torch.tensor([len(r["input_ids"]) for r in rows])
    batch["n_loss"] = len(examples)
    if all("ref_logps" in e for e in examples):
        batch["ref_logps"] = torch.tensor(
            [float(e["ref_logps"][0]) for e in examples] + [float(e["ref_logps"][1]) for e in examples]
        )
    return batch


def pad_pairs(pairs: Sequence[dict], pad_id: int) -> dict:
    """Preference pairs -> one batch of 2B rows, chosen first then rejected (one forward for both), with
    `lengths`, `n_loss` = B pairs, `ref_logps` as `_pad_two_sides`, when pairs carry them `margin` (B,), and
    `units` {"chosen_tokens": the chosen replies' loss tokens} (the units of an NLL term on them)."""
    return _with_margin(_pad_two_sides(pairs, pad_id, "chosen", "rejected"), pairs)


def pack_pairs(pairs: Sequence[dict], pad_id: int, row_len: int) -> dict:
    """Preference pairs -> their 2B sequences (chosen first, then rejected) packed padding-free into rows of
    `row_len` tokens (`pack_examples`: `ends`, `doc_ids`, position_ids), with the `pad_pairs` extras."""
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch = _two_sided(pack_examples(rows, pad_id, row_len), rows, pairs)
    return _with_margin(batch, pairs)


def shared_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two different sequences share, leaving each at least one of its own."""
    n, i = min(len(a), len(b)) - 1, 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack_shared_pairs(pairs: Sequence[dict], pad_id: int, row_len: int) -> dict:
    """Preference pairs packed with each pair's common prefix (the prompt, and any reply tokens both share)
    once: a document [prefix, chosen rest, rejected rest] whose branches (`branch_ids` 1 and 2 after the
    prefix's 0) both continue the prefix's positions, and whose rejected tokens do not see the chosen ones
    (`attention.build_attn_mask`): each reply's hidden states are those of its own unpacked sequence. `ends`
    as `pack_pairs` (the B chosen last tokens, then the B rejected); labels are not kept, so this serves
    losses that read the last tokens only (the Bradley-Terry reward model's)."""
    docs, rejected_tails = [], []
    for p in pairs:
        c, r = list(p["chosen"]["input_ids"]), list(p["rejected"]["input_ids"])
        s = shared_prefix_len(c, r)
        docs.append({
            "input_ids": c + r[s:],
            "labels": [IGNORE_INDEX] * (len(c) + len(r) - s),
            "position_ids": list(range(len(c))) + list(range(s, len(r))),
            "branch_ids": [0] * s + [1] * (len(c) - s) + [2] * (len(r) - s),
        })  # fmt: skip
        rejected_tails.append(len(r) - s)
    batch = pack_examples(docs, pad_id, row_len)
    rejected_ends = batch["ends"]  # each document's last token is its rejected reply's
    batch["ends"] = torch.cat([rejected_ends - torch.tensor(rejected_tails), rejected_ends])
    rows = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    batch["n_tokens"] = sum(len(r["input_ids"]) for r in rows)  # the pairs' tokens: tokens/s counts the data
    return _with_margin(_two_sided(batch, rows, pairs), pairs)


def _with_margin(batch: dict, pairs: Sequence[dict]) -> dict:
    chosen = [torch.as_tensor(p["chosen"]["labels"]) for p in pairs]
    batch["units"] = {"chosen_tokens": sum(int((labels != IGNORE_INDEX).sum()) for labels in chosen)}
    if all("margin" in p for p in pairs):
        batch["margin"] = torch.tensor([float(p["margin"]) for p in pairs])
    return batch


def pad_unpaired(examples: Sequence[dict], pad_id: int) -> dict:
    """KTO examples -> one batch of 2B rows: the B completions, then their B mismatched KL-estimate rows,
    with `desirable` (B,) bool and `lengths`, `n_loss` = B, `ref_logps` as `_pad_two_sides`."""
    batch = _pad_two_sides(examples, pad_id, "completion", "kl")
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch


# --- completions that share their prompt (GRPO's groups) ---------------------------------------------


def prompt_groups(batch: dict) -> list[list[tuple[int, int, int]]]:
    """The padded batch's rows with labels as (row, start, end), grouped by prompt (identical tokens, in
    first-seen order): labels[start] is the row's first completion token, so input_ids[:start + 1] is the
    prompt it continues and input_ids[start + 1 : end] the completion less its last token."""
    ids, groups = batch["input_ids"], {}
    for r, row in enumerate((batch["labels"] != IGNORE_INDEX).tolist()):
        if any(row):
            start = row.index(True)
            groups.setdefault(tuple(ids[r, : start + 1].tolist()), []).append(
                (r, start, len(row) - row[::-1].index(True))
            )
    return list(groups.values())


def _document_lengths(groups: list, branches: int) -> list[int]:
    return [
        group[0][1] + 1 + sum(end - start - 1 for _, start, end in group[i : i + branches])
        for group in groups
        for i in range(0, len(group), branches)
    ]


def sharing_branches(batch: dict, groups: list, linear: float, attention: float, window: float) -> int:
    """How many completions per document make `share_prompts`'s layout of the batch cheapest to run, or 0
    when the padded batch is: forward costs in the units of `linear` (per token, the decoder's linear
    layers) and `attention` (per query-key pair), the padded rows under causal attention (the keys after
    each query skipped), the documents under a dense mask as wide as the widest, and none wider than
    `window` (the longest row the model takes branches over, `forward.prefix_window`)."""
    B, T = batch["input_ids"].shape
    best, cheapest = 0, B * T * (linear + T / 2 * attention)
    for branches in range(2, max(map(len, groups), default=0) + 1):
        lengths = _document_lengths(groups, branches)
        width = max(lengths)
        cost = len(lengths) * width * (linear + width * attention)
        if width <= window and cost < cheapest:
            best, cheapest = branches, cost
    return best


def share_prompts(batch: dict, groups: list, branches: int) -> dict:
    """The padded batch with its completions also laid out as branches after their shared prompt (the
    completions of a GRPO group; `groups` from `prompt_groups`), at most `branches` per document, for a
    forward that runs each prompt once per document (`forward.causal_lm_shared_logprobs`).

    Adds `shared_input_ids`, `shared_position_ids`, `shared_doc_ids` and `shared_branch_ids` (D, W): one
    document per row, the prompt (branch 0) and then each completion less its last token (branch 1, 2, ...),
    every branch continuing the prompt's positions, so that under `attention.build_attn_mask` each
    completion's hidden states are those of its own padded row; for each label of the batch, `shared_from`
    (N,): the flat position in (D, W) whose hidden state predicts it (the prompt's last token for a
    completion's first label), `shared_targets` (N,): the label, and `shared_slots` (N,): its flat position
    in the padded (B, T) batch. Rows without labels are left out (their log-probs are 0 either way)."""
    ids, labels = batch["input_ids"], batch["labels"]
    T, width = ids.shape[1], max(_document_lengths(groups, branches))
    docs = [group[i : i + branches] for group in groups for i in range(0, len(group), branches)]
    shape = (len(docs), width)
    out = {
        "shared_input_ids": torch.zeros(shape, dtype=torch.int64),
        "shared_position_ids": torch.arange(width).repeat(len(docs), 1),
        "shared_doc_ids": torch.full(shape, -1, dtype=torch.int64),
        "shared_branch_ids": torch.zeros(shape, dtype=torch.int64),
    }
    sources, slots = [], []
    for d, members in enumerate(docs):
        prompt = members[0][1] + 1
        out["shared_input_ids"][d, :prompt] = ids[members[0][0], :prompt]
        out["shared_doc_ids"][d, :prompt] = d
        at = prompt  # where the next completion's tokens begin
        for b, (r, start, end) in enumerate(members, 1):
            n = end - start - 1
            out["shared_input_ids"][d, at : at + n] = ids[r, start + 1 : end]
            out["shared_position_ids"][d, at : at + n] = torch.arange(start + 1, end)
            out["shared_doc_ids"][d, at : at + n] = d
            out["shared_branch_ids"][d, at : at + n] = b
            keep = labels[r, start:end] != IGNORE_INDEX
            sources.append((d * width + torch.tensor([prompt - 1, *range(at, at + n)]))[keep])
            slots.append((r * T + torch.arange(start, end))[keep])
            at += n
    out["shared_from"], out["shared_slots"] = torch.cat(sources), torch.cat(slots)
    out["shared_targets"] = labels.reshape(-1)[out["shared_slots"]]
    return {**batch, **out}
