"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback").

    aligner online_dpo                              # recipes/online_dpo.yaml: from runs/sft/final
    aligner online_dpo --reward_model runs/rm/final --rewards '[]'   # judged by a reward model alone

DPO on pairs that the policy being trained samples at every step. Each step samples `num_generations`
completions for each of train.micro_batch_size x grad_accum x processes prompts, scores them with the
judge (the reward functions, and a reward model when one is named) and pairs each prompt's best
completion (chosen) with its worst (rejected): aligner.advantages.best_and_worst. A prompt whose
samples all score the same gives no pair. The loss is the DPO loss of `online_dpo.loss` (sigmoid, ipo or
hinge: aligner.losses) against the reference, a frozen copy of the start model (with LoRA, the model
with its adapter disabled), whose log-probs are computed when the pairs are made. It is averaged over the
step's pairs; a micro-batch left without a pair runs one tied pair with weight 0, so each process still
runs its backward.
"""

from __future__ import annotations

import torch

from aligner.advantages import best_and_worst
from aligner.config import Recipe
from aligner.data.collate import pad_pairs
from aligner.logprobs import summed_logps
from aligner.losses import PREFERENCE_LOSSES
from aligner.model.forward import causal_lm_token_logprobs
from aligner.trainers.online import OnlineTrainer, run_online
from aligner.trainers.reference import reference_of


class OnlineDPOTrainer(OnlineTrainer):
    """Training data are prompt records {"prompt", "prompt_ids", **columns} (see aligner.trainers.grpo)."""

    stage = "online_dpo"

    def __init__(self, recipe: Recipe, model, tokenizer, prompts, eval_prompts, reward_set, ref_model=None, **kw):
        self.c = recipe.online_dpo
        super().__init__(recipe, model, tokenizer, prompts, eval_prompts, reward_set, ref_model=ref_model, **kw)
        self.loss_fn = PREFERENCE_LOSSES[self.c.loss]

    def compute_total_steps(self) -> int:
        return self.rollout_steps(self.global_batch, 1)

    def logps_of(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reply log-probs and reply lengths (2B,) of a pair batch, chosen rows first (temperature 1)."""
        with self.autocast():
            logps = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"])
        sums, lengths = summed_logps(logps, batch["labels"])
        return sums.float(), lengths

    @torch.no_grad()
    def make_rollout(self, rollout: int) -> tuple[list[dict], dict]:
        c, G = self.c, self.c.num_generations
        outs, scores, parts = self.sample_rollout(rollout, self.global_batch, G)
        unfinished = torch.tensor([not o.finished for o in outs]).float()
        rewards = torch.tensor(scores) - c.missing_eos_penalty * unfinished
        chosen, rejected, untied = best_and_worst(rewards, G)
        examples = self.completion_examples(outs, mask_truncated=False)
        pairs = [
            {"chosen": examples[i], "rejected": examples[j], "live": bool(k)}
            for i, j, k in zip(chosen.tolist(), rejected.tolist(), untied.tolist())
        ]
        live = [p for p in pairs if p["live"]]
        dead = [p for p in pairs if not p["live"]]
        accum, mb = self.cfg.grad_accum, self.cfg.micro_batch_size
        per_batch = [live[i::accum] for i in range(accum)]  # live pairs spread over the micro-batches
        batches = [self.collate(part[:mb] if part else [dict(dead[0], live=False)]) for part in per_batch]
        for batch in batches:
            with reference_of(self.policy(), self.ref_model) as ref:
                batch["ref_logps"] = self.logps_of(ref, self.to_device(batch))[0].cpu()
        gap = (rewards[chosen] - rewards[rejected])[untied]
        metrics = {
            **self.rollout_metrics(outs, scores, parts),
            "rollout/pairs": float(untied.float().mean()),  # the share of prompts that gave a pair
            "rollout/reward_gap": float(gap.mean()) if gap.numel() else 0.0,  # chosen - rejected, over the pairs
        }
        return batches, metrics

    def collate(self, pairs: list) -> dict:
        batch = pad_pairs(pairs, self.pad_id)
        batch["live"] = torch.tensor([float(p["live"]) for p in pairs])
        batch["n_loss"] = int(batch["live"].sum())
        return batch

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logps, lengths = self.logps_of(model, batch)
        (chosen, rejected), (chosen_len, rejected_len) = logps.chunk(2), lengths.chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        loss, stats = self.loss_fn(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=self.c.beta,
            chosen_len=chosen_len,
            rejected_len=rejected_len,
        )
        if batch["n_loss"] == 0:  # a micro-batch without a pair: its stand-in tied pair adds nothing
            loss = loss * 0.0
        return loss, stats


# --- the command ------------------------------------------------------------------------------------


def online_dpo(recipe: Recipe) -> dict:
    """Online DPO from the recipe's model (default: the SFT run); returns eval metrics and accuracy."""
    c = recipe.online_dpo

    def describe(trainer: OnlineDPOTrainer, ref: str) -> str:
        n = c.num_generations
        return f"{trainer.global_batch} prompts x {n} samples per step, loss {c.loss}, beta {c.beta} (reference {ref})"

    return run_online(recipe, OnlineDPOTrainer, describe, grouped=False)  # a step's micro-batches count pairs
