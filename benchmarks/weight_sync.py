"""Weight sync into a vLLM rollout server: time and the trainer's extra memory per bucket size.

    .venv-vllm/bin/python benchmarks/weight_sync.py                   # 12 x 768 Llama, 32k vocab (128.8M), fp32
    .venv-vllm/bin/python benchmarks/weight_sync.py --buckets 16 64 256 --repeats 5

Starts `aligner serve-rollouts` on a randomly initialised Llama checkpoint (written to --dir), then pushes the
same weights --repeats times per bucket size (`rollout.sync_bucket_mb`), the sizes taking turns, after one
warm-up push. Reports per size the median push time with its min-max, the rate in MB/s of weights, and the
trainer process's peak resident memory (the kernel's VmHWM) above its level before the push: the bucket and
its encodings, never a second copy of the weights. Needs vLLM (`make test-vllm` builds .venv-vllm).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from compare_trl import peak_mib, reset_peak, rss_mib  # the same memory figures as the TRL comparison


class PeakRSS:
    """The kernel's peak resident memory (VmHWM) while the block runs, above its level at the start."""

    def __enter__(self):
        reset_peak()
        self.base = rss_mib()
        return self

    def __exit__(self, *exc):
        self.extra = peak_mib() - self.base


def checkpoint(args) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(args.dir)
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 + 64,
            num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
            num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024, tie_word_embeddings=False,
        )  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(out)
        from aligner.data.world import world_rows
        from aligner.model.tokenizer import train_tokenizer

        texts = [r["text"] for r in world_rows("pretrain", "train", n=300)]  # vLLM wants a tokenizer beside it
        train_tokenizer(texts, vocab_size=400).save_pretrained(out)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--buckets", type=float, nargs="+", default=[16, 64, 256], help="bucket sizes in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--dir", default="/tmp/aligner_weight_sync_model")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from aligner.rollout.vllm_server import VLLMServerEngine, wait_for_server

    path = checkpoint(args)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = sum(t.numel() for t in model.state_dict().values())
    size_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    cmd = [sys.executable, "-m", "aligner", "serve-rollouts", str(path), "--port", str(args.port)]
    server = subprocess.Popen(
        cmd + ["--dtype", "float32", "--max-model-len", "512"], stdout=open(path / "server.log", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_for_server(url, server, timeout=600)
        engines = {mb: VLLMServerEngine(url, bucket_mb=mb) for mb in args.buckets}
        engines[args.buckets[0]].sync_weights(model)  # warm-up
        times, extra, buckets = {mb: [] for mb in args.buckets}, {mb: [] for mb in args.buckets}, {}
        for _ in range(args.repeats):
            for mb, engine in engines.items():
                with PeakRSS() as peak:
                    start = time.perf_counter()
                    engine.sync_weights(model)
                    times[mb].append(time.perf_counter() - start)
                extra[mb].append(peak.extra)
                buckets[mb] = engine.last_sync["buckets"]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    print(f"model: {n / 1e6:.1f}M params, {size_mb:.0f} MiB fp32; {os.cpu_count()} CPUs; {args.repeats} repeats")
    print("| bucket | buckets | push time (median, min-max) | MB/s | trainer's extra memory (median) |")
    print("|---|---|---|---|---|")
    for mb in args.buckets:
        t = times[mb]
        med = statistics.median(t)
        print(
            f"| {mb:g} MiB | {buckets[mb]} | {med:.2f} s ({min(t):.2f}-{max(t):.2f}) | {size_mb / med:.0f} | "
            f"{statistics.median(extra[mb]):.0f} MiB |"
        )


if __name__ == "__main__":
    main()
