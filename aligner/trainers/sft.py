"""Supervised fine-tuning and pretraining: next-token cross-entropy over loss tokens.

    aligner sft recipes/chat.yaml                 # chat SFT of the pretrained GPT core (the default recipe)
    aligner sft recipes/sft_lora.yaml             # an HF model with LoRA adapters
    aligner pretrain recipes/pretrain.yaml        # GPT core + BPE tokenizer from scratch, packed text

Pretraining is not a separate trainer: it is SFT over packed plain text with every token in the
loss. Chat SFT renders each conversation with the chat template and puts only assistant tokens (each
turn's end-of-turn token included) in the loss (aligner.data.chat). The loss is summed over loss
tokens and divided by the loop by the number of loss tokens in the whole accumulated batch
(REFERENCE.md, SFT). With `sft.packing` each micro-batch is packed padding-free: the same examples,
the same loss, fewer padded positions.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from aligner.config import Recipe, resolve_path
from aligner.data.chat import encode_dataset, pad_token_id
from aligner.data.collate import PackedText, pack_examples, pad_examples
from aligner.data.formats import add_system_prompt, to_records
from aligner.data.sources import load_rows, mix_rows, mix_shares
from aligner.errors import ConfigError, DataError
from aligner.model.gpt import GPTConfig
from aligner.model.heads import ScalarHeadModel, is_reward_checkpoint, load_reward_model
from aligner.model.load import (
    adapter_base,
    apply_lora,
    base_config,
    build_model,
    build_quantized_model,
    causal_lm_token_logprobs,
    has_tokenizer,
    load_tokenizer,
)
from aligner.model.tokenizer import load_chat_template, system_prompt, train_tokenizer
from aligner.tracking import main_process
from aligner.trainers.base import Trainer, prepare_run_dir


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
        # summed token NLL over the loss tokens (losses.sft_loss), the head fused with the log-softmax
        logps = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"], batch.get("position_ids"))
        return -logps.sum(), {}


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


def load_splits(recipe: Recipe, world_kind: str) -> tuple[list[dict], list[dict]]:
    """Training and eval rows as the recipe's data section says.

    Training rows come from data.source, or from data.mix (`aligner.data.sources.mix_rows`: shares of
    data.num_rows by weight, else the largest mix that repeats no row, shuffled with data.world_seed; with
    data.streaming each source streams just its share). Eval rows come from data.eval_source, else the task
    world's eval split (a world source), else a seeded data.eval_fraction slice held out of the training
    rows (every copy of a held-out row leaves training); none with data.num_eval_rows 0. data.subset and
    data.columns apply to data.source and data.eval_source alike (each mix source has its own).
    """
    d = recipe.data
    common = dict(seed=d.world_seed, levels=tuple(d.world_levels), world_kind=world_kind, text_field=d.text_field)
    common.update(streaming=d.streaming)
    own = dict(subset=d.subset, columns=d.columns)
    if main_process():  # reading (or generating) a large dataset takes a while: say so first
        what = ", ".join(m.source for m in d.mix) if d.mix else f"{d.source} ({d.split})"
        print(f"data: reading {what}" + (f", {d.num_rows} rows" if d.num_rows else ""), flush=True)
    if d.mix:
        train = _mixed_rows(recipe, common)
    else:
        train = load_rows(d.source, d.split, n=d.num_rows, **own, **common)
    if not train:
        raise DataError(f"data.source '{d.source}' (split {d.split}) has no rows")
    if d.num_eval_rows == 0:
        evals = []
    elif d.eval_source:
        evals = load_rows(d.eval_source, d.eval_split, n=d.num_eval_rows, **own, **common)
    elif d.source.startswith("world") and not d.mix:
        evals = load_rows(d.source, d.eval_split, n=d.num_eval_rows, **own, **common)
    else:  # hold out a seeded slice of the training rows (a mix repeats rows as the same objects: keyed by id)
        keys = list(dict.fromkeys(id(r) for r in train))
        random.Random(d.world_seed).shuffle(keys)
        n_eval = round(len(keys) * d.eval_fraction)
        if d.num_eval_rows is not None:
            n_eval = min(n_eval, d.num_eval_rows)
        held = set(keys[:n_eval])
        evals = list({id(r): r for r in train if id(r) in held}.values())
        train = [r for r in train if id(r) not in held]
    return train, evals


def _mixed_rows(recipe: Recipe, common: dict) -> list[dict]:
    """data.mix's sources, loaded (with streaming, just each one's share) and mixed by weight."""
    d = recipe.data
    weights = [m.weight for m in d.mix]
    shares = mix_shares(weights, d.num_rows) if d.streaming and d.num_rows else [None] * len(d.mix)
    parts = [
        load_rows(m.source, m.split, n=share, subset=m.subset, columns=m.columns, **common) if share != 0 else []
        for m, share in zip(d.mix, shares)
    ]
    names = [f"data.mix[{i}] '{m.source}'" for i, m in enumerate(d.mix)]
    return mix_rows(parts, weights, d.num_rows, d.world_seed, names)


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


# --- chat SFT ------------------------------------------------------------------------------------------


def sft_tokenizer(recipe: Recipe):
    """The tokenizer of tokenizer.path or model.init_from, with the recipe's chat template attached."""
    t, m, s = recipe.tokenizer, recipe.model, recipe.sft
    path = t.path or m.init_from
    if not path:
        raise ConfigError("sft needs a tokenizer: set model.init_from (a checkpoint or HF model) or tokenizer.path")
    what = "tokenizer.path" if t.path else "model.init_from"
    tokenizer = load_tokenizer(path, trust_remote_code=m.trust_remote_code, what=what)
    chosen = any(k.endswith(".chat_template") for k in recipe.explicit)
    if s.chat_template and tokenizer.chat_template and not chosen and not trained_here(m.init_from):
        print(
            f"keeping the chat template of '{path}' ({recipe.path or 'the default recipe'}'s {s.chat_template} is "
            "for the task-world core; set --sft.chat_template to use another)"
        )
        s.chat_template = None  # the saved recipe says what was used
    elif s.chat_template:  # attached, so every checkpoint of the run carries the template it was trained with
        tokenizer.chat_template = load_chat_template(s.chat_template)
    if not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer of '{path}' has no chat template; set sft.chat_template (e.g. chatml)")
    return tokenizer


