"""aligner against TRL 1.16: SFT, reward model, DPO and GRPO on the same Hugging Face Llama, side by side.

    python benchmarks/compare_trl.py                        # ~10M Llama (8k vocab) and ~23M (32k vocab), all four
    python benchmarks/compare_trl.py --trainers sft dpo --vocab 8192 --steps 20
    python benchmarks/compare_trl.py --quick                # smoke test: tiny model, one timed step each
    python benchmarks/compare_trl.py --device cuda          # on a GPU: a ~0.45B Llama (GQA) at length 1024
    python benchmarks/compare_trl.py --device cuda --vllm --trainers grpo   # GRPO generating with vLLM on both

Both frameworks get the same checkpoint (a LlamaForCausalLM built here, seed 0), the same tokenizer and
chat template, the same rows (task-world conversations, preference pairs and RL prompts), batch size,
maximum length, precision (bf16 autocast where the CPU has fast bf16, else fp32), optimizer (fused
AdamW, constant learning rate, grad clip 1.0) and gradient checkpointing (on: TRL's default; --checkpointing
off for both). TRL reads the rows in aligner's data order
(train_sampling_strategy "sequential" over rows written in that order), so every step sees the same
examples from the same weights and the first two steps' losses must agree (SFT, reward model, DPO):
within 2e-5 in fp32 (the test suite runs --quick --precision fp32), 2e-3 relative under bf16 autocast;
a mismatch fails the run. GRPO samples, so its loss is not compared; its tokens are the completion tokens
sampled and trained on per second (generation included, as a user sees it). Each run is a process of
its own (`--child`). Each framework runs `--repeats` times (default 3), aligner and TRL alternating
which goes first, and the table gives the medians with their min-max ranges. Peak memory comes from one
more, short run of each: the peak resident memory while the trainer is built and trains, above the
resident memory once the libraries are imported, with glibc told to return freed blocks at once so the
figure follows live tensors. That setting makes every large allocation a system call (over half of a
run's CPU time then goes to the kernel, differently for each framework), so it never applies to the
runs that are timed. "bare" is the model's own forward, backward
and AdamW step on the same batches (right-padded, the model's own loss), with no trainer: the
throughput ceiling each trainer's figure reads against. On a GPU (`--device cuda`) the memory is CUDA's
peak allocated memory of the run (torch.cuda.max_memory_allocated), both frameworks keep fp32 master
weights under bf16 autocast, and the model's shape comes from --hidden/--layers/--heads/--kv-heads
(default on a GPU: 32 layers of width 1024, 16 query and 4 key/value heads, ~0.45B parameters with the
32k vocabulary, at length 1024).

Settings that differ because the frameworks differ, not because the benchmark chose them: aligner
packs SFT examples padding-free (its default; the loss is the same) where TRL pads; TRL's SFT also
computes entropy and token accuracy metrics over the logits every step (its default). The 32k-vocab
model shares the 8k tokenizer (ids stay below 8192), which leaves the compute of a 32k vocabulary.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINERS = ("sft", "rm", "dpo", "grpo")
FRAMEWORKS = ("bare", "aligner", "trl")
# ChatML with the newline between turns put before <|im_start|> instead of after <|im_end|>: nothing follows
# the last turn's end token, so aligner's loss span (through the end token) and TRL's (to the end of the
# rendered text) are the same tokens and the losses can be compared.
TEMPLATE = (
    "{%- for m in messages -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)


def distinct_reward(prompts, completions, **_) -> list[float]:
    """GRPO reward for the benchmark: the share of distinct characters, so that groups have variance
    even under an untrained model (whose completions are never correct)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t)) / max(len(t), 1) for t in texts]


# --- memory ---------------------------------------------------------------------------------------


def memory_base(spec: dict) -> float:
    """The memory the run starts from: resident memory (CPU) or, on a GPU, what is allocated (the peak counter
    restarts)."""
    if spec.get("device") == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    base = rss_mib()
    reset_peak()
    return base


def memory_peak(spec: dict) -> float:
    if spec.get("device") == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return peak_mib()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# --- the shared inputs ----------------------------------------------------------------------------


