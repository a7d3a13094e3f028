"""DPO's training data: preference rows encoded with the chat template (KTO: unpaired rows with their KL
partners), and on-policy pairs sampled from the start model and judged by the rows' answers
(`dpo.sample_pairs`, cached under `dpo.ref_cache_dir`); see aligner.trainers.dpo."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from aligner.config import Recipe
from aligner.data.chat import encode_preferences, pad_token_id
from aligner.data.formats import add_system_prompt
from aligner.data.preferences import to_preference_records, unpair, with_kl_partners
from aligner.errors import DataError
from aligner.model.tokenizer import system_prompt
from aligner.tracking import main_process, phase


def weights_hash(model: torch.nn.Module) -> hashlib._Hash:
    """A hash of the model's weights (a sharded or partitioned model's whole weights: every process must call it
    then; ZeRO-3 partitions are hashed a gathered tensor at a time)."""
    from torch.distributed.tensor import DTensor

    from aligner.trainers import zero

    h = hashlib.sha256()
    if zero.partitioned(model):
        digests = {
            k: hashlib.sha256(p.float().cpu().numpy().tobytes()).digest() for k, p in zero.gathered_parameters(model)
        }
        for name in sorted(digests):
            h.update(name.encode() + digests[name])
        return h
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        p = p.full_tensor() if isinstance(p, DTensor) else p
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h


@torch.no_grad()
def sample_replies(model, tokenizer, rows: list[dict], o, seed: int) -> list[dict]:
    """`o.sample_pairs` sampled replies per prompt of `rows` (and the greedy reply with `o.sample_greedy`),
    as {"samples": [text, ...], "greedy": text or None} per row."""
    from aligner.data.chat import encode_prompt, reply_stop_ids
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine

    n = o.sample_pairs
    engine = TorchEngine(model, pad_id=pad_token_id(tokenizer))
    params = SamplingParams(
        max_new_tokens=o.sample_tokens,
        temperature=o.sample_temperature,
        n=n,
        stop_ids=tuple(reply_stop_ids(tokenizer)),
        seed=seed,
    )
    greedy_params = dataclasses.replace(params, temperature=0.0, n=1)
    out = []
    batch = max(1, 256 // n)
    for start in phase(range(0, len(rows), batch), f"sampling {n} replies per prompt", "batch", min_items=2):
        chunk = rows[start : start + batch]
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in chunk]
        completions = engine.generate(prompts, params)
        greedy = engine.generate(prompts, greedy_params) if o.sample_greedy else []
        for i in range(len(chunk)):
            texts = [tokenizer.decode(c.token_ids, skip_special_tokens=True) for c in completions[i * n : (i + 1) * n]]
            g = tokenizer.decode(greedy[i].token_ids, skip_special_tokens=True) if greedy else None
            out.append({"samples": texts, "greedy": g})
    return out


def build_pairs(rows: list[dict], replies: list[dict], o, seed: int) -> tuple[list[dict], str]:
    """On-policy preference rows from each prompt's sampled replies, judged by the answer checker (see the
    module docstring); with `o.pairs_per_prompt` > 1 up to that many distinct (correct, wrong) pairs of a
    prompt's samples, and with `o.sample_fill` false only prompts with such a pair."""
    import random

    from aligner.data.world import is_correct

    rng = random.Random(seed)
    out, both, correct, greedy_wrong, extra, dropped = [], 0, 0, 0, 0, 0
    for row, r in zip(rows, replies, strict=True):
        good = [t for t in r["samples"] if is_correct(t, row["answer"])]
        bad = [t for t in r["samples"] if not is_correct(t, row["answer"])]
        correct += len(good)
        rejected = rng.choice(bad) if bad else None
        if r["greedy"] is not None:
            if is_correct(r["greedy"], row["answer"]):
                good.append(r["greedy"])
            else:
                rejected, greedy_wrong = r["greedy"], greedy_wrong + 1
        sampled = bool(good and rejected is not None)
        both += sampled
        if not sampled and not o.sample_fill:
            dropped += 1
            continue
        pair = dict(row)
        if good:
            pair["chosen"] = [{"role": "assistant", "content": rng.choice(good)}]
        if rejected is not None:
            pair["rejected"] = [{"role": "assistant", "content": rejected}]
        out.append(pair)
        if sampled and o.pairs_per_prompt > 1:  # more distinct (correct, wrong) pairs of the same samples
            first = (pair["chosen"][0]["content"], rejected)
            combos = [(g, b) for g in sorted(set(good)) for b in sorted(set(bad) | {rejected}) if (g, b) != first]
            for g, b in rng.sample(combos, min(len(combos), o.pairs_per_prompt - 1)):
                out.append({**row, "chosen": [{"role": "assistant", "content": g}],
                            "rejected": [{"role": "assistant", "content": b}]})  # fmt: skip
                extra += 1
    if not out:
        raise DataError(
            f"dpo.sample_pairs: none of {len(rows)} prompts gave both a correct and a wrong sample; "
            "set dpo.sample_fill: true or sample more replies per prompt (dpo.sample_pairs)"
        )
    report = (
        f"{len(rows)} prompts x {o.sample_pairs} samples: {correct / (len(rows) * o.sample_pairs):.3f} correct, "
        + (f"greedy reply wrong for {greedy_wrong} (their rejected reply), " if o.sample_greedy else "")
        + f"{both} prompts with a sampled pair"
        + (f" (+{extra} more pairs of their samples)" if extra else "")
        + (f", {dropped} prompts without one dropped" if not o.sample_fill else ", the rest completed from the data")
    )
    return out, report