# Learning rates for models this toolkit did not train (Hub models), by command, for full fine-tuning and for
# LoRA, at up to 1.5B parameters; halved up to 15B, quartered beyond. Values common in the field: SFT 2e-5
# (Zephyr, Alpaca), reward models 1e-5, DPO 5e-7 (Zephyr, Tulu 3), GRPO 1e-6 (TRL), PPO 3e-6 (InstructGPT /
# TRL), and ten times more for LoRA adapters. The recipes' own rates are tuned for the task world's ~1M-param
# core and are far too high for a pretrained model.
HF_LEARNING_RATES = {
    "sft": (2e-5, 2e-4),
    "rm": (1e-5, 1e-4),
    "dpo": (5e-7, 5e-6),
    "grpo": (1e-6, 1e-5),
    "ppo": (3e-6, 3e-5),
}


def default_lr(stage: str, lora: bool, n_params: int) -> float:
    """The learning rate for `stage` on a pretrained model of `n_params` parameters (HF_LEARNING_RATES).

    >>> default_lr("sft", False, 494_000_000), default_lr("dpo", True, 8_000_000_000)
    (2e-05, 2.5e-06)
    """
    lr = HF_LEARNING_RATES[stage][int(lora)]
    return lr if n_params <= 1.5e9 else lr / 2 if n_params <= 15e9 else lr / 4


def trained_here(init_from: str | None) -> bool:
    """Whether the start model is fresh or a checkpoint this toolkit wrote (it saves recipe.yaml beside it)."""
    return not init_from or (resolve_path(init_from) / "recipe.yaml").is_file()