def build_inputs(root: Path, vocabs: list[int], quick: bool, rows: int, shape: dict) -> dict:
    """Tokenizer, one checkpoint per vocabulary, and the jsonl rows of each trainer (in aligner's order)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from aligner.data.world import world_rows
    from aligner.model.tokenizer import train_tokenizer

    texts = [r["text"] for r in world_rows("pretrain", "train", n=4000)]
    tok = train_tokenizer(texts, vocab_size=min(vocabs), chat_template=TEMPLATE)
    models = {}
    for vocab in vocabs:
        torch.manual_seed(0)
        hidden = 64 if quick else shape["hidden"]
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=3 * hidden,
            num_hidden_layers=2 if quick else shape["layers"],
            num_attention_heads=1 if quick else shape["heads"],
            num_key_value_heads=1 if quick else shape["kv_heads"],
            max_position_embeddings=max(512, shape["max_len"]),
            tie_word_embeddings=False,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
        path = root / f"llama_{vocab}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        torch.manual_seed(1)
        rm = LlamaForSequenceClassification(LlamaConfig(**{**cfg.to_dict(), "num_labels": 1}))
        rm.model.load_state_dict(model.model.state_dict())  # the same body, a seeded score head
        rm.save_pretrained(f"{path}_rm")
        tok.save_pretrained(f"{path}_rm")
        models[vocab] = {
            "path": str(path),
            "rm_path": f"{path}_rm",
            "params": sum(p.numel() for p in model.parameters()),
        }

    # aligner's data order for seed 0, epoch 0 (Trainer._permutation); TRL reads the rows in this order
    def ordered(items: list[dict]) -> list[dict]:
        g = torch.Generator().manual_seed(0)
        return [items[i] for i in torch.randperm(len(items), generator=g).tolist()]

    sft = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in world_rows("sft", n=rows)]
    pref = [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
        for r in world_rows("preference", n=rows)
    ]
    rl = [{"prompt": r["prompt"], "answer": r["answer"]} for r in world_rows("rl", n=rows)]
    data = {}
    for name, items in (("sft", sft), ("pref", pref), ("rl", rl)):
        for order, chosen in (("aligner", items), ("trl", ordered(items))):
            path = root / f"{name}_{order}.jsonl"
            path.write_text("".join(json.dumps(x) + "\n" for x in chosen))
            data[f"{name}_{order}"] = str(path)
    return {"models": models, "data": data}


# --- one run per process --------------------------------------------------------------------------


def child(spec: dict) -> dict:
    # the libraries every framework here reads data and builds models with, imported before the
    # baseline is taken so that none is charged for importing them later: transformers imports its model
    # code lazily, on first use (~90 MiB for the Llama classes and what they import)
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch
    import transformers
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification  # noqa: F401

    transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification  # noqa: B018

    torch.set_num_threads(spec["threads"])
    run = {"bare": run_bare, "aligner": run_aligner, "trl": run_trl}[spec["framework"]]
    return run(spec)


def summarise(ends, tokens, losses, peaks, warmup: int, base: float, start: float) -> dict:
    """Figures over the timed steps: each step's time is the interval between consecutive step ends; the
    peak is the highest resident memory seen at a step's end (what building and training took)."""
    times = [b - a for a, b in zip(ends[warmup - 1 :], ends[warmup:])] if warmup else None
    if not warmup:
        times = [ends[0] - start] + [b - a for a, b in zip(ends, ends[1:])]
    timed_tokens = tokens[warmup:] if warmup else tokens
    total = sum(times)
    return {
        "steps_per_s": len(times) / total,
        "tokens_per_s": sum(timed_tokens) / total,
        "peak_mib": max(peaks) - base,
        "losses": losses[:2],  # the first two steps' (same batches, same start in both frameworks)
        "steps": len(times),
    }


