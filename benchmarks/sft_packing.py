"""SFT throughput with padding-free packing against right padding, same examples, same process.

    python benchmarks/sft_packing.py                       # GPT core at recipes/pretrain.yaml's shapes
    python benchmarks/sft_packing.py --steps 30 --batch 32

The examples are the task world's conversations rendered with ChatML by a freshly trained tokenizer
(lengths vary from ~80 to ~170 tokens). Each mode runs the same SFTTrainer steps (same data order);
the only difference is the collate: one row per example padded to the longest, or examples packed
end to end into rows of --row-len tokens. Reports useful (non-padding) tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from aligner.config import ModelConfig, Recipe, TrainConfig
from aligner.data.chat import encode_dataset
from aligner.data.world import world_rows
from aligner.model.load import build_model
from aligner.model.tokenizer import load_chat_template, train_tokenizer
from aligner.trainers.sft import SFTTrainer


def run(packing: bool, examples, tok, args, out_dir: str) -> float:
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=1, max_seq_len=512), tok)
    train = TrainConfig(
        out_dir=out_dir,
        name=f"packing_{packing}",
        micro_batch_size=args.batch,
        max_steps=args.warmup + args.steps,
        precision="fp32",
        progress=False,
    )
    trainer = SFTTrainer(Recipe(train=train), model, tok, examples)
    trainer.packing, trainer.row_len = packing, args.row_len
    for step in range(args.warmup):
        trainer.train_step(step)
    tokens, start = 0, time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        tokens += trainer.train_step(step)["train/tokens"]
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--row-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    texts = [r["text"] for r in world_rows("pretrain", "train", n=3000)]
    tok = train_tokenizer(texts, vocab_size=2048, chat_template=load_chat_template("chatml"))
    records = [{"messages": r["messages"]} for r in world_rows("sft", "train", n=2000)]
    examples, report = encode_dataset(records, tok, args.row_len)
    print(f"examples: {report.summary()}")
    with tempfile.TemporaryDirectory() as out:
        padded = run(False, examples, tok, args, out)
        packed = run(True, examples, tok, args, out)
    print(f"padded  {padded:8.0f} useful tokens/s")
    print(f"packed  {packed:8.0f} useful tokens/s")
    print(f"packed / padded = {packed / padded:.2f}")


if __name__ == "__main__":
    main()
