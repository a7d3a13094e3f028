"""The reference policy of the KL-regularised trainers (DPO, GRPO, PPO, RLOO, REINFORCE++, online DPO).

One helper for every reference pass: full fine-tuning keeps a frozen copy of the start model
(`frozen_reference`); with LoRA the reference is the policy itself with its adapter disabled (the base
weights never change), so no copy is made; DPO can also precompute the reference log-probs once and carry
them in its batches, after which it needs neither. `reference_of(policy, ref_model)` yields the module to
run for the reference pass, whichever it is.

    ref_model = frozen_reference(model, recipe)           # None with LoRA
    with torch.no_grad(), reference_of(policy, ref_model) as ref:
        ref_logps = logps_of(ref, batch)
"""

from __future__ import annotations

import contextlib
import copy

import torch


def frozen_reference(model: torch.nn.Module, recipe, needed: bool = True) -> torch.nn.Module | None:
    """A frozen copy of `model` as the reference, or None when none is needed or LoRA's base model is it."""
    if not needed or recipe.lora.enabled:
        return None
    return copy.deepcopy(model).requires_grad_(False)


@contextlib.contextmanager
def reference_of(policy: torch.nn.Module, ref_model: torch.nn.Module | None = None):
    """The reference to run a pass on: `ref_model` (a frozen copy), else `policy` with its adapter disabled."""
    if ref_model is not None:
        yield ref_model
        return
    if not hasattr(policy, "disable_adapter"):
        raise RuntimeError("no reference model, no adapter to disable and no precomputed reference log-probs")
    with policy.disable_adapter():
        yield policy


def reference_kind(recipe, needed: bool = True, precomputed: bool = False, ref_model=None) -> str:
    """How the run's reference is made, for its start-up line (`ref_model`: the trainer's)."""
    from aligner.trainers import zero

    if not needed:
        return "none"
    if precomputed:
        return "precomputed"
    if recipe.lora.enabled:
        return "adapter disabled"
    return (
        "frozen copy, partitioned by ZeRO-3" if ref_model is not None and zero.is_engine(ref_model) else "frozen copy"
    )