def sample_pairs(model, tokenizer, rows: list[dict], o, seed: int) -> tuple[list[dict], str]:
    """On-policy preference rows from `o.sample_pairs` samples per prompt of the model, with the sampled
    replies read from `dpo.ref_cache_dir` when the same model, prompts and settings were sampled before
    (keyed by the weights, the rows, the chat template and the sampling settings)."""
    if "answer" not in rows[0]:
        raise DataError("dpo.sample_pairs needs rows with an 'answer' column to judge samples (the task world's)")
    h = weights_hash(model)
    settings = [o.sample_pairs, o.sample_temperature, o.sample_tokens, seed, tokenizer.chat_template, o.sample_greedy]
    h.update(json.dumps([settings, rows], sort_keys=True, default=str).encode())
    path = Path(o.ref_cache_dir) / f"samples_{h.hexdigest()[:24]}.json"
    if path.is_file():
        replies, where = json.loads(path.read_text()), f" (samples read from {path})"
    else:
        replies, where = sample_replies(model, tokenizer, rows, o, seed), ""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # several processes may write the same entry
        tmp.write_text(json.dumps(replies))
        tmp.replace(path)
    out, report = build_pairs(rows, replies, o, seed)
    return out, report + where


TASK_WORLD_OPTIONS = ("sample_pairs", "sft_weight")  # recipes/dpo.yaml's options that fit only judged rows


def offline_unless_judged(recipe: Recipe, rows: list[dict]) -> None:
    """Plain offline DPO on rows without an `answer` column (ordinary preference pairs): on-policy sampling
    (dpo.sample_pairs) and RPO's NLL term (dpo.sft_weight) that a default recipe sets for the task world
    are switched off with a printed notice. Set explicitly (a flag or the user's own recipe), RPO stays
    on, and sampling, which needs answers to judge its samples, is an error."""
    o = recipe.dpo
    if "answer" in rows[0] or not (o.sample_pairs or o.sft_weight):
        return
    if o.sample_pairs and "dpo.sample_pairs" in recipe.explicit:
        raise DataError(
            f"dpo.sample_pairs needs rows with an 'answer' column to judge the samples (columns: {', '.join(rows[0])})"
            "; map one with data.columns, or set --dpo.sample_pairs 0 for offline DPO on the pairs as they are"
        )
    off = [k for k in TASK_WORLD_OPTIONS if getattr(o, k) and f"dpo.{k}" not in recipe.explicit]
    for key in off:
        setattr(o, key, type(getattr(o, key))(0))
    if off:
        print(
            f"dpo: the rows have no 'answer' column, so {' and '.join(f'dpo.{k}' for k in off)} (set by "
            f"{recipe.path or 'the default recipe'} for the task world) are off: plain offline DPO on the pairs"
        )


def encode_pairs(
    recipe: Recipe, tokenizer, model=None, share: tuple[int, int] = (1, 1)
) -> tuple[list[dict], list[dict] | None, str]:
    """Train and eval pairs (KTO: unpaired rows with their KL partners), tokenized with the chat template,
    and a one-line report. With dpo.sample_pairs the training pairs are sampled from `model`. `share`
    (k, n): only the k-th of n equal parts of the training rows (a round of iterative DPO)."""
    from aligner.trainers.setup import load_splits

    d, o = recipe.data, recipe.dpo
    train_rows, eval_rows = load_splits(recipe, "preference")
    offline_unless_judged(recipe, train_rows)
    k, n = share
    train_rows = train_rows[(k - 1) * len(train_rows) // n : k * len(train_rows) // n]
    sampled = ""
    if o.sample_pairs and model is not None:
        train_rows, sampled = sample_pairs(model, tokenizer, train_rows, o, recipe.train.seed)
    where = f"data.source '{d.source}'"
    system = system_prompt(d.system_prompt)
    records, counts = to_preference_records(train_rows, d.format, where, allow_empty=bool(sampled))
    records = add_system_prompt(records, system)
    if any("margin" in r for r in records) and main_process():
        print("dpo: the rows' margin column is not used by DPO (the reward model, aligner rm, reads it)")
    unpaired = "completion" in records[0]
    if unpaired and o.loss != "kto":
        raise DataError(f"{where} holds unpaired rows (prompt, completion, label); train on them with --loss kto")

    def prepare(recs: list[dict]) -> list[dict]:
        if o.loss != "kto":
            return recs
        return with_kl_partners(recs if "completion" in recs[0] else unpair(recs))

    train, report = encode_preferences(prepare(records), tokenizer, d.seq_len, overlong=o.overlong, source=where)
    evals = None
    if eval_rows:
        eval_records = add_system_prompt(to_preference_records(eval_rows, d.format, "the eval split")[0], system)
        evals, _ = encode_preferences(
            prepare(eval_records), tokenizer, d.seq_len, overlong=o.overlong, source="the eval split"
        )
    summary = report.summary().replace("conversations", "rows" if o.loss == "kto" else "pairs")
    if o.loss == "kto":
        good = sum(bool(x["label"]) for x in train)
        summary += f", {good} desirable and {len(train) - good} undesirable"
    if counts["identical"]:
        summary += f", {counts['identical']} with identical chosen and rejected dropped"
    return train, evals, f"{sampled}; {summary}" if sampled else summary