def run_aligner(spec: dict) -> dict:
    # the libraries both runs use are imported before the memory base is taken, as run_trl imports them
    # (with trl's trainers) before its own: import-time memory (datasets alone is ~90 MiB) counts in
    # neither figure
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import yaml

    sys.path.insert(0, str(HERE))
    import aligner.trainers.base as base_mod
    from aligner.config import load_recipe
    from aligner.trainers import dpo, grpo, rm, sft

    base = memory_base(spec)
    ends, tokens, losses, peaks = [], [], [], []
    original = base_mod.Trainer.train_step

    def timed_step(self, step):
        out = original(self, step)
        ends.append(time.perf_counter())
        peaks.append(memory_peak(spec))
        tokens.append(int(out.get("train/tokens", 0)))
        losses.append(float(out["train/loss"]))
        return out

    trainer, s = spec["trainer"], spec
    steps = s["warmup"] + s["steps"]
    source = {"sft": "sft", "rm": "pref", "dpo": "pref", "grpo": "rl"}[trainer]
    recipe = {
        "model": {"init_from": s["model"], "arch": "hf", "dtype": "fp32"},  # fp32 master weights, as TRL
        "data": {"source": s["data"][f"{source}_aligner"], "num_eval_rows": 0, "seq_len": s["max_len"]},
        "train": {
            "out_dir": s["out_dir"],
            "name": f"{trainer}_aligner",
            "max_steps": steps,
            "micro_batch_size": s["batch"] * (s["generations"] if trainer == "grpo" else 1),
            "lr": 1e-5,
            "warmup_steps": 0,
            "min_lr_ratio": 1.0,
            "weight_decay": 0.0,
            "beta2": 0.999,
            "precision": s["precision"],
            "gradient_checkpointing": s["checkpointing"] == "on",
            "eval_every": 0,
            "save_every": 0,
            "progress": False,
            "overwrite": True,
        },
    }
    if trainer == "sft":
        recipe["sft"] = {"accuracy_items": 0, "samples": 0}
    elif trainer == "rm":
        recipe["rm"] = {}
    elif trainer == "dpo":
        recipe["dpo"] = {"accuracy_items": 0, "beta": 0.1}
    else:
        recipe["grpo"] = {
            "num_generations": s["generations"],
            "rewards": ["compare_trl:distinct_reward"],
            "mask_truncated": False,
            "accuracy_items": 0,
        }
        recipe["rollout"] = {
            "max_new_tokens": s["new_tokens"],
            **({"engine": "vllm", "vllm_memory": 0.3} if s.get("vllm") else {}),
        }
    Path(s["out_dir"]).mkdir(parents=True, exist_ok=True)
    path = Path(s["out_dir"]) / f"{trainer}_aligner.yaml"
    path.write_text(yaml.safe_dump(recipe))
    command = {"sft": sft.sft, "rm": rm.rm, "dpo": dpo.dpo, "grpo": grpo.grpo}[trainer]
    base_mod.Trainer.train_step = timed_step
    start = time.perf_counter()
    command(load_recipe(str(path), command=trainer))
    out = summarise(ends, tokens, losses, peaks, s["warmup"], base, start)
    if trainer == "grpo":  # completion tokens: the rollout's mean length x completions per step
        lens = [
            json.loads(line).get("rollout/completion_len")
            for line in open(Path(s["out_dir"]) / "grpo_aligner" / "metrics.jsonl")
        ]
        per_step = [n * s["batch"] * s["generations"] for n in lens if n is not None]
        out["tokens_per_s"] = sum(per_step[s["warmup"] :]) / (out["steps"] / out["steps_per_s"])
    return out


