"""Supervised fine-tuning and pretraining: next-token cross-entropy over loss tokens.

    aligner pretrain recipes/pretrain.yaml        # GPT core + BPE tokenizer from scratch, packed text
    aligner pretrain --max_steps 200 --lr 1e-3    # flags override the recipe

Pretraining is not a separate trainer: it is SFT over packed plain text with every token in the
loss. The loss is summed over loss tokens and divided by the loop by the number of loss tokens in
the whole accumulated batch (REFERENCE.md, SFT).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from aligner.config import Recipe
from aligner.data.collate import PackedText, pad_examples
from aligner.data.sources import load_rows
from aligner.errors import DataError
from aligner.losses import sft_loss
from aligner.model.load import build_model, has_tokenizer, load_tokenizer, logits_of
from aligner.model.tokenizer import load_chat_template, train_tokenizer
from aligner.trainers.base import Trainer, prepare_run_dir


class SFTTrainer(Trainer):
    """Examples are {"input_ids", "labels"} with shifted labels; the loss is summed token NLL."""

    stage = "sft"

    def collate(self, examples: list) -> dict:
        return pad_examples(examples, self.tokenizer.pad_token_id)

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = logits_of(model(batch["input_ids"]))  # (B, T, V)
        loss, _ = sft_loss(logits, batch["labels"])
        return loss, {}


# --- pretraining ---------------------------------------------------------------------------------------


def _texts(rows: list[dict], field: str, source: str) -> list[str]:
    if field not in rows[0]:
        raise DataError(
            f"data.source '{source}' has no column '{field}' (columns: {', '.join(rows[0])}); set data.text_field"
        )
    texts = [r[field] for r in rows if isinstance(r.get(field), str) and r[field].strip()]
    if not texts:
        raise DataError(f"data.source '{source}': column '{field}' holds no non-empty text")
    return texts


def load_text_splits(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Training and eval documents for pretraining, as the recipe's data section says."""
    d = recipe.data
    common = dict(seed=d.world_seed, levels=tuple(d.world_levels), world_kind="pretrain", text_field=d.text_field)

    def texts(source: str, split: str, n: int | None) -> list[str]:
        return _texts(load_rows(source, split, n=n, **common), d.text_field, source)

    train = texts(d.source, d.split, d.num_rows)
    if d.eval_source:
        evals = texts(d.eval_source, d.eval_split, d.num_eval_rows)
    elif d.source.startswith("world"):
        evals = texts(d.source, d.eval_split, d.num_eval_rows)
    else:  # hold out a seeded slice of the training documents
        order = list(range(len(train)))
        random.Random(d.world_seed).shuffle(order)
        n_eval = round(len(train) * d.eval_fraction)
        if d.num_eval_rows is not None:
            n_eval = min(n_eval, d.num_eval_rows)
        held = set(order[:n_eval])
        evals = [t for i, t in enumerate(train) if i in held]
        train = [t for i, t in enumerate(train) if i not in held]
    return train, evals


def get_tokenizer(recipe: Recipe, texts: list[str]):
    """The recipe's tokenizer, the init checkpoint's, or a byte-level BPE trained on `texts`."""
    t, m = recipe.tokenizer, recipe.model
    if t.path:
        return load_tokenizer(t.path, trust_remote_code=m.trust_remote_code)
    if m.init_from and has_tokenizer(m.init_from):
        return load_tokenizer(m.init_from, trust_remote_code=m.trust_remote_code)
    template = load_chat_template(t.chat_template)
    return train_tokenizer(texts[: t.train_rows], vocab_size=t.vocab_size, chat_template=template)


def pack(texts: list[str], tokenizer, seq_len: int, what: str) -> PackedText:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    packed = PackedText(ids, seq_len, tokenizer.eos_token_id)
    if len(packed) == 0:
        total = sum(len(x) + 1 for x in ids)
        raise DataError(
            f"{what} gives {total} tokens, fewer than one sequence of data.seq_len + 1 = {seq_len + 1}; "
            "lower data.seq_len or add text"
        )
    return packed


def pretrain(recipe: Recipe) -> dict:
    """Train tokenizer (if needed) and model on packed text; returns final eval metrics and samples."""
    d = recipe.data
    train_texts, eval_texts = load_text_splits(recipe)
    tokenizer = get_tokenizer(recipe, train_texts)
    train_data = pack(train_texts, tokenizer, d.seq_len, f"data.source '{d.source}'")
    eval_data = pack(eval_texts, tokenizer, d.seq_len, "the eval split") if eval_texts else None
    torch.manual_seed(recipe.train.seed)  # same initial weights on every process and every run
    model = build_model(recipe.model, tokenizer)
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    # Everything above can fail on bad input; only now is the run directory touched.
    prepare_run_dir(run_dir, recipe.train.resume, recipe.train.overwrite)
    trainer = SFTTrainer(recipe, model, tokenizer, train_data, eval_data)
    trainer.stage = "pretrain"
    if trainer.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"pretrain: {n_params / 1e6:.2f}M params, {len(train_data)} sequences of {d.seq_len} tokens "
            f"({len(train_data) * d.seq_len / 1e6:.2f}M tokens), {trainer.total_steps} steps, "
            f"precision {trainer.precision}, {trainer.world} process(es) -> {run_dir}"
        )
    metrics = trainer.train()
    result = {"metrics": metrics, "run_dir": str(run_dir), "samples": [], "is_main": trainer.is_main}
    if trainer.is_main and recipe.sft.samples > 0:
        result["samples"] = sample_continuations(
            trainer.unwrapped(), tokenizer, eval_texts or train_texts, recipe.sft.samples, recipe.sft.sample_tokens
        )
    return result


def sample_continuations(model, tokenizer, texts: list[str], n: int, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy continuations of the first few words of `n` documents (what `make demo` prints)."""
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine

    prompts = [" ".join(t.split()[:8]) for t in texts[:n]]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    engine = TorchEngine(model, pad_id=tokenizer.pad_token_id)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=(tokenizer.eos_token_id,))
    outs = engine.generate(ids, params)
    return [(p, tokenizer.decode(o.token_ids, skip_special_tokens=True)) for p, o in zip(prompts, outs)]
