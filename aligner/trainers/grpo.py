"""Group relative policy optimisation (Shao et al. 2024, DeepSeekMath) on the shared loop.

    aligner grpo                                  # recipes/grpo.yaml: from runs/sft/final on the task world
    aligner grpo --num_generations 8 --beta 0.04  # a KL term to the reference (loaded only when beta > 0)
    aligner grpo --loss_type grpo --scale_rewards none   # per-sequence means; Dr. GRPO's unscaled advantages

Each rollout takes the next prompts of a seeded order (train.micro_batch_size x grad_accum x processes
completions, `grpo.num_generations` per prompt), samples G completions per prompt with the rollout
engine, scores them with the recipe's reward functions (aligner.rewards) and turns the rewards into
one advantage per completion, relative to its group (aligner.advantages.group_advantages). With
`grpo.oversample: k` (DAPO's dynamic sampling) a rollout samples k times as many prompts and trains on
the groups whose rewards differ, so fewer of each step's completions have advantage 0. The loss
is `aligner.losses.grpo_loss`: the clipped surrogate with separate low/high epsilons, an optional k3
KL to a frozen reference (or, with LoRA, the adapter-disabled model), aggregated as grpo, bnpo,
dr_grpo or dapo; `importance: sequence` is GSPO's sequence-level ratio.

A rollout serves `grpo.num_iterations` optimizer steps. With one, the ratio is exactly 1 and the old
log-probs are the current ones, detached (so the logged loss is ~0 while the gradient is not: watch
rollout/reward_mean). With more, the old log-probs are recomputed by the trainer's own forward once
per rollout, never taken from the sampler, whose numerics (another precision, another engine such
as vLLM) may differ. Completions that hit max_new_tokens are left out of the loss when
`grpo.mask_truncated` (DAPO's overlong filtering). Deviation from TRL: a masked completion does not
count in the grpo/bnpo/dr_grpo denominators (it is not a unit of the loss).
"""

from __future__ import annotations

import torch

from aligner.advantages import group_advantages
from aligner.config import Recipe
from aligner.data.collate import pad_examples_with
from aligner.logprobs import IGNORE_INDEX
from aligner.losses import grpo_loss, sampler_correction
from aligner.rollout.engine import SamplingParams
from aligner.trainers.groups import GroupRolloutTrainer, learning_share
from aligner.trainers.online import run_online
from aligner.trainers.reference import reference_of


def informative_first(grouped: torch.Tensor, n: int) -> list[int]:
    """Indices of `n` of the groups (rows of `grouped`, (groups, G) rewards), in order: those whose rewards
    differ first, then equal-reward ones only as far as too few differ (DAPO's dynamic sampling, from
    one oversampled generation rather than repeated ones)."""
    differ = (grouped != grouped[:, :1]).any(-1).tolist()
    order = [i for i, d in enumerate(differ) if d] + [i for i, d in enumerate(differ) if not d]
    return sorted(order[:n])


