"""Pretraining throughput: the bare GPT core against the full trainer loop, at the same shapes.

    python benchmarks/pretrain_throughput.py                   # the pretrain recipe's shapes
    python benchmarks/pretrain_throughput.py --precision bf16 --batch 8

Prints tokens/s and model FLOPs utilisation (MFU) against a matmul peak measured on this machine in
the same process, for
  1. the bare model: forward + cross-entropy + backward + AdamW step in a plain Python loop, and
  2. the trainer: aligner's SFTTrainer loop (batching, token-sum loss, normalisation, clipping,
     scheduler, metrics) on packed sequences of the same shape,
and the ratio trainer / bare (target: at least 0.90).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from aligner.config import Recipe, TrainConfig
from aligner.data.collate import PackedText
from aligner.model.gpt import GPT, GPTConfig
from aligner.tracking import read_metrics
from aligner.trainers.base import resolve_precision
from aligner.trainers.sft import SFTTrainer


def matmul_peak(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` over ~`seconds`."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


def make_model(args) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(512, args.seq),
    )
    return GPT(cfg)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def bare(args) -> list[float]:
    """Seconds per step of forward + loss + backward + optimizer step, no trainer."""
    model = make_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        t = time.perf_counter()
        with autocast(args.precision):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times[args.warmup :]


def trainer(args) -> list[float]:
    """Seconds per optimizer step of the real loop (train/step_time from metrics.jsonl)."""
    g = torch.Generator().manual_seed(0)
    n_steps = args.warmup + args.steps
    docs = [torch.randint(2, args.vocab, (args.seq,), generator=g).tolist() for _ in range(args.batch * n_steps)]
    data = PackedText(docs, args.seq, eos_id=1)

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def save_pretrained(self, d):
            pass

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            out_dir=out,
            name="bench",
            micro_batch_size=args.batch,
            max_steps=n_steps,
            precision=args.precision,
            eval_every=0,
            save_every=0,
            progress=False,
            lr=1e-4,
        )
        t = SFTTrainer(Recipe(train=cfg), make_model(args), Tok(), data)
        t.train()
        rows = read_metrics(t.run_dir)
    return [r["train/step_time"] for r in rows][args.warmup :]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="auto: as the trainer picks")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args()
    if args.precision == "auto":
        args.precision = resolve_precision("auto", torch.device("cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    model = make_model(args)
    flops_tok = model.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    print(
        f"model {model.num_params() / 1e6:.2f}M params, batch {args.batch} x seq {args.seq}, {args.precision}, "
        f"{torch.get_num_threads()} threads; matmul peak {peak / 1e9:.1f} GFLOP/s ({args.precision})"
    )
    results = {}
    # Interleave the two measurements so background load affects both alike.
    for name, fn in (("bare model", bare), ("trainer loop", trainer)):
        step = statistics.median(fn(args))
        results[name] = tokens / step
    for name, tok_s in results.items():
        mfu = tok_s * flops_tok / peak
        print(f"{name:<13} {tok_s:>10.0f} tokens/s   MFU {100 * mfu:5.1f}%")
    ratio = results["trainer loop"] / results["bare model"]
    print(f"trainer / bare: {ratio:.3f}  (target >= 0.90)")


if __name__ == "__main__":
    main()
