"""What every training command shares before and after its loop: the recipe's rows (one source, a mix, the
eval split), the tokenizer with its chat template, the model to train (GPT core or transformers, a scalar
head, LoRA / QLoRA adapters) at a learning rate that fits it, the online commands' encoded prompts and reward
set, and the held-out task-world accuracy at the end. Each command (aligner.trainers.<algorithm>) calls these
and adds only what is its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from aligner.config import Recipe, resolve_path, trained_here
from aligner.data.sources import load_rows, mix_rows, mix_shares
from aligner.errors import ConfigError, DataError
from aligner.model.forward import base_config
from aligner.model.gpt import GPTConfig
from aligner.model.heads import ScalarHeadModel, is_reward_checkpoint, load_reward_model
from aligner.model.load import adapter_base, apply_lora, build_model, load_model, load_tokenizer
from aligner.model.quant import build_quantized_model
from aligner.model.tokenizer import load_chat_template
from aligner.tracking import main_process
from aligner.trainers.base import Trainer

# --- rows ------------------------------------------------------------------------------------------------


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


# --- tokenizer and model -----------------------------------------------------------------------------


def sft_tokenizer(recipe: Recipe, section: str = "sft"):
    """The tokenizer of tokenizer.path or model.init_from, with the chat template of the command's own
    section (`<section>.chat_template`), else sft.chat_template, attached; else the tokenizer's own. A
    template a default recipe names for the task world's core is not forced on a model that has one."""
    t, m = recipe.tokenizer, recipe.model
    template = getattr(recipe, section).chat_template or recipe.sft.chat_template
    path = t.path or m.init_from
    if not path:
        raise ConfigError("sft needs a tokenizer: set model.init_from (a checkpoint or HF model) or tokenizer.path")
    what = "tokenizer.path" if t.path else "model.init_from"
    tokenizer = load_tokenizer(path, trust_remote_code=m.trust_remote_code, what=what)
    chosen = any(k.endswith(".chat_template") for k in recipe.explicit)
    if template and tokenizer.chat_template and not chosen and not trained_here(m.init_from):
        print(
            f"keeping the chat template of '{path}' ({recipe.path or 'the default recipe'}'s {template} is "
            f"for the task-world core; set --{section}.chat_template to use another)"
        )
    elif template:  # attached, so every checkpoint of the run carries the template it was trained with
        tokenizer.chat_template = load_chat_template(template)
    if not tokenizer.chat_template:
        raise ConfigError(f"the tokenizer of '{path}' has no chat template; set sft.chat_template (e.g. chatml)")
    return tokenizer


def default_lr(stage: str, lora: bool, n_params: int) -> float:
    """The learning rate for `stage` on a pretrained model of `n_params` parameters: the algorithm's `hub_lr`
    (aligner.registry), for full fine-tuning or LoRA, halved above 1.5B parameters and quartered above 15B.

    >>> default_lr("sft", False, 494_000_000), default_lr("dpo", True, 8_000_000_000)
    (2e-05, 2.5e-06)
    """
    from aligner.registry import ALGORITHMS

    lr = ALGORITHMS[stage].hub_lr[int(lora)]
    return lr if n_params <= 1.5e9 else lr / 2 if n_params <= 15e9 else lr / 4


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


# --- after the loop -------------------------------------------------------------------------------------


def train_and_score(trainer: Trainer, model, tokenizer, items: int, max_new_tokens: int) -> dict:
    """Run the trainer; then, on the main process and on the task world, held-out accuracy of `model` (the
    policy inside whatever the trainer trains). Returns {"metrics", "run_dir", "samples", "is_main"[, "accuracy"]}."""
    metrics = trainer.train()
    result = {"metrics": metrics, "run_dir": str(trainer.run_dir), "samples": [], "is_main": trainer.is_main}
    if trainer.is_main and items and trainer.recipe.data.source.startswith("world"):
        scored = trained_model(trainer, model)
        result["accuracy"] = final_accuracy(trainer.recipe, scored, tokenizer, items, max_new_tokens, trainer.run_dir)
    return result


def trained_model(trainer: Trainer, model) -> torch.nn.Module:
    """The trained model for the main process to run alone after training: `model()`, or where the training was
    sharded (which runs a forward only with every process) the gathered final weights, loaded afresh."""
    return load_model(trainer.run_dir / "final").to(trainer.device) if trainer.sharded else model()


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


# --- the online commands' prompts and rewards -------------------------------------------------------------


def encode_prompts(
    rows: list[dict], tokenizer, max_prompt_len: int, source: str, system: str | None = None
) -> tuple[list[dict], int]:
    """Prompt records with their token ids (rendered with the generation prompt, as at rollout), dropping
    prompts over `max_prompt_len` tokens; returns the records and how many were dropped. `system`: a
    system turn for prompts without one (data.system_prompt)."""
    from aligner.data.chat import encode_prompt
    from aligner.data.formats import add_system_prompt, to_prompt_records
    from aligner.tracking import phase

    out, dropped = [], 0
    for rec in phase(add_system_prompt(to_prompt_records(rows, source), system), f"encoding {source}", "prompt"):
        ids = encode_prompt(tokenizer, rec["prompt"])
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        out.append({**rec, "prompt_ids": ids})
    if not out:
        raise DataError(
            f"{source}: every prompt is longer than data.seq_len - max_new_tokens = {max_prompt_len} tokens; "
            "raise data.seq_len or lower max_new_tokens"
        )
    return out, dropped


def reward_set_of(names: list[str], weights: list[float], reward_model: str | None):
    """The recipe's reward functions, with a reward model scored first (as `reward_model`) when one is named."""
    from aligner.rewards import RewardModelScorer, RewardSet, resolve_reward

    fns, labels = [resolve_reward(name) for name in names], list(names)
    if reward_model:
        fns.insert(0, RewardModelScorer(reward_model))
        labels.insert(0, "reward_model")
    return RewardSet(fns, weights or None, labels)
