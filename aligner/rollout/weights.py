"""The policy's weights on their way to a rollout engine: a stream under Hugging Face names, cut into buckets
of bounded size, and a bucket's wire format for an engine in another process.

    for bucket in wire_buckets(model, 128 * 2**20):       # each <= 128 MiB; big tensors in runs of rows
        meta, payload = pack_bucket(bucket, buffer)       # into one fixed buffer + (name, dtype, shape, ...)
        ...                                               # the receiver: Reassembly().add(unpack_bucket(...))

Memory: the stream holds no copy of the state dict (each tensor is the parameter itself, or, for a sharded
parameter, its gathered full tensor), and a packed bucket never holds more than its size (a tensor larger
than that, such as an embedding table, goes in runs of rows), so the sender needs one bucket and its
encoding of extra memory: never a second state dict. In-process (`weight_buckets`) a tensor larger than
the bucket is handed over alone and uncopied.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the wire names of the dtypes a checkpoint holds
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def adapters_merged(model: torch.nn.Module):
    """A peft model's LoRA adapters merged into its base weights inside the block, unmerged after (also when
    the block stops early); any other model as it is. Yields the base model."""
    peft = hasattr(model, "merge_adapter") and hasattr(model, "get_base_model")
    if peft:
        model.merge_adapter()
    try:
        yield model.get_base_model() if peft else model
    finally:
        if peft:
            model.unmerge_adapter()


def _hf_weights(base: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:  # adapters (merged) and the copies peft keeps
            continue
        name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        p = p.detach()
        yield name, p.full_tensor() if hasattr(p, "full_tensor") else p


def iter_hf_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights under Hugging Face names, one tensor at a time and without copies (the consumer
    copies each into its own buffers as it comes), a peft model's LoRA adapters merged in while the
    iteration runs and unmerged when it ends. A sharded parameter (FSDP2's DTensor) is gathered as it comes
    (a collective: every process iterates in step). Memory: never a second copy of the state dict."""
    with adapters_merged(model) as base:
        yield from _hf_weights(base)


def weight_buckets(model: torch.nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`iter_hf_weights(model)` in order, grouped into buckets of at most `bucket_bytes` (a tensor larger than
    that alone). The adapters stay merged until the consumer has taken the last bucket, so it sends or loads
    each bucket as it comes."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    with adapters_merged(model) as base:
        bucket, size = [], 0
        for name, t in _hf_weights(base):
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, t))
            size += nbytes
        if bucket:
            yield bucket


def wire_buckets(model: torch.nn.Module, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor, int, int]]]:
    """`weight_buckets` for a wire that copies what it sends: a tensor larger than `bucket_bytes` is cut into
    runs of whole rows (dim 0) of at most `bucket_bytes` each (one row at least), each run a bucket of its
    own. Entries are (name, tensor or run, first row, rows of the whole tensor; -1 for a whole tensor)."""
    for bucket in weight_buckets(model, bucket_bytes):
        name, t = bucket[0]
        if len(bucket) > 1 or t.dim() == 0 or t.numel() * t.element_size() <= bucket_bytes:
            yield [(n, x, 0, -1) for n, x in bucket]
            continue
        step = max(1, bucket_bytes // max(1, t[0].numel() * t.element_size()))
        for first in range(0, t.shape[0], step):
            yield [(name, t[first : first + step], first, t.shape[0])]


def pack_bucket(bucket: list[tuple], buffer: torch.Tensor | None = None) -> tuple[str, memoryview]:
    """A bucket (`wire_buckets`' entries, or (name, tensor) pairs) as (metadata JSON, its bytes): the tensors'
    bytes back to back (8-byte aligned) on the CPU, copied into `buffer` (a reusable uint8 tensor) where it
    is large enough, and per tensor [name, dtype, shape, offset, nbytes, first row, rows of the whole]."""
    bucket = [entry if len(entry) == 4 else (*entry, 0, -1) for entry in bucket]
    offsets, total = [], 0
    for _, t, _, _ in bucket:  # each tensor starts at a multiple of 8 bytes, so every dtype's view is aligned
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 8) * 8
    flat = buffer[:total] if buffer is not None and buffer.numel() >= total else torch.empty(total, dtype=torch.uint8)
    meta = []
    for (name, t, first, rows), offset in zip(bucket, offsets):
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: cannot send a {t.dtype} weight (only {', '.join(DTYPES)})")
        nbytes = t.numel() * t.element_size()
        flat[offset : offset + nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        meta.append([name, dtype, list(t.shape), offset, nbytes, first, rows])
    return json.dumps(meta), flat.numpy().data  # a view: valid until `buffer` is packed again


def unpack_bucket(meta: str, payload: bytes | bytearray) -> list[tuple[str, torch.Tensor, int, int]]:
    """The entries (name, tensor, first row, rows of the whole) of a packed bucket: views into one writable
    copy of `payload`. `Reassembly` turns them into whole tensors."""
    entries = json.loads(meta)
    flat = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    end = max((e[3] + -(-e[4] // 8) * 8 for e in entries), default=0)
    if flat.numel() != end:
        raise ValueError(f"a weight bucket of {flat.numel()} bytes where its metadata says {end}")
    return [
        (name, flat[off : off + n].view(DTYPES[dtype]).view(shape), first, rows)
        for name, dtype, shape, off, n, first, rows in entries
    ]


class Reassembly:
    """Whole tensors from unpacked entries: a whole tensor at once, a tensor sent in runs of rows once its
    last run has come (held until then in one tensor of its full size)."""

    def __init__(self):
        self.partial: dict[str, list] = {}  # name -> [whole tensor, rows filled]

    def add(self, entries: list[tuple[str, torch.Tensor, int, int]]) -> list[tuple[str, torch.Tensor]]:
        done = []
        for name, t, first, rows in entries:
            if rows < 0:
                done.append((name, t))
                continue
            whole = self.partial.setdefault(name, [torch.empty((rows, *t.shape[1:]), dtype=t.dtype), 0])
            whole[0][first : first + t.shape[0]].copy_(t)
            whole[1] += t.shape[0]
            if whole[1] == rows:
                done.append((name, self.partial.pop(name)[0]))
        return done

    def check_done(self) -> None:
        if self.partial:
            raise ValueError(f"weights left incomplete: {', '.join(sorted(self.partial))}")
