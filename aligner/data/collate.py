"""Batches: packing plain text into fixed windows, and padding variable-length examples.

An example is {"input_ids": (L,), "labels": (L,)} with labels already shifted (labels[t] is the
token that should follow input_ids[t]; IGNORE_INDEX where no loss is taken).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

IGNORE_INDEX = -100  # same value as aligner.losses.IGNORE_INDEX (data/ must not import trainers)


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
