"""Peak GPU memory and step time of the recipes for real models (recipes/real/), at their real shapes.

    python benchmarks/recipe_vram.py                  # on a CUDA machine; writes runs/recipe_vram.json
    python benchmarks/recipe_vram.py --steps 3 --json out.json

No Hub access is needed: the model is a random Qwen2 of Qwen2.5-0.5B-Instruct's exact shape (151,936-token
vocabulary, 24 layers of width 896, 14 query and 2 key/value heads, tied embeddings) with a small tokenizer
carrying a Qwen chat template, and the rows are synthetic conversations, pairs and problems long enough
to fill each recipe's data.seq_len, so activations are as large as on the real datasets. Each recipe runs
as written (its batch, length, checkpointing, precision and LoRA settings) for a few steps, in this
process, and reports torch.cuda.max_memory_allocated above what was allocated before it, and the median
step time of the steps after the first.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = "the model reads each step of the problem and writes what follows from it before the answer".split()


def text(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed + i * 7) % len(WORDS)] for i in range(n_words))


def write_inputs(root: Path, rows: int) -> dict:
    """A Qwen2.5-0.5B-shaped random model with a small tokenizer, and jsonl rows for SFT, DPO and GRPO."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from aligner.model.tokenizer import load_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(
        [text(200, i) for i in range(50)], trainers.BpeTrainer(vocab_size=600, special_tokens=specials)
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = load_chat_template("qwen")
    config = transformers.Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True, rope_theta=1e6,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(root / "qwen")
    fast.save_pretrained(root / "qwen")
    user = lambda i: {"role": "user", "content": text(60, i)}  # noqa: E731
    reply = lambda n, i: {"role": "assistant", "content": text(n, i)}  # noqa: E731
    files = {
        "sft": [{"messages": [user(i), reply(1600, i), user(i + 1), reply(200, i + 1)]} for i in range(rows)],
        "dpo": [
            {"prompt": [user(i)], "chosen": [reply(700, i)], "rejected": [reply(700, i + 3)]} for i in range(rows)
        ],
        "grpo": [{"question": text(80, i), "answer": f"#### {i}"} for i in range(rows)],
    }
    paths = {"model": str(root / "qwen")}
    for name, items in files.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in items))
        paths[name] = str(path)
    return paths


CASES = {  # name: (command, recipe, extra flags)
    "sft_qwen (full)": ("sft", "sft_qwen.yaml", []),
    "sft_qwen (LoRA)": ("sft", "sft_qwen.yaml", ["--lora.enabled", "true"]),
    "sft_qwen (QLoRA)": ("sft", "sft_qwen.yaml", ["--lora.enabled", "true", "--lora.quantize", "nf4"]),
    "dpo_ultrafeedback (full)": ("dpo", "dpo_ultrafeedback.yaml", []),
    "grpo_gsm8k (full, torch engine)": ("grpo", "grpo_gsm8k.yaml", ["--rollout.max_new_tokens", "512"]),
}


def run_case(name: str, inputs: dict, out_dir: Path, steps: int) -> dict:
    from aligner.cli import main

    command, recipe, extra = CASES[name]
    if "QLoRA" in name:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"skipped": "bitsandbytes is not installed"}
    data = inputs[command]
    flags = ["--model.init_from", inputs["model"], "--data.source", data, "--data.eval_source", data]
    flags += ["--data.streaming", "false", "--data.num_eval_rows", "0", "--max_steps", str(steps)]
    flags += ["--train.eval_every", "0", "--train.save_every", "0", "--train.out_dir", str(out_dir)]
    flags += ["--train.name", name.split()[0] + str(len(list(out_dir.glob("*")))), "--train.progress", "false"]
    if command == "grpo":
        flags += ["--data.columns", "{question: prompt}"]
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    code = main([command, str(REPO / "recipes" / "real" / recipe), *flags, *extra])
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30
    run = sorted(out_dir.iterdir(), key=lambda p: p.stat().st_mtime)[-1]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
    times = [r["train/step_time"] for r in rows[1:]] or [r["train/step_time"] for r in rows]
    return {"exit": code, "peak_gib": peak, "step_s": statistics.median(times) if times else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--json", default="runs/recipe_vram.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("recipe_vram.py measures GPU memory: it needs a CUDA device")
    results = {"device": torch.cuda.get_device_name(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_inputs(Path(tmp), rows=256)
        for name in args.cases:
            results["cases"][name] = run_case(name, inputs, Path(tmp) / "runs", args.steps)
            print(f"{name}: {json.dumps(results['cases'][name])}", file=sys.stderr)
    print(f"\nrecipes/real at their shapes on {results['device']} (random Qwen2.5-0.5B-shaped model)")
    print(f"{'recipe':<34}{'peak GiB':>10}{'s/step':>9}")
    for name, r in results["cases"].items():
        if "skipped" in r:
            print(f"{name:<34}{'-':>10}{'-':>9}  ({r['skipped']})")
        else:
            step = f"{r['step_s']:.2f}" if r["step_s"] is not None else "-"
            print(f"{name:<34}{r['peak_gib']:>10.1f}{step:>9}" + ("" if r["exit"] == 0 else f"  (exit {r['exit']})"))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