class GRPOTrainer(GroupRolloutTrainer):
    """Training data are prompt records {"prompt": messages, "prompt_ids": [...], **columns}; every
    optimizer step's micro-batches come from a rollout of the policy on them."""

    stage = "grpo"

    def compute_total_steps(self) -> int:  # with the oversampled prompts
        g = self.recipe.grpo
        return self.rollout_steps(self.global_batch // g.num_generations * g.oversample, g.num_iterations)

    # --- rollouts ------------------------------------------------------------------------------------

    def sampling(self, rollout: int) -> SamplingParams:
        return self.sampling_params(n=self.c.num_generations, seed=self.sampling_seed(rollout))

    @torch.no_grad()
    def make_rollout(self, rollout: int) -> tuple[list[dict], dict]:
        """Sample, score and batch one rollout: this process's micro-batches and the rollout's metrics."""
        G, k = self.c.num_generations, self.c.oversample
        rows = self.rollout_rows(rollout, self.prompts_per_rollout * k)
        outs, _, totals, parts = self.complete_and_score(rows, self.sampling(rollout))
        sampled = torch.tensor(totals)  # (N*G,), every completion sampled
        grouped = sampled.view(-1, G)  # (N, G)
        groups = informative_first(grouped, len(rows) // k)
        trained_outs = [outs[i * G + j] for i in groups for j in range(G)]
        rewards = grouped[groups].reshape(-1)  # the groups trained on
        advantages = group_advantages(rewards, G, self.c.scale_rewards)
        examples = self.completion_examples(trained_outs, self.c.mask_truncated)
        for e, adv in zip(examples, advantages.tolist()):
            e["advantage"] = adv
        mb = self.cfg.micro_batch_size
        batches = [self.collate_live(examples[i : i + mb]) for i in range(0, len(examples), mb)]
        for batch in batches:
            self.add_reference_logps(batch)
        finished = [o.finished for o in outs]
        trained = sum(int(b["input_ids"].shape[0]) for b in batches)
        metrics = {  # over every completion sampled, but rollout/skipped (of those trained on)
            "rollout/reward_mean": float(sampled.mean()),
            "rollout/reward_std": float(sampled.std()) if sampled.numel() > 1 else 0.0,
            "rollout/completion_len": sum(len(o.token_ids) for o in outs) / len(outs),
            "rollout/truncated": 1 - sum(finished) / len(finished),
            "rollout/zero_std_groups": float((grouped.std(-1) == 0).float().mean()),
            "rollout/skipped": 1 - trained / len(examples),  # completions left out of the forward (advantage 0)
            "rollout/learning": learning_share(examples),  # completions in the loss with advantage != 0
            **{f"rollout/{name}": sum(v) / len(v) for name, v in parts.items()},
        }
        return batches, metrics

    def collate(self, examples: list) -> dict:
        batch = pad_examples_with(examples, self.pad_id, per_token=("sampler_logps",))
        batch["advantages"] = torch.tensor([e["advantage"] for e in examples], dtype=torch.float32)
        batch["n_loss"] = self.loss_units(examples)
        return self.laid_out(batch)

    def loss_units(self, examples: list) -> int:
        """What the loss is divided by, summed over the accumulated batch: completion tokens (dapo) or
        completions with any token in the loss (the other aggregations)."""
        in_loss = [sum(x != IGNORE_INDEX for x in e["labels"]) for e in examples]
        if self.c.loss_type == "dapo":
            return sum(in_loss)
        return sum(bool(e["kept"] and n) for e, n in zip(examples, in_loss))

    def collate_live(self, examples: list) -> dict:
        """The micro-batch of `examples`, less the completions whose advantage is 0 when that is exact
        (`skip_zero_advantage`, beta 0, any aggregation but bnpo's per-micro-batch mean): they add exactly 0
        to the loss and its gradient, so only the loss's units (n_loss) still count them. One example
        stays when every advantage is 0, so each process still runs a backward per micro-batch."""
        g = self.c
        if not g.skip_zero_advantage or g.beta > 0 or g.loss_type == "bnpo":
            return self.collate(examples)
        live = [e for e in examples if e["advantage"] != 0.0] or [min(examples, key=lambda e: len(e["input_ids"]))]
        batch = self.collate(live)
        batch["n_loss"] = self.loss_units(examples)
        return batch

    def add_reference_logps(self, batch: dict) -> None:
        """Old log-probs (when a rollout serves several steps) and reference log-probs (when beta > 0)."""
        dev = self.to_device(batch)
        if self.c.num_iterations > 1:
            batch["old_logps"] = self.token_logps(self.model, dev).cpu()
        if self.c.beta > 0:
            with reference_of(self.policy(), self.ref_model) as ref:
                batch["ref_logps"] = self.token_logps(ref, dev).cpu()

    def micro_batches(self, step: int) -> list[dict]:
        batches = self.rollout_data(step)
        if len(batches) != self.cfg.grad_accum:
            raise RuntimeError(f"grpo: rollout made {len(batches)} micro-batches, expected {self.cfg.grad_accum}")
        return batches

    # --- loss ----------------------------------------------------------------------------------------

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = self.token_logps(model, batch)  # (B, T)
        mask = (batch["labels"] != IGNORE_INDEX).float()
        old = batch.get("old_logps")
        old = old if old is not None else logps.detach()  # the trainer's log-probs of the sampled tokens
        g = self.c
        weights, stats = sampler_correction(old, batch["sampler_logps"], mask, self.r.tis_cap)
        loss, loss_stats = grpo_loss(
            logps,
            old,
            batch["advantages"],
            mask,
            eps_low=g.epsilon,
            eps_high=g.epsilon if g.epsilon_high is None else g.epsilon_high,
            beta=g.beta,
            ref_logps=batch.get("ref_logps"),
            loss_type=g.loss_type,
            max_len=self.max_new_tokens,
            importance=g.importance,
            token_weights=weights,
        )
        return loss, {**loss_stats, **stats}


# --- the command ------------------------------------------------------------------------------------


def grpo(recipe: Recipe) -> dict:
    """GRPO from the recipe's model (default: the SFT run); returns eval metrics and held-out accuracy."""
    g = recipe.grpo

    def describe(trainer: GRPOTrainer, ref: str) -> str:
        chosen = f" (the most informative of {trainer.prompts_per_rollout * g.oversample})" if g.oversample > 1 else ""
        return (
            f"{trainer.prompts_per_rollout} prompts{chosen} x {g.num_generations} per rollout, loss {g.loss_type}, "
            f"beta {g.beta} (reference {ref})"
        )

    return run_online(recipe, GRPOTrainer, describe, reference=g.beta > 0)
