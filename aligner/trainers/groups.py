"""What the trainers that sample groups of completions per prompt share (GRPO, RLOO, REINFORCE++): the
rollout's size from their section, the batch layout that runs each group's prompt once, and a warning when
a rollout's rewards teach nothing.

A group's completions continue one prompt; where the policy's attention takes a mask of branches after a
shared prefix (the GPT core, transformers' SDPA), a micro-batch may run as documents of one prompt and
several completions (`collate.share_prompts`), the same log-probs and gradients as its padded rows with the
prompt's tokens run once per document instead of once per completion. Whether, and how many completions to
a document, follows a cost model of the forward (`collate.sharing_branches`): padded rows skip the keys after
each query, documents pay for a dense mask over all of theirs, so many short completions after a long
prompt share it and a few long ones do not.
"""

from __future__ import annotations

import functools

import torch

from aligner.data.collate import prompt_groups, share_prompts, sharing_branches
from aligner.model.forward import forward_costs, prefix_window
from aligner.tracking import tqdm_write
from aligner.trainers.online import OnlineTrainer


class GroupRolloutTrainer(OnlineTrainer):
    """Rollouts of `num_generations` completions for each of train.micro_batch_size x grad_accum x processes /
    num_generations prompts, each serving `num_iterations` optimizer steps; the settings read from the
    trainer's own section, `recipe.<stage>` (`self.c`). Subclasses log "rollout/learning", the share of the
    rollout's completions whose advantage is not 0 and that are in the loss."""

    def __init__(self, recipe, *args, **kw):
        self.c = getattr(recipe, self.stage)
        super().__init__(recipe, *args, **kw)
        self.steps_per_rollout = self.c.num_iterations
        self.prompts_per_rollout = self.global_batch // self.c.num_generations
        self.no_gradient_rollouts = 0  # rollouts whose every completion had advantage 0 or was masked

    def compute_total_steps(self) -> int:
        return self.rollout_steps(self.global_batch // self.c.num_generations, self.c.num_iterations)

    @functools.cached_property
    def sharing_costs(self) -> tuple[float, float, float] | None:
        """`sharing_branches`'s costs and window for the policy, or None where it cannot share prompts."""
        window = prefix_window(self.model) if self.r.share_prompts else 0.0
        return (*forward_costs(self.model), window) if window > 0 else None

    def laid_out(self, batch: dict) -> dict:
        """A collated micro-batch, with its completions also laid out as branches after their shared prompt
        (`collate.share_prompts`) where that costs the forward less (`rollout.share_prompts`)."""
        if self.sharing_costs is None:
            return batch
        groups = prompt_groups(batch)
        branches = sharing_branches(batch, groups, *self.sharing_costs)
        return share_prompts(batch, groups, branches) if branches else batch

    def train_step(self, step: int) -> dict:
        metrics = super().train_step(step)
        if step % self.steps_per_rollout == 0 and metrics["rollout/learning"] == 0:
            self.warn_no_gradient(step, metrics)
        return metrics

    def warn_no_gradient(self, step: int, m: dict) -> None:
        """Say why a rollout teaches nothing (every group's rewards tied, or every completion that is not
        truncated in a tied group), with the counts, and what usually causes it."""
        self.no_gradient_rollouts += 1
        if not self.is_main or 3 < self.no_gradient_rollouts and self.no_gradient_rollouts % 20:
            return
        groups = self.prompts_per_rollout * self.world
        completions = groups * self.c.num_generations
        tied = f"the {completions} completions had equal rewards"  # one normalisation over the rollout
        if "rollout/zero_std_groups" in m:
            tied = f"{round(m['rollout/zero_std_groups'] * groups)} of {groups} groups had equal rewards"
        masked = " and are masked" if self.c.mask_truncated else ""
        names = {f"rollout/{name}" for name in self.reward_set.names}
        rewards = ", ".join(f"{k.removeprefix('rollout/')} {v:.2f}" for k, v in m.items() if k in names)
        tqdm_write(
            f"{self.stage}: step {step + 1} had no gradient from its rewards: {tied} and "
            f"{round(m['rollout/truncated'] * completions)} of {completions} completions hit max_new_tokens "
            f"({self.max_new_tokens}){masked}; reward means: {rewards}. Check that the rewards fit the model's "
            f"replies (math_answer for general chat models) and max_new_tokens ({self.no_gradient_rollouts} "
            "rollouts without gradient so far)"
        )


def learning_share(examples: list[dict]) -> float:
    """The share of completions in the loss (`kept`) with any advantage other than 0 ("advantage", one per
    completion, or "advantages", one per token)."""
    live = sum(
        bool(e["kept"]) and bool(torch.as_tensor(e.get("advantages", e.get("advantage"))).any()) for e in examples
    )
    return live / max(len(examples), 1)
