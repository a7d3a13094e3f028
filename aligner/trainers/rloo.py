"""RLOO, REINFORCE with leave-one-out baselines (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019).

    aligner rloo                                  # recipes/rloo.yaml: from runs/sft/final on the task world
    aligner rloo --num_generations 8 --beta 0.05  # a sequence KL to the reference in the reward

Each rollout samples k = `rloo.num_generations` completions for each of its prompts (train.micro_batch_size
x grad_accum x processes completions in all) and scores them with the reward functions (and a reward model,
when one is named). With `beta` > 0 each reward loses beta x the completion's KL to the reference, summed over
its tokens (k1, under the policy that sampled). A completion's advantage is its reward less the mean of the
other k - 1 rewards of its prompt (aligner.advantages.rloo_advantages), optionally normalised over the
rollout. The loss (aligner.losses.rloo_loss) treats the whole completion as one action: one ratio
pi(y|x) / pi_old(y|x) per completion, clipped as PPO's, averaged over the step's completions. As in
GRPO, a rollout serves `num_iterations` steps (old log-probs from the trainer's own forward when > 1), and
completions that hit rollout.max_new_tokens are left out of the loss when `mask_truncated`.
"""

from __future__ import annotations

import torch

from aligner.advantages import normalize, rloo_advantages
from aligner.config import Recipe
from aligner.data.collate import pad_examples, pad_examples_with
from aligner.logprobs import IGNORE_INDEX
from aligner.losses import rloo_loss
from aligner.trainers.groups import GroupRolloutTrainer, learning_share
from aligner.trainers.online import run_online


class RLOOTrainer(GroupRolloutTrainer):
    """Training data are prompt records {"prompt", "prompt_ids", **columns} (see aligner.trainers.grpo)."""

    stage = "rloo"

    @torch.no_grad()
    def make_rollout(self, rollout: int) -> tuple[list[dict], dict]:
        c, k = self.c, self.c.num_generations
        outs, scores, parts = self.sample_rollout(rollout, self.prompts_per_rollout, k)
        examples = self.completion_examples(outs, c.mask_truncated)
        batch = pad_examples(examples, self.pad_id)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        rewards, metrics = torch.tensor(scores), {}
        if c.beta > 0 or c.num_iterations > 1:
            old = self.rollout_logps(self.model, batch)
            for e, row, n in zip(examples, old, (len(e["input_ids"]) for e in examples)):
                e["old_logps"] = row[:n]
            if c.beta > 0:
                kl = ((old - self.reference_rollout_logps(batch)) * mask).sum(-1)  # (B,) summed k1 per completion
                rewards = rewards - c.beta * kl
                metrics["kl/mean"] = float(kl.mean())
        advantages = rloo_advantages(rewards, k)
        if c.normalize_advantages:
            advantages = normalize(advantages)
        for e, a in zip(examples, advantages.tolist()):
            e["advantage"] = a if e["kept"] else 0.0
        grouped = torch.tensor(scores).view(-1, k)
        metrics.update(self.rollout_metrics(outs, scores, parts))
        metrics["rollout/zero_std_groups"] = float((grouped.std(-1) == 0).float().mean())
        metrics["rollout/learning"] = learning_share(examples)
        mb = self.cfg.micro_batch_size
        return [self.collate(examples[i : i + mb]) for i in range(0, len(examples), mb)], metrics

    def collate(self, examples: list) -> dict:
        keys = ("old_logps",) if "old_logps" in examples[0] else ()
        batch = pad_examples_with(examples, self.pad_id, per_token=keys, per_row=("advantage", "kept"))
        batch["n_loss"] = int(batch["kept"].sum())  # the loss's units: completions
        return self.laid_out(batch)

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = self.token_logps(model, batch)  # (B, T)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        old = batch.get("old_logps")
        seq_logps = (logps * mask).sum(-1)
        old_seq = (old * mask).sum(-1) if old is not None else seq_logps.detach()
        c = self.c
        eps_high = c.epsilon if c.epsilon_high is None else c.epsilon_high
        return rloo_loss(seq_logps, old_seq, batch["advantage"], eps_low=c.epsilon, eps_high=eps_high)


# --- the command ------------------------------------------------------------------------------------


def rloo(recipe: Recipe) -> dict:
    """RLOO from the recipe's model (default: the SFT run); returns eval metrics and held-out accuracy."""
    c = recipe.rloo

    def describe(trainer: RLOOTrainer, ref: str) -> str:
        return (
            f"{trainer.prompts_per_rollout} prompts x {c.num_generations} per rollout, beta {c.beta} (reference {ref})"
        )

    return run_online(recipe, RLOOTrainer, describe, reference=c.beta > 0)