def run_trl(spec: dict) -> dict:
    import datasets
    import transformers
    import trl

    # trl, too, imports a trainer's code when it is first named (~70 MiB for the four): before the
    # baseline, as aligner's trainers are imported before its own
    trl.SFTTrainer, trl.RewardTrainer, trl.DPOTrainer, trl.GRPOTrainer  # noqa: B018
    sys.path.insert(0, str(HERE))
    base = memory_base(spec)
    s, trainer = spec, spec["trainer"]
    steps = s["warmup"] + s["steps"]
    ends, tokens, losses, peaks = [], [], [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())
            peaks.append(memory_peak(spec))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    common = dict(
        output_dir=str(Path(s["out_dir"]) / f"{trainer}_trl"),
        per_device_train_batch_size=s["batch"] * (s["generations"] if trainer == "grpo" else 1),
        max_steps=steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=s["precision"] == "bf16",
        gradient_checkpointing=s["checkpointing"] == "on",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        use_cpu=s.get("device", "cpu") == "cpu",
    )
    source = {"sft": "sft", "rm": "pref", "dpo": "pref", "grpo": "rl"}[trainer]
    dataset = datasets.load_dataset("json", data_files=s["data"][f"{source}_trl"], split="train")
    tokenizer = transformers.AutoTokenizer.from_pretrained(s["model"])
    if trainer == "sft":
        cfg = trl.SFTConfig(max_length=s["max_len"], shuffle_dataset=False, **common)
        model = transformers.AutoModelForCausalLM.from_pretrained(s["model"])
        tr = trl.SFTTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
    elif trainer == "rm":
        cfg = trl.RewardConfig(max_length=s["max_len"], **common)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(s["model"], num_labels=1)
        tr = trl.RewardTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
    elif trainer == "dpo":
        cfg = trl.DPOConfig(max_length=s["max_len"], beta=0.1, **common)
        model = transformers.AutoModelForCausalLM.from_pretrained(s["model"])
        tr = trl.DPOTrainer(model=model, args=cfg, train_dataset=dataset, processing_class=tokenizer)
    else:

        def reward(prompts, completions, completion_ids=None, **kw):
            tokens.append(sum(len(c) for c in completion_ids))
            return distinct_reward(prompts, completions)

        cfg = trl.GRPOConfig(
            num_generations=s["generations"],
            max_completion_length=s["new_tokens"],
            temperature=1.0,
            beta=0.0,
            loss_type="dapo",
            scale_rewards="group",
            shuffle_dataset=False,
            **(
                {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": 0.3}
                if s.get("vllm")
                else {}
            ),
            **common,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(s["model"])
        tr = trl.GRPOTrainer(
            model=model, reward_funcs=reward, args=cfg, train_dataset=dataset, processing_class=tokenizer
        )
    if trainer != "grpo":  # count the real tokens of each collated batch
        collate = tr.data_collator

        def counting(examples):
            batch = collate(examples)
            tokens.append(int(batch["attention_mask"].sum()))
            return batch

        tr.data_collator = counting
    tr.add_callback(Clock())
    start = time.perf_counter()
    tr.train()
    return summarise(ends, tokens[:steps], losses, peaks, s["warmup"], base, start)


def run_bare(spec: dict) -> dict:
    """The model alone: forward, backward and fused AdamW on right-padded batches of the same rows."""
    import contextlib

    import torch
    import torch.nn.functional as F
    import transformers

    base = memory_base(spec)
    s, trainer = spec, spec["trainer"]
    device = torch.device(s.get("device", "cpu"))
    tok = transformers.AutoTokenizer.from_pretrained(s["model"])
    source = {"sft": "sft", "rm": "pref", "dpo": "pref", "grpo": "rl"}[trainer]
    rows = [json.loads(line) for line in open(s["data"][f"{source}_trl"])]

    def ids(messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"][: s["max_len"]]

    if trainer == "sft":
        seqs = [ids(r["prompt"] + r["completion"]) for r in rows]
        per_step = s["batch"]
    elif trainer in ("rm", "dpo"):
        seqs = []
        for r in rows:
            seqs += [ids(r["prompt"] + r["chosen"]), ids(r["prompt"] + r["rejected"])]
        per_step = 2 * s["batch"]
    else:  # a prompt plus new_tokens sampled tokens, G times per prompt
        g = torch.Generator().manual_seed(0)
        seqs = []
        for r in rows:
            for _ in range(s["generations"]):
                seqs.append(ids(r["prompt"]) + torch.randint(0, len(tok), (s["new_tokens"],), generator=g).tolist())
        per_step = s["batch"] * s["generations"]
    if trainer == "rm":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(s["model"], num_labels=1)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(s["model"])
    if s["checkpointing"] == "on":  # the ceiling at the frameworks' own setting
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    bf16 = s["precision"] == "bf16"
    cast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    ends, tokens, losses, peaks = [], [], [], []
    start = time.perf_counter()
    for step in range(s["warmup"] + s["steps"]):
        chunk = seqs[step * per_step : (step + 1) * per_step]
        width = max(map(len, chunk))
        input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in chunk]).to(device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk]).to(device)
        with cast:
            if trainer == "rm":
                scores = model(input_ids=input_ids, attention_mask=mask).logits.float().view(-1, 2)
                loss = -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()
            else:
                labels = input_ids.masked_fill(mask == 0, -100)
                loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        peaks.append(memory_peak(spec))
        if trainer == "grpo":
            tokens.append(s["new_tokens"] * len(chunk))
        else:
            tokens.append(int(mask.sum()))
        losses.append(float(loss))
    return summarise(ends, tokens, losses, peaks, s["warmup"], base, start)


