"""Bradley-Terry reward models on the shared loop.

    aligner rm                                    # recipes/reward.yaml: from runs/sft/final on the task world
    aligner rm --center_coef 0.01                 # with reward centring
    aligner rm --likelihood_coef 0 --lm_coef 0    # the scalar head alone
    aligner rm --likelihood_coef 0 --lora.enabled true   # LoRA (the likelihood term needs full fine-tuning)

The model is the starting causal LM's decoder with a scalar head in place of the LM head
(aligner.model.heads), read at the last token of prompt + reply. Chosen and rejected replies go
through one forward pass (2B rows, chosen first) and the per-pair loss is
-log sigmoid(r_chosen - r_rejected - margin) (+ centring), from `aligner.losses.bradley_terry_loss`.
A pair's optional `margin` column comes from the data. `rm.lm_coef` adds the chosen replies' mean
token NLL under the starting model's LM head (kept beside the scalar head, not saved): GRM's
hidden-state regularisation (Yang et al. 2024, arXiv 2406.10216), which keeps the decoder a language
model while it learns to score (on the task world it left held-out accuracy where it was; see the
README). `rm.likelihood_coef` = c makes the reward itself head + c x the reply's summed token
log-prob under the model's own LM head (`ScalarHeadModel.sequence_scores`), trained so through the
same Bradley-Terry loss and kept in the checkpoint, so every score uses it (held-out accuracy
0.85 -> 0.90-0.94 on the task world). Checkpoints load for scoring through
`aligner.model.heads.load_reward_model` (full models also load in transformers as
AutoModelForSequenceClassification, the head without the likelihood term); `score_conversations`
(aligner.rewards) scores rendered conversations with it.

Packed pairs share their prompt (`rm.share_prefix`, `aligner.data.collate.pack_shared_pairs`): each pair
is one document, its common prefix once and the two replies as branches after it, the rejected reply
never attending to the chosen one, so the rewards are those of the two sequences run apart, with the
prefix's compute spent once (where the model's attention takes the mask: `ScalarHeadModel.shares_prefixes`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from aligner.config import Recipe
from aligner.data.chat import encode_preferences, pad_token_id
from aligner.data.collate import pack_pairs, pack_shared_pairs, pad_pairs
from aligner.data.formats import add_system_prompt
from aligner.data.preferences import to_preference_records
from aligner.errors import DataError
from aligner.logprobs import IGNORE_INDEX, summed_logps, summed_logps_by_doc
from aligner.losses import batch_token_nll, bradley_terry_loss
from aligner.model.heads import last_token_values
from aligner.model.tokenizer import system_prompt
from aligner.trainers.base import Trainer, prepare_run_dir


class RewardTrainer(Trainer):
    """Examples are pairs {"chosen", "rejected"} of tokenized conversations (+ optional "margin")."""

    stage = "rm"
    token_loss = False  # units are pairs
    packing = False  # the 2B sequences packed padding-free into rows of `row_len` tokens
    share_prefix = False  # packed with each pair's common prefix once (`pack_shared_pairs`)
    row_len = 0

    def collate(self, pairs: list) -> dict:
        if self.packing:
            pack = pack_shared_pairs if self.share_prefix else pack_pairs
            return pack(pairs, pad_token_id(self.tokenizer), self.row_len)
        return pad_pairs(pairs, pad_token_id(self.tokenizer))

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        r = self.recipe.rm
        packed = "ends" in batch  # packed: each sequence's last token, wherever its row put it
        pairs = len(batch["lengths"]) // 2
        ids, positions, labels = batch["input_ids"], batch.get("position_ids"), batch["labels"]
        if r.lm_coef or r.likelihood_coef:  # reply token log-probs under the kept LM head
            if not r.likelihood_coef:  # the LM term alone reads the chosen replies only: the first B sequences
                if packed:
                    chosen_tokens = batch["doc_ids"] < pairs  # (rows, T)
                else:
                    chosen_tokens = torch.arange(len(ids), device=ids.device)[:, None] < pairs  # (2B, 1)
                labels = labels.masked_fill(~chosen_tokens, IGNORE_INDEX)
            values, token_logps = model(ids, positions, lm_labels=labels)
            if packed:
                sums, counts = summed_logps_by_doc(token_logps, labels, batch["doc_ids"], 2 * pairs)
            else:
                sums, counts = summed_logps(token_logps, labels)  # (2B,), (2B,)
        elif "branch_ids" in batch:  # each pair's prefix once, its replies branching from it
            values = model(ids, positions, document_ids=batch["doc_ids"], branch_ids=batch["branch_ids"])
        else:
            values = model(ids, positions)
        rewards = values.reshape(-1)[batch["ends"]] if packed else last_token_values(values, batch["lengths"])
        if r.likelihood_coef:  # as ScalarHeadModel.sequence_scores
            rewards = rewards + r.likelihood_coef * sums
        chosen, rejected = rewards.chunk(2)  # (B,), (B,)
        loss, stats = bradley_terry_loss(chosen, rejected, batch.get("margin"), r.center_coef)
        if r.lm_coef:  # a token mean over the accumulated batch's chosen replies
            units = self.batch_units(batch)
            nll, nll_stats = batch_token_nll(sums[:pairs], counts[:pairs], units["n_loss"], units["chosen_tokens"])
            loss = loss + r.lm_coef * nll
            stats.update(nll_stats)
        return loss, stats


def encode_reward_pairs(
    rows: list[dict], tokenizer, max_len: int, fmt=None, overlong="truncate", source="dataset", system=None
):
    """Preference rows -> tokenized pairs whose input_ids end with the conversation's final token (the
    one the head reads, in training as in `score_conversations`), the encoding report and the counts.
    `system`: a system turn for prompts without one (data.system_prompt)."""
    records, counts = to_preference_records(rows, fmt, source)
    records = add_system_prompt(records, system)
    if "completion" in records[0]:
        raise DataError(
            f"{source} holds unpaired (KTO) rows; a Bradley-Terry reward model needs chosen/rejected pairs"
        )
    pairs, report = encode_preferences(records, tokenizer, max_len, overlong=overlong, source=source, keep_last=True)
    return pairs, report, counts


def rm(recipe: Recipe) -> dict:
    """Train a reward model from the recipe's model (default: the SFT run); returns eval metrics."""
    from aligner.trainers.setup import load_splits, prepare_model, sft_tokenizer, training_kind

    d, r = recipe.data, recipe.rm
    tokenizer = sft_tokenizer(recipe, "rm")
    train_rows, eval_rows = load_splits(recipe, "preference")
    where = f"data.source '{d.source}'"
    system = system_prompt(d.system_prompt)
    encode = dict(fmt=d.format, overlong=r.overlong, system=system)
    train_data, report, counts = encode_reward_pairs(train_rows, tokenizer, d.seq_len, source=where, **encode)
    eval_data = None
    if eval_rows:
        eval_data = encode_reward_pairs(eval_rows, tokenizer, d.seq_len, source="the eval split", **encode)[0]
    keep = r.lm_coef > 0 or r.likelihood_coef > 0
    model = prepare_model(recipe, tokenizer, scalar_head=True, keep_lm_head=keep, stage="rm")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.likelihood_coef = r.likelihood_coef  # saved with the checkpoint: every score then counts it
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    prepare_run_dir(run_dir, recipe.train.resume, recipe.train.overwrite)
    trainer = RewardTrainer(recipe, model, tokenizer, train_data, eval_data)
    trainer.packing, trainer.row_len = r.packing, d.seq_len
    head = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_terms = r.lm_coef or r.likelihood_coef  # their labels differ between the branches at the prefix's end
    trainer.share_prefix = r.packing and r.share_prefix and not lm_terms and head.shares_prefixes(d.seq_len)
    if trainer.is_main:
        kind = training_kind(recipe)
        dropped = f", {counts['identical']} with identical chosen and rejected dropped" if counts["identical"] else ""
        print(f"rm: {report.summary().replace('conversations', 'pairs')}{dropped}")
        lm = f", lm_coef {r.lm_coef}" if r.lm_coef else ""
        lm += f", likelihood_coef {r.likelihood_coef}" if r.likelihood_coef else ""
        shared = ", prompts shared by chosen and rejected" if trainer.share_prefix else ""
        print(f"rm: {kind}, center_coef {r.center_coef}{lm}{shared}, {trainer.total_steps} steps -> {run_dir}")
    metrics = trainer.train()
    return {"metrics": metrics, "run_dir": str(run_dir), "samples": [], "is_main": trainer.is_main}
