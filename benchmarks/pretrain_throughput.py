"""Pretraining throughput: the bare GPT core against the full trainer loop, at the same shapes.

    python benchmarks/pretrain_throughput.py                   # the pretrain recipe's shapes
    python benchmarks/pretrain_throughput.py --precision bf16 --batch 8
    python benchmarks/pretrain_throughput.py --device cuda --gpt2-small    # 12 x 768, 12 heads, seq 1024, batch 16
    python benchmarks/pretrain_throughput.py --device cuda --gpt2-small --compile --json out.json

Prints tokens/s and model FLOPs utilisation (MFU) against a matmul peak measured on this machine in
the same process, for
  1. the bare model: forward + cross-entropy + backward + AdamW step in a plain Python loop, and
  2. the trainer: aligner's SFTTrainer loop (batching, token-sum loss, normalisation, clipping,
     scheduler, metrics) on packed sequences of the same shape,
and the ratio trainer / bare (target: at least 0.90). On a GPU (`--device cuda`) MFU is also given against
the GPU's dense bf16 peak from its data sheet (DENSE_BF16_PEAK, by device name), every step is timed to
a CUDA synchronisation, and `--compile` runs both through torch.compile (the trainer: `train.compile`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aligner.config import Recipe, TrainConfig
from aligner.data.collate import PackedText
from aligner.model.gpt import GPT, GPTConfig
from aligner.tracking import read_metrics
from aligner.trainers.base import resolve_precision
from aligner.trainers.sft import SFTTrainer

# dense (no sparsity) bf16 tensor-core FLOP/s from the data sheets, by a substring of the device name
DENSE_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def dense_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_BF16_PEAK.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, seconds: float = 2.0) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` over ~`seconds` (n = 1024 on the CPU, 8192 on a GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    sync(device)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
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


def autocast(precision: str, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def bare(args) -> list[float]:
    """Seconds per step of forward + loss + backward + optimizer step, no trainer."""
    device = torch.device(args.device)
    model = make_model(args).to(device)
    if args.compile:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(args.warmup + args.steps):
        x = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g).to(device)
        sync(device)
        t = time.perf_counter()
        with autocast(args.precision, device):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
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
            compile=args.compile,
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
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the trainer: train.compile)")
    p.add_argument("--gpt2-small", action="store_true", help="12 layers x 768, 12 heads, seq 1024, batch 16")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.gpt2_small:
        args.hidden, args.layers, args.heads, args.kv_heads, args.seq, args.batch = 768, 12, 12, 12, 1024, 16
    device = torch.device(args.device)
    if args.precision == "auto":
        args.precision = resolve_precision("auto", device)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(dtype, device)
    sheet = dense_peak(device) if args.precision == "bf16" else None
    model = make_model(args)
    flops_tok = model.flops_per_token(args.seq)
    tokens = args.batch * args.seq
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"model {model.num_params() / 1e6:.2f}M params, batch {args.batch} x seq {args.seq}, {args.precision}, "
        f"{where}{', compiled' if args.compile else ''}; matmul peak {peak / 1e9:.1f} GFLOP/s ({args.precision})"
    )
    results = {}
    for name, fn in (("bare model", bare), ("trainer loop", trainer)):
        step = statistics.median(fn(args))
        results[name] = tokens / step
    out = {"device": where, "params": model.num_params(), "matmul_peak": peak, "dense_peak": sheet, "runs": {}}
    for name, tok_s in results.items():
        mfu = tok_s * flops_tok / peak
        against = f"   MFU {100 * tok_s * flops_tok / sheet:5.1f}% of the data sheet's dense bf16" if sheet else ""
        print(f"{name:<13} {tok_s:>10.0f} tokens/s   MFU {100 * mfu:5.1f}% of the measured matmul peak{against}")
        mfu_sheet = tok_s * flops_tok / sheet if sheet else None
        out["runs"][name] = {"tokens_per_s": tok_s, "mfu_matmul": mfu, "mfu_dense_peak": mfu_sheet}
    ratio = results["trainer loop"] / results["bare model"]
    print(f"trainer / bare: {ratio:.3f}  (target >= 0.90)")
    if args.json:
        Path(args.json).write_text(json.dumps(out | {"trainer_over_bare": ratio, "compile": args.compile}, indent=1))


if __name__ == "__main__":
    main()
