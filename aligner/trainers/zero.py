"""DeepSpeed ZeRO through accelerate: what the loop does differently when DeepSpeed's engine owns the weights'
partitions and the optimizer step.

    accelerate launch --config_file recipes/accelerate/zero3.yaml -m aligner sft recipes/chat.yaml

The launch's config names the ZeRO stage (3 partitions weights, gradients and AdamW's moments over the
processes; 1 and 2 the optimizer state and gradients) and any offload; the loop fills in what is its own
(`configure`): the micro-batch, gradient clipping, and no DeepSpeed mixed precision, since the loop runs
bf16 autocast itself over fp32 master weights, as it does everywhere. The loop keeps its own gradient
accumulation and loss normalisation: each micro-batch's backward goes through the engine, the last one
marked as the accumulation boundary, and the engine's `step` clips and steps AdamW once per optimizer
step, with the loop's own learning-rate schedule on AdamW's parameter groups.

Checkpoints hold the engine's own (every process writes its partitions of the weights and of the
optimizer state to `sharded/`, read back on resume) and, beside them, the weights gathered into a
normal Hugging Face directory by the main process, as for FSDP2 (aligner.trainers.sharding). DeepSpeed
runs on CPUs too (its CPU accelerator and gloo), which is how the 2-process tests run it. The online
trainers, which sample from a full copy of the policy on every process, are refused under DeepSpeed
(FSDP2 runs them).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def requested() -> bool:
    """Whether the launch asked for DeepSpeed (accelerate launch with a DeepSpeed config)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_engine(model: torch.nn.Module) -> bool:
    """Whether `model` is a DeepSpeed engine (what accelerate's prepare returns under DeepSpeed)."""
    return any(c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def refuse_online(stage: str) -> None:
    """The online trainers sample from a full copy of the policy on every process: not under DeepSpeed."""
    from aligner.errors import ConfigError

    raise ConfigError(
        f"{stage}: the online trainers sample from a full copy of the policy on every process, which DeepSpeed "
        "does not give; launch with recipes/accelerate/fsdp2.yaml or recipes/accelerate/ddp.yaml"
    )


def check(trainer) -> None:
    """Refuse, before anything is read or written, what DeepSpeed does not run here."""
    from aligner.errors import ConfigError

    if not requested():
        return
    if not getattr(trainer, "deepspeed_ok", True):
        refuse_online(trainer.stage)
    if trainer.recipe.lora.quantize != "none":
        raise ConfigError(f"{trainer.stage}: a 4-bit (QLoRA) base is not partitioned; launch QLoRA runs with DDP")


def configure(accelerator, cfg, world: int) -> None:
    """Under DeepSpeed, fill the launch's config with the loop's settings before `accelerator.prepare`."""
    if accelerator.distributed_type != "DEEPSPEED":
        return
    plugin = accelerator.state.deepspeed_plugin
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    config["gradient_accumulation_steps"] = 1  # the loop accumulates, marking the boundary itself
    config["train_batch_size"] = cfg.micro_batch_size * world
    config["gradient_clipping"] = float(cfg.grad_clip)
    config["bf16"] = {"enabled": False}  # the loop's autocast over fp32 master weights
    config["fp16"] = {"enabled": False}
    config["zero_allow_untested_optimizer"] = True  # the loop's own (fused) AdamW
    config.setdefault("steps_per_print", 2**31 - 1)
    config.setdefault("wall_clock_breakdown", False)


def backward(engine, loss: torch.Tensor, boundary: bool) -> None:
    """One micro-batch's backward through the engine; `boundary`: the optimizer step's last micro-batch."""
    engine.set_gradient_accumulation_boundary(boundary)
    engine.backward(loss)


def step(engine) -> float:
    """The engine's optimizer step (clipping to the config's gradient_clipping, AdamW, zeroed gradients);
    returns the gradient norm before clipping."""
    engine.step()
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else 0.0


def save(engine, path: Path) -> None:
    """Every process's partitions of the weights and optimizer state into `path` (collective)."""
    engine.save_checkpoint(str(path), tag="zero", save_latest=False)


def load(engine, path: Path) -> None:
    """The partitions back from `path` (collective); the loop's scheduler is restored by the loop."""
    found, _ = engine.load_checkpoint(
        str(path), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if found is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")


def full_state_dict(engine, main_only: bool) -> dict[str, torch.Tensor]:
    """The full weights on the main process (on the CPU; empty elsewhere). Every process must call it."""
    if not main_only:
        raise ValueError("DeepSpeed gathers the full weights on the main process only")
    if engine.zero_optimization_partition_weights():  # ZeRO-3: gathered layer by layer
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if state is None or engine.global_rank != 0:
        return {}
    return {k: v.detach().cpu() for k, v in state.items()}
