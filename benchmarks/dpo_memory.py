"""Peak memory of DPO: full fine-tuning with a frozen reference copy, full with precomputed reference
log-probs (no reference held), and LoRA (the reference is the same model with its adapter disabled).

    python benchmarks/dpo_memory.py                        # a 25M-parameter GPT core, 4 steps each
    python benchmarks/dpo_memory.py --hidden 768 --layers 12

Each mode runs `aligner dpo` (the same code path as the command) in its own process on the same
checkpoint and data, so each peak is that mode's own. Reports the peak resident memory of the
process, and the bytes of distinct parameter tensors it holds (model + reference) right after the
trainer is built, which is where a second copy of the model would show.
"""

from __future__ import annotations

import argparse
import json
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
        storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for m in models for p in m.parameters()}
        held["param_mib"] = sum(storages.values()) / 2**20
        return original(self)

    dpo_mod.DPOTrainer.train = train
    dpo_mod.dpo(load_recipe(recipe_path, command="dpo"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak_mib": peak, **held}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
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
            "LoRA r=16, adapter disabled": {"lora": {"enabled": True, "r": 16, "alpha": 32}},
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
            proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name}: failed\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results["full, reference copy"]
    print(f"DPO peak memory, GPT core hidden {args.hidden} x {args.layers} layers, batch {args.batch} pairs, CPU fp32")
    print(f"{'mode':<32}{'params held MiB':>16}{'peak RSS MiB':>14}{'peak / full+copy':>18}")
    for name, r in results.items():
        print(f"{name:<32}{r['param_mib']:>16.0f}{r['peak_mib']:>14.0f}{r['peak_mib'] / ref['peak_mib']:>18.2f}")


if __name__ == "__main__":
    main()