def resolve_lr(recipe: Recipe, model: torch.nn.Module, stage: str) -> None:
    """Set train.lr for a pretrained model when the user did not choose one (by a flag or in their own
    recipe): the shipped recipes' rates are tuned for the task world's core, which they keep (a GPT core
    this toolkit trained). Any other model, a Hub model or one fine-tuned from it here, gets
    `default_lr`. Prints what it chose."""
    core = isinstance(base_config(model), GPTConfig)
    if (core and trained_here(recipe.model.init_from)) or "train.lr" in recipe.explicit:
        return
    n = sum(p.numel() for p in model.parameters())
    lr = default_lr(stage, recipe.lora.enabled, n)
    if lr != recipe.train.lr:
        print(
            f"{stage}: train.lr {lr:g} for {training_kind(recipe)} training of a {n / 1e6:.1f}M-param pretrained "
            f"model, instead of {recipe.train.lr:g} (a rate for the task world's core); set --lr to choose"
        )
    recipe.train.lr = lr


def prepare_model(
    recipe: Recipe, tokenizer, scalar_head: bool = False, keep_lm_head: bool = False, stage: str = "sft"
) -> torch.nn.Module:
    """The model to train: GPT core or HF model, with a scalar head instead of the LM head when asked
    (reward models; `keep_lm_head` keeps the LM head beside it), and LoRA / QLoRA adapters when the
    recipe asks for them. `stage` picks the learning rate for a pretrained model (`resolve_lr`)."""
    torch.manual_seed(recipe.train.seed)  # same initial weights (and adapters) on every process and run
    lora = recipe.lora
    init = resolve_path(recipe.model.init_from) if recipe.model.init_from else None
    if scalar_head and init is not None and is_reward_checkpoint(init) and lora.quantize != "nf4":
        if keep_lm_head:
            raise ConfigError(
                f"rm.lm_coef and rm.likelihood_coef need a causal LM to start from; '{init}' is a reward model"
            )
        model = load_reward_model(init).train()  # continue a reward model: its head too
    elif lora.enabled and lora.quantize == "nf4":
        model = build_quantized_model(recipe.model, lora, tokenizer)
    else:
        model = build_model(recipe.model, tokenizer)
    if scalar_head and not isinstance(model, ScalarHeadModel):
        model = ScalarHeadModel.from_causal_lm(model, keep_lm_head=keep_lm_head)
    resolve_lr(recipe, model, stage)
    if lora.enabled:
        model = apply_lora(model, lora, base_path=adapter_base(recipe.model))
    return model


def training_kind(recipe: Recipe) -> str:
    """QLoRA, LoRA or full: what the run trains, for its start-up message."""
    return "QLoRA" if recipe.lora.quantize == "nf4" else "LoRA" if recipe.lora.enabled else "full"


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


def train_and_score(trainer: Trainer, model, tokenizer, items: int, max_new_tokens: int) -> dict:
    """Run the trainer; then, on the main process and on the task world, held-out accuracy of `model` (the
    policy inside whatever the trainer trains). Returns {"metrics", "run_dir", "samples", "is_main"[, "accuracy"]}."""
    metrics = trainer.train()
    result = {"metrics": metrics, "run_dir": str(trainer.run_dir), "samples": [], "is_main": trainer.is_main}
    if trainer.is_main and items and trainer.recipe.data.source.startswith("world"):
        result["accuracy"] = final_accuracy(trainer.recipe, model(), tokenizer, items, max_new_tokens, trainer.run_dir)
    return result


def final_accuracy(recipe: Recipe, model, tokenizer, items: int, max_new_tokens: int, run_dir: Path) -> dict:
    """Held-out exact-match accuracy on the task world's test split, also written to run_dir/accuracy.json."""
    from aligner.data.world import world_rows
    from aligner.evaluate import exact_match

    d = recipe.data
    rows = world_rows("rl", "test", n=items, seed=d.world_seed, levels=tuple(d.world_levels))
    acc = exact_match(model, tokenizer, rows, max_new_tokens=max_new_tokens, progress=True)
    summary = {k: v for k, v in acc.items() if k != "completions"} | {"split": "test"}
    (Path(run_dir) / "accuracy.json").write_text(json.dumps(summary, indent=1))
    return acc