# --- the driver -----------------------------------------------------------------------------------


def spawn(spec: dict, root: Path, memory: bool = False) -> dict:
    """One run in a process of its own. A timing run keeps glibc's default allocator; a memory run
    (`memory`) makes glibc return freed blocks at once, so the peak resident memory follows live tensors,
    which costs a system call per large allocation (over half the run's CPU time went to the kernel): its
    speed is not a figure."""
    path = root / f"spec_{spec['trainer']}_{spec['framework']}_{spec['vocab']}.json"
    path.write_text(json.dumps(spec))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if memory:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{spec['trainer']} / {spec['framework']} / vocab {spec['vocab']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS), choices=TRAINERS)
    p.add_argument("--vocab", nargs="+", type=int, default=[8192, 32768])
    p.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    p.add_argument("--repeats", type=int, default=3, help="timing runs per framework (medians and ranges)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="sequences (pairs; GRPO: prompts) per step")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--generations", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--new-tokens", type=int, default=96, help="GRPO completion length")
    p.add_argument("--grpo-steps", type=int, default=3, help="timed GRPO steps (each samples a rollout)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--checkpointing",
        choices=("on", "off"),
        default="on",
        help="gradient checkpointing in both (TRL's default: on)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--hidden", type=int, default=None, help="model width (CPU 256, GPU 1024)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (CPU 8, GPU 32)")
    p.add_argument("--heads", type=int, default=None, help="query heads (CPU 4, GPU 16)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (CPU 2, GPU 4)")
    p.add_argument("--vllm", action="store_true", help="GRPO generates with vLLM in both frameworks (GPU)")
    p.add_argument("--quick", action="store_true", help="tiny model, one timed step each: a smoke test")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(Path(args.child).read_text()))))
        return
    if args.quick:
        args.vocab, args.steps, args.warmup, args.grpo_steps, args.repeats = [min(args.vocab)], 1, 1, 1, 1
        args.batch, args.max_len, args.generations, args.new_tokens = 2, 192, 2, 8
    gpu = args.device == "cuda"
    shape = (
        dict(hidden=1024, layers=32, heads=16, kv_heads=4) if gpu else dict(hidden=256, layers=8, heads=4, kv_heads=2)
    )
    for key, value in shape.items():
        setattr(args, key, getattr(args, key) or value)
    if gpu and "--max-len" not in sys.argv:
        args.max_len = 1024
    if args.precision == "auto":
        from aligner.model.quant import cpu_has_fast_bf16

        args.precision = "bf16" if gpu or cpu_has_fast_bf16() else "fp32"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = (args.warmup + max(args.steps, args.grpo_steps)) * args.batch
        shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "max_len")}
        inputs = build_inputs(root, args.vocab, args.quick, rows, shape)
        for vocab in args.vocab:
            for trainer in args.trainers:
                steps = args.grpo_steps if trainer == "grpo" else args.steps
                row = {"trainer": trainer, "vocab": vocab, "params": inputs["models"][vocab]["params"]}

                def spec(framework: str, trainer=trainer, vocab=vocab, steps=steps, **changes) -> dict:
                    return {
                        "trainer": trainer,
                        "framework": framework,
                        "vocab": vocab,
                        "model": inputs["models"][vocab]["rm_path" if trainer == "rm" else "path"],
                        "data": inputs["data"],
                        "out_dir": str(root / "runs"),
                        "steps": steps,
                        **{k: getattr(args, k) for k in ("warmup", "batch", "max_len", "generations", "new_tokens")},
                        **{k: getattr(args, k) for k in ("precision", "threads", "checkpointing", "device", "vllm")},
                        **changes,
                    }

                runs = {framework: [] for framework in FRAMEWORKS}
                for r in range(args.repeats):  # aligner and TRL alternate who goes first
                    for framework in ("bare", "aligner", "trl") if r % 2 == 0 else ("bare", "trl", "aligner"):
                        runs[framework].append(spawn(spec(framework), root))
                        print(
                            f"  {trainer} {vocab} {framework} #{r + 1}: {json.dumps(runs[framework][-1])}",
                            file=sys.stderr,
                        )
                for framework in FRAMEWORKS:
                    row[framework] = summary(runs[framework])
                    if args.device == "cpu":  # peak memory from a run of its own (see `spawn`), 2 steps
                        memory = spawn(spec(framework, warmup=1, steps=1), root, memory=True)["peak_mib"]
                        row[framework]["peak_mib"] = memory
                results.append(row)
    print_table(results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = [r for r in results if not loss_parity(r, args.precision)[1]]
    if failed:
        sys.exit("first-step losses differ: " + ", ".join(f"{r['trainer']} vocab {r['vocab']}" for r in failed))


def summary(runs: list[dict]) -> dict:
    """The median run's figures with the spread over the repeats: tokens/s as median and (min, max)."""
    speeds = sorted(r["tokens_per_s"] for r in runs)
    middle = statistics.median(speeds)
    best = min(runs, key=lambda r: abs(r["tokens_per_s"] - middle))
    return {
        **best,
        "tokens_per_s": middle,
        "tokens_per_s_range": [speeds[0], speeds[-1]],
        "repeats": [r["tokens_per_s"] for r in runs],
        "peak_mib": statistics.median(r["peak_mib"] for r in runs),
        "losses": runs[0]["losses"],
    }


def loss_parity(row: dict, precision: str) -> tuple[str, bool]:
    """The first two steps' losses of aligner and TRL, and whether they agree: within 2e-5 in fp32, 2e-3
    relative under bf16 autocast (GRPO samples: not compared)."""
    if row["trainer"] == "grpo":
        return "-", True
    a, t = row["aligner"]["losses"], row["trl"]["losses"]
    tol = (lambda y: 2e-5) if precision == "fp32" else (lambda y: 2e-3 * max(1.0, abs(y)))
    same = len(a) == len(t) and all(abs(x - y) <= tol(y) for x, y in zip(a, t))
    return " ".join(f"{x:.4f}/{y:.4f}" for x, y in zip(a, t)), same


def device_name(args) -> str:
    if args.device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return f"CPU {name or '?'} ({os.cpu_count()} cores), {args.threads} threads"


def spread(f: dict) -> str:
    low, high = f["tokens_per_s_range"]
    return f"{f['tokens_per_s']:,.0f} ({low:,.0f}-{high:,.0f})"


def print_table(results: list[dict], args) -> None:
    """Medians over the repeats with their (min-max) ranges; the ratio's range pairs the repeats in order."""
    print(
        f"\naligner vs TRL {__import__('trl').__version__}, {device_name(args)}, "
        f"{args.precision}, {time.strftime('%Y-%m-%d')}; batch {args.batch}, max length {args.max_len}; GRPO "
        f"{args.generations} x {args.new_tokens} new tokens; gradient checkpointing {args.checkpointing} (bare too); "
        f"{args.repeats} repeats, medians (min-max)"
    )
    print(
        "| trainer | vocab | aligner tokens/s | TRL tokens/s | ratio | bare tokens/s | aligner / bare | aligner MiB "
        "| TRL MiB | memory ratio | loss steps 1, 2 (aligner / TRL) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        a, t, b = r["aligner"], r["trl"], r["bare"]
        ratios = sorted(x / y for x, y in zip(a["repeats"], t["repeats"]))
        print(
            f"| {r['trainer']} | {r['vocab'] // 1024}k | {spread(a)} | {spread(t)} | "
            f"**{a['tokens_per_s'] / t['tokens_per_s']:.2f}x** ({ratios[0]:.2f}-{ratios[-1]:.2f}) | {spread(b)} | "
            f"{a['tokens_per_s'] / b['tokens_per_s']:.2f} | {a['peak_mib']:,.0f} | {t['peak_mib']:,.0f} | "
            f"**{a['peak_mib'] / t['peak_mib']:.2f}** | {loss_parity(r, args.precision)[0]} |"
        )


if __name__ == "__main__":
    main()
