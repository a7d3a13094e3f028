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
runs on CPUs too (its CPU accelerator and gloo), which is how the 2-process tests run it.

A frozen reference (DPO, GRPO, PPO, ...) and PPO's reward model are partitioned like the policy under ZeRO-3,
and offloaded where the config offloads parameters (`partition_frozen`). The online trainers sample on every
process from a full copy of the policy, as under FSDP2: the copy is refreshed after each optimizer step from
the partitions, gathered one module at a time (`copy_gathered`), so the gathered weights never exceed the
largest module's beside the copy.
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


def partitioned(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are ZeRO-3 partitions (outside a gather each holds an empty tensor)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def gathered_parameters(model: torch.nn.Module):
    """(name, full tensor) of every parameter of ZeRO-3 partitioned `model` (or engine), gathered one module at
    a time; a tensor is valid until the next is yielded. Collective: every process takes them all, in order."""
    import deepspeed

    model = model.module if is_engine(model) else model
    seen: set[int] = set()  # a tied weight comes once, under the name `named_parameters` gives it
    for name, module in model.named_modules():
        own = [(k, p) for k, p in module.named_parameters(prefix=name, recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if own:
            with deepspeed.zero.GatheredParameters([p for _, p in own]):
                yield from ((k, p.data) for k, p in own)


@torch.no_grad()
def copy_gathered(target: torch.nn.Module, model: torch.nn.Module) -> None:
    """Copy ZeRO-3 partitioned `model`'s full weights into `target`, a whole module of the same structure, one
    module's parameters gathered at a time (collective)."""
    params, buffers = dict(target.named_parameters()), dict(target.named_buffers())
    for key, p in gathered_parameters(model):
        params[key].copy_(p)
    for key, b in model.named_buffers():
        if key in buffers:
            buffers[key].copy_(b)


def partition_frozen(model: torch.nn.Module, accelerator, micro_batch: int) -> torch.nn.Module:
    """Under ZeRO-3, a frozen companion of the policy (its reference) partitioned over the processes as the
    launch's config partitions the policy, its parameters offloaded where the config offloads them: DeepSpeed's
    engine without an optimizer, whose forward is the model's (every process runs it in step, as the policy).
    Under ZeRO-1/2, which partition only what training holds, the model as it is."""
    import copy

    import deepspeed

    from aligner.model.forward import base_config

    zero = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}))
    if int(zero.get("stage", 0)) != 3:
        return model
    hidden = base_config(model).hidden_size  # what accelerate fills the policy's "auto" sizes from
    auto = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    zero = {k: auto.get(k) if v == "auto" else v for k, v in zero.items() if v != "auto" or k in auto}
    zero.pop("offload_optimizer", None)
    config = {
        **loop_settings(micro_batch, accelerator.num_processes),
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # (DeepSpeed's train/eval return None)
    return engine


def check(trainer) -> None:
    """Refuse, before anything is read or written, what DeepSpeed does not run here."""
    from aligner.errors import ConfigError

    if not requested():
        return
    if trainer.recipe.lora.quantize != "none":
        raise ConfigError(f"{trainer.stage}: a 4-bit (QLoRA) base is not partitioned; launch QLoRA runs with DDP")


def configure(accelerator, cfg, world: int) -> None:
    """Under DeepSpeed, fill the launch's config with the loop's settings before `accelerator.prepare`."""
    if accelerator.distributed_type != "DEEPSPEED":
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config.update(loop_settings(cfg.micro_batch_size, world))
    config["gradient_clipping"] = float(cfg.grad_clip)
    config["zero_allow_untested_optimizer"] = True  # the loop's own (fused) AdamW
    config.setdefault("steps_per_print", 2**31 - 1)
    config.setdefault("wall_clock_breakdown", False)


def loop_settings(micro_batch: int, world: int) -> dict:
    """The DeepSpeed settings that are the loop's, for the policy's engine and a frozen companion's alike: its
    micro-batch, its own accumulation (the boundary marked by `backward`), and no DeepSpeed mixed precision
    (the loop's bf16 autocast over fp32 master weights)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch * world,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


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
