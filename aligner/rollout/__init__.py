"""Rollout engines: the built-in KV-cache engine (`torch_engine`) and vLLM (`vllm_engine`), one protocol
(`engine`). `make_engine` builds the one a recipe's `rollout` section names."""

from __future__ import annotations

from aligner.rollout.engine import Engine


def make_engine(
    cfg, model, pad_id: int | None, *, checkpoint=None, max_model_len: int | None = None, seed: int = 0
) -> Engine:
    """The rollout engine a recipe's `rollout` section names: the torch engine over `model` itself, or vLLM
    started from `checkpoint` (the policy's starting weights; `sync_weights` brings it up to date)."""
    if cfg.engine == "torch":
        from aligner.rollout.torch_engine import TorchEngine

        return TorchEngine(model, pad_id=pad_id, compile=cfg.compile)
    from aligner.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        checkpoint,
        gpu_memory_utilization=cfg.vllm_memory,
        max_model_len=max_model_len,
        enable_sleep_mode=cfg.vllm_sleep,
        seed=seed,
    )
