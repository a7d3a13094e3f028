"""Sharded training (FSDP2, PyTorch's `fully_shard`): what the loop does differently when each process holds
only a shard of the weights, gradients and optimizer state.

    accelerate launch --config_file recipes/accelerate/fsdp2.yaml -m aligner sft recipes/chat.yaml

On GPUs accelerate shards the model when the loop prepares it (the config's fsdp_version: 2). accelerate
does not shard on CPUs (its FSDP support is for accelerators), so there the loop applies the same
`fully_shard` itself when a launch asks for FSDP2 (ACCELERATE_USE_FSDP, FSDP_VERSION=2): each decoder block
a unit of its own, the rest (embeddings, final norm, a tied LM head) the root unit. The 2-process CPU tests
run that way.

The online trainers generate on a full copy of the policy on each process (aligner.trainers.online:
`sampler_model`), refreshed from the shards after every step (`copy_full_weights`, DeepSpeed's partitions
too). PPO shards its policy and its value model (critic or value head) as units of their own
(`PolicyAndValue.shard_units`), and its reward model as the reference (`shard_like_policy`). A 4-bit QLoRA
base is not sharded.

Checkpoints of a sharded run hold the sharded state through torch.distributed.checkpoint (`sharded/`: every
process writes its shard of the weights and of AdamW's moments, and reads it back on resume) and, beside
it, the weights gathered into a normal Hugging Face directory by the main process (what `final/`,
transformers, vLLM and `aligner eval` read).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aligner.trainers import zero

SHARDED_DIR = "sharded"  # in a checkpoint directory: torch.distributed.checkpoint's files


def fsdp2_requested() -> bool:
    """Whether the launch asked for FSDP2 (accelerate launch with an FSDP config of fsdp_version 2)."""
    on = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return on and os.environ.get("FSDP_VERSION", "1") == "2"


def sampler_copy_needed() -> bool:
    """Whether the launch shards or partitions the policy so that a process cannot generate from it alone
    (FSDP2 over several processes, DeepSpeed): the online trainers then sample from a full copy."""
    return zero.requested() or (fsdp2_requested() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def copy_full_weights(target: torch.nn.Module, model: torch.nn.Module) -> None:
    """Load the full weights of `model` (FSDP2 shards, ZeRO partitions, or whole) into `target`, a whole module
    of the same structure. Every process must call it."""
    if zero.partitioned(model):
        zero.copy_gathered(target, model)
    else:
        target.load_state_dict(full_state_dict(model))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are sharded DTensors (FSDP2, by accelerate or by `shard_model`), or the
    model is a DeepSpeed engine (its weights or optimizer state partitioned: aligner.trainers.zero)."""
    from torch.distributed.tensor import DTensor

    return zero.is_engine(model) or any(isinstance(p, DTensor) for p in model.parameters())


def shard_for_launch(trainer, model: torch.nn.Module) -> bool:
    """When the launch asks for FSDP2: refuse what cannot be sharded (QLoRA), and shard the model where
    accelerate will not (on CPUs). Returns whether the loop sharded it itself."""
    from aligner.errors import ConfigError

    if not fsdp2_requested():
        return False
    if trainer.recipe.lora.quantize != "none":
        raise ConfigError(f"{trainer.stage}: a 4-bit (QLoRA) base is not sharded; launch QLoRA runs with DDP")
    if trainer.world > 1 and trainer.accelerator.distributed_type != "FSDP":
        shard_model(model)
        return True
    return False


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the GPT core's Block, or the classes a transformers model
    lists as not to be split (`_no_split_modules`: LlamaDecoderLayer, Qwen2DecoderLayer, ...)."""
    from aligner.model.gpt import Block

    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in model.modules() if isinstance(m, Block) or type(m).__name__ in names]


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on every decoder block, then on the whole model (the root unit), or on
    each of the units a model names (`shard_units()`: PPO's policy and value model, each a root)."""
    from torch.distributed.fsdp import fully_shard

    for unit in model.shard_units() if hasattr(model, "shard_units") else [model]:
        for block in decoder_blocks(unit):
            fully_shard(block)
        fully_shard(unit)
    return model


def shard_like_policy(model: torch.nn.Module | None, trainer) -> torch.nn.Module | None:
    """A frozen companion of the policy (its reference, a reward model) on the trainer's device in eval mode,
    sharded like the policy in a multi-process FSDP2 launch, or partitioned like it under DeepSpeed ZeRO-3
    (`zero.partition_frozen`), where every process runs it in step; as it is otherwise (or None)."""
    if model is None:
        return None
    model = model.to(trainer.device).eval()
    if zero.requested():
        return zero.partition_frozen(model, trainer.accelerator, trainer.cfg.micro_batch_size)
    if fsdp2_requested() and trainer.world > 1:
        shard_model(model)
    return model


def full_state_dict(model: torch.nn.Module, main_only: bool = False) -> dict[str, torch.Tensor]:
    """The full weights: on every process where they are, or (`main_only`) on the CPU of the main process and
    empty elsewhere. Every process must call it (the shards are gathered)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if zero.is_engine(model):
        return zero.full_state_dict(model, main_only)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=main_only))


def save_sharded(model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Every process's shard of the weights and the optimizer state into directory/sharded (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    if zero.is_engine(model):
        return zero.save(model, Path(directory) / SHARDED_DIR)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded(model: torch.nn.Module, optimizer, directory: Path) -> None:
    """Each process's shards of the weights and optimizer state back from directory/sharded (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if zero.is_engine(model):
        return zero.load(model, Path(directory) / SHARDED_DIR)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def sharded_grad_norm(params: list[torch.nn.Parameter], clip: float) -> float:
    """The global gradient norm of sharded parameters (every process's shards), clipped to `clip` when > 0."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if clip > 0:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def clip_gradients(params: list[torch.nn.Parameter], clip: float, trainer) -> float:
    """The global gradient norm of `params` (over every process's shards when sharded), clipped to `clip`
    when > 0, through the trainer's accelerator where the parameters are whole (DDP, one process)."""
    if trainer.sharded:
        return sharded_grad_norm(params, clip)
    if clip > 0:
        return float(trainer.accelerator.clip_grad_norm_(params, clip))
    norms = [p.grad.norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
