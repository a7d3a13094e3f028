"""Supervised fine-tuning and pretraining: next-token cross-entropy over loss tokens.

    aligner sft recipes/chat.yaml                 # chat SFT of the pretrained GPT core (the default recipe)
    aligner sft recipes/sft_lora.yaml             # an HF model with LoRA adapters
    aligner pretrain recipes/pretrain.yaml        # GPT core + BPE tokenizer from scratch, packed text

Pretraining is not a separate trainer: it is SFT over packed plain text with every token in the
loss. Chat SFT renders each conversation with the chat template and puts only assistant tokens (each
turn's end-of-turn token included) in the loss (aligner.data.chat). The loss is summed over loss
tokens and divided by the loop by the number of loss tokens in the whole accumulated batch, so gradient
accumulation gives the gradient of one large batch (a per-micro-batch mean would not). With
`sft.packing` each micro-batch is packed padding-free: the same examples, the same loss, fewer padded
positions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligner.config import Recipe
from aligner.data.chat import encode_dataset, pad_token_id
from aligner.data.collate import PackedText, pack_examples, pad_examples
from aligner.data.formats import add_system_prompt, to_records
from aligner.errors import DataError
from aligner.losses import sft_loss
from aligner.model.forward import causal_lm_token_logprobs
from aligner.model.load import build_model, has_tokenizer, load_tokenizer
from aligner.model.tokenizer import load_chat_template, system_prompt, train_tokenizer
from aligner.trainers.base import Trainer, prepare_run_dir
from aligner.trainers.setup import (
    load_splits,
    prepare_model,
    sft_tokenizer,
    train_and_score,
    trained_model,
    training_kind,
)


class SFTTrainer(Trainer):
    """Examples are {"input_ids", "labels"} with shifted labels; the loss is summed token NLL."""

    stage = "sft"
    packing = False  # padding-free packing of each micro-batch into rows of `row_len` tokens
    row_len = 0

    def collate(self, examples: list) -> dict:
        if self.packing:
            return pack_examples(examples, self.pad_id, self.row_len)
        return pad_examples(examples, self.pad_id)

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        # log-probs of the loss tokens, the LM head fused with the log-softmax; their summed NLL
        logps = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"], batch.get("position_ids"))
        return sft_loss(logps, batch["labels"])[0], {}


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
    """Training and eval documents for pretraining."""
    d = recipe.data
    train, evals = load_splits(recipe, "pretrain")
    return _texts(train, d.text_field, d.source), (_texts(evals, d.text_field, "the eval split") if evals else [])


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
        model = trained_model(trainer, trainer.unwrapped)
        texts = eval_texts or train_texts
        result["samples"] = sample_continuations(model, tokenizer, texts, recipe.sft.samples, recipe.sft.sample_tokens)
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


# --- chat SFT ------------------------------------------------------------------------------------------


def encode_conversations(recipe: Recipe, tokenizer) -> tuple[list[dict], list[dict] | None, str]:
    """Train and eval examples (input_ids, shifted labels) and a one-line report of what was kept."""
    d, s = recipe.data, recipe.sft
    train_rows, eval_rows = load_splits(recipe, "sft")
    where = f"data.source '{d.source}'"
    system = system_prompt(d.system_prompt)
    train_recs = add_system_prompt(to_records(train_rows, d.format, where), system)
    if "messages" not in train_recs[0]:
        raise DataError(f"{where} holds plain text, not conversations; train on it with `aligner pretrain`")
    opts = dict(train_on=s.train_on, overlong=s.overlong)
    train, report = encode_dataset(train_recs, tokenizer, d.seq_len, source=where, **opts)
    evals = None
    if eval_rows:
        eval_recs = add_system_prompt(to_records(eval_rows, d.format, "the eval split"), system)
        evals, _ = encode_dataset(eval_recs, tokenizer, d.seq_len, source="the eval split", **opts)
    return train, evals, report.summary()


def sft(recipe: Recipe) -> dict:
    """Chat SFT: render, mask, (pack,) train; returns eval metrics, held-out accuracy and samples."""
    d, s = recipe.data, recipe.sft
    tokenizer = sft_tokenizer(recipe)
    train_data, eval_data, report = encode_conversations(recipe, tokenizer)
    model = prepare_model(recipe, tokenizer)
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    prepare_run_dir(run_dir, recipe.train.resume, recipe.train.overwrite)  # inputs are valid by now
    trainer = SFTTrainer(recipe, model, tokenizer, train_data, eval_data)
    trainer.packing, trainer.row_len = s.packing, d.seq_len
    if trainer.is_main:
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        kind = training_kind(recipe)
        print(f"sft: {report}")
        print(
            f"sft: {kind}, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M params trained, {trainer.total_steps} steps, "
            f"packing {'on' if s.packing else 'off'}, precision {trainer.precision}, {trainer.world} process(es) "
            f"-> {run_dir}"
        )
    result = train_and_score(trainer, trainer.unwrapped, tokenizer, s.accuracy_items, s.accuracy_tokens)
    metrics = result["metrics"]
    if "accuracy" in result:
        acc = result["accuracy"]
        result["samples"] = [(c["answer"], c["completion"]) for c in acc["completions"][: s.samples]]
        metrics.update({"eval/accuracy": acc["accuracy"], "eval/accuracy_lo": acc["ci95"][0]})
        metrics["eval/accuracy_hi"] = acc["ci95"][1]
    return result
