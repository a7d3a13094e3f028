"""Peak memory of DPO: full fine-tuning with a frozen reference copy, full with precomputed reference
log-probs (no reference held), and LoRA (the reference is the same model with its adapter disabled).

    python benchmarks/dpo_memory.py                        # a 25M-parameter GPT core, 4 steps each
    python benchmarks/dpo_memory.py --hidden 768 --layers 12

Each mode runs `aligner dpo` (the same code path as the command) in its own process on the same
checkpoint and data, so each peak is that mode's own. Reports the bytes of distinct parameter tensors
the process holds (model + reference, counted when training starts: where a second copy of the model
shows), its resident memory between steps (weights, reference, gradients, optimizer state) and its
peak resident memory (that plus the activations of a step). glibc is told to return large blocks at
once (MALLOC_MMAP_THRESHOLD_) so that resident memory follows the live tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml


def build_checkpoint(root: Path, hidden: int, layers: int) -> Path:
    from aligner.config import ModelConfig
    from aligner.data.world import world_rows
    from aligner.model.load import build_model
    from aligner.model.tokenizer import load_chat_template, train_tokenizer

    texts = [r["text"] for r in world_rows("pretrain", "train", n=2000)]
    tok = train_tokenizer(texts, vocab_size=2048, chat_template=load_chat_template("chatml"))
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64, num_kv_heads=2, max_seq_len=512)
    model = build_model(cfg, tok)
    out = root / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def child(recipe_path: str) -> None:
    """Run one mode and print its figures as JSON (the last line of output)."""
    import aligner.trainers.dpo as dpo_mod
    from aligner.config import load_recipe

    held = {}
    original = dpo_mod.DPOTrainer.train

    def train(self):
        models = [self.unwrapped()] + ([self.ref_model] if self.ref_model is not None else [])
        params = [p for m in models for p in m.parameters()]
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in params}
        held["param_mib"] = sum(storages.values()) / 2**20
        return original(self)

    original_step = dpo_mod.DPOTrainer.train_step

    def train_step(self, step):
        out = original_step(self, step)
        held["between_mib"] = rss_mib()
        return out

    dpo_mod.DPOTrainer.train = train
    dpo_mod.DPOTrainer.train_step = train_step
    dpo_mod.dpo(load_recipe(recipe_path, command="dpo"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak, **held}))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_checkpoint(root, args.hidden, args.layers)
        modes = {
            "full, reference copy": {},
            "full, precomputed reference": {"dpo": {"precompute_ref": True}},
            "LoRA r=16, adapter disabled": {
                "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": args.lora_dropout}
            },
        }
        results = {}
        for name, extra in modes.items():
            recipe = {
                "model": {"init_from": str(base)},
                "sft": {"chat_template": "chatml"},
                "dpo": {"accuracy_items": 0, "ref_cache_dir": str(root / "cache"), **extra.get("dpo", {})},
                "lora": extra.get("lora", {}),
                "data": {"source": "world:preference", "num_rows": 64, "num_eval_rows": 0, "seq_len": 256},
                "train": {
                    "out_dir": str(root / "runs"),
                    "name": f"m{len(results)}",
                    "max_steps": args.steps,
                    "micro_batch_size": args.batch,
                    "precision": "fp32",
                    "eval_every": 0,
                    "save_every": 0,
                    "progress": False,
                },
            }
            path = root / f"m{len(results)}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            cmd = [sys.executable, __file__, "--child", str(path)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{name}: failed\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["full, reference copy"]
    print(f"DPO memory, GPT core hidden {args.hidden} x {args.layers} layers, batch {args.batch} pairs, CPU fp32")
    print(f"{'mode':<32}{'params MiB':>11}{'between steps MiB':>19}{'peak MiB':>10}{'peak / full+copy':>18}")
    for name, r in results.items():
        row = f"{name:<32}{r['param_mib']:>11.0f}{r['between_mib']:>19.0f}{r['peak_mib']:>10.0f}"
        print(row + f"{r['peak_mib'] / ref['peak_mib']:>18.2f}")


if __name__ == "__main__":
    main()
