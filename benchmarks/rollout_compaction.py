"""Rollouts with and without dropping finished rows from the batch, on a checkpoint's own replies.

    python benchmarks/rollout_compaction.py                      # runs/sft/final (aligner sft), 2 threads
    python benchmarks/rollout_compaction.py CHECKPOINT --threads 1

The torch engine drops rows that have emitted their stop id (and their KV-cache rows) once a quarter of
the batch has finished (`TorchEngine(compact=True)`, the default); `compact=False` keeps them, fed
padding, to the end, as transformers' `generate` does. Two workloads on task-world training prompts:
a GRPO rollout (8 prompts x 8 samples at T 0.7) and a greedy eval batch (64 prompts), up to 160 new
tokens. The runs take turns (--repeats rounds, after one warm-up each); the best time of each is
reported as generated tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from rollout_throughput import best_times  # noqa: E402

from aligner.data import world  # noqa: E402
from aligner.data.chat import encode_prompt, reply_stop_ids  # noqa: E402
from aligner.model.load import load_model, load_tokenizer  # noqa: E402
from aligner.rollout.engine import SamplingParams  # noqa: E402
from aligner.rollout.torch_engine import TorchEngine  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", nargs="?", default="runs/sft/final")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.checkpoint).eval(), load_tokenizer(args.checkpoint)
    prompts = [encode_prompt(tok, r["prompt"]) for r in world.rl_rows("train", 64, seed=5)]
    stop = tuple(reply_stop_ids(tok))
    print(f"{args.checkpoint}: {sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    workloads = [
        ("GRPO rollout, 8 prompts x 8 at T 0.7", prompts[:8], SamplingParams(160, 0.7, n=8, stop_ids=stop, seed=0)),
        ("greedy eval, 64 prompts", prompts, SamplingParams(160, 0.0, stop_ids=stop)),
    ]
    for label, batch, params in workloads:
        keep, drop = TorchEngine(model, tok.pad_token_id, compact=False), TorchEngine(model, tok.pad_token_id)
        calls = [lambda e=e, b=batch, p=params: e.generate(b, p) for e in (keep, drop)]
        tokens = [sum(len(c.token_ids) for c in call()) for call in calls]
        t_keep, t_drop = best_times(calls, args.repeats)
        print(
            f"{label:>38}: keep finished rows {tokens[0] / t_keep:6.0f} tok/s | drop them {tokens[1] / t_drop:6.0f} "
            f"tok/s ({t_keep / t_drop:.2f}x), mean reply {tokens[1] / len(batch) / params.n:.0f} tokens"
        )


if __name__ == "__main__":
    main()
