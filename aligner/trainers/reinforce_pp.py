"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models").

    aligner reinforce_pp                          # recipes/reinforce_pp.yaml: from runs/sft/final
    aligner reinforce_pp --kl_coef 0.02 --num_generations 2

PPO's token-level machinery without its critic. Each rollout samples `num_generations` completions for
each of its prompts (train.micro_batch_size x grad_accum x processes completions in all) and scores them.
Every completion token gets the reward r_t = -kl_coef KL_t (the KL of the policy that sampled to the
reference, k1 or k3) and the last one the score too (aligner.advantages.kl_shaped_rewards); a token's
return is the sum of the rewards from it to the end (discounted by gamma), and its advantage that return
normalised over every completion token of the rollout (aligner.advantages.reinforce_pp_advantages: the
global normalisation that replaces the critic's baseline; with several processes, over each one's share).
The loss is PPO's clipped surrogate per token (aligner.losses.ppo_policy_loss), averaged over the step's
completion tokens. A rollout serves `num_iterations` steps; completions that hit rollout.max_new_tokens
are left out when `mask_truncated`.
"""

from __future__ import annotations

import torch

from aligner.advantages import kl_shaped_rewards, reinforce_pp_advantages
from aligner.config import Recipe
from aligner.data.collate import pad_examples, pad_examples_with
from aligner.logprobs import IGNORE_INDEX, kl_estimate
from aligner.losses import ppo_policy_loss
from aligner.trainers.groups import GroupRolloutTrainer, learning_share
from aligner.trainers.online import run_online


class ReinforcePPTrainer(GroupRolloutTrainer):
    """Training data are prompt records {"prompt", "prompt_ids", **columns} (see aligner.trainers.grpo)."""

    stage = "reinforce_pp"

    @torch.no_grad()
    def make_rollout(self, rollout: int) -> tuple[list[dict], dict]:
        c, n = self.c, self.c.num_generations
        outs, scores, parts = self.sample_rollout(rollout, self.prompts_per_rollout, n)
        examples = self.completion_examples(outs, c.mask_truncated)
        batch = pad_examples(examples, self.pad_id)
        mask = (batch["labels"] != IGNORE_INDEX).float()  # (B, T)
        old = self.rollout_logps(self.model, batch)
        kl = torch.zeros_like(old)
        if c.kl_coef > 0:
            kl = kl_estimate(old, self.reference_rollout_logps(batch), c.kl_estimator) * mask
        rewards = kl_shaped_rewards(torch.tensor(scores), kl, mask, c.kl_coef)
        advantages = reinforce_pp_advantages(rewards, mask, c.gamma)
        for i, e in enumerate(examples):
            e["old_logps"], e["advantages"] = old[i, : len(e["input_ids"])], advantages[i, : len(e["input_ids"])]
        metrics = {**self.rollout_metrics(outs, scores, parts), "kl/mean": float(kl.sum(-1).mean())}
        metrics["rollout/learning"] = learning_share(examples)
        mb = self.cfg.micro_batch_size
        return [self.collate(examples[i : i + mb]) for i in range(0, len(examples), mb)], metrics

    def collate(self, examples: list) -> dict:
        return self.laid_out(pad_examples_with(examples, self.pad_id, per_token=("old_logps", "advantages")))

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = self.token_logps(model, batch)  # (B, T)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        old = batch["old_logps"] if self.c.num_iterations > 1 else logps.detach()
        return ppo_policy_loss(logps, old, batch["advantages"], mask, self.c.epsilon)


# --- the command ------------------------------------------------------------------------------------


def reinforce_pp(recipe: Recipe) -> dict:
    """REINFORCE++ from the recipe's model (default: the SFT run); returns eval metrics and accuracy."""
    c = recipe.reinforce_pp

    def describe(trainer: ReinforcePPTrainer, ref: str) -> str:
        n, prompts = c.num_generations, trainer.prompts_per_rollout
        return f"{prompts} prompts x {n} per rollout, kl_coef {c.kl_coef} (reference {ref})"

    return run_online(recipe, ReinforcePPTrainer, describe, reference=c.kl_coef > 0)
