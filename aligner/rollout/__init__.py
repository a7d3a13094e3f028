"""Rollout engines: the built-in KV-cache engine (`torch_engine`), vLLM in the training process
(`vllm_engine`) and a vLLM server (`vllm_server`), one protocol (`engine`). `make_engine` builds the one
a recipe's `rollout` section names."""

from __future__ import annotations

from aligner.rollout.engine import Engine


def make_engine(
    cfg,
    model,
    pad_id: int | None,
    *,
    checkpoint=None,
    max_model_len: int | None = None,
    seed: int = 0,
    main: bool = True,
    dtype=None,
) -> Engine:
    """The rollout engine a recipe's `rollout` section names: the torch engine over `model` itself, vLLM
    started from `checkpoint` (the policy's starting weights; `sync_weights` brings it up to date), or a
    client of a vLLM server at `cfg.server_url` (the `main` process pushes the weights). `dtype`: the torch
    engine's sampling precision (None: the weights' own)."""
    if cfg.engine == "torch":
        from aligner.rollout.torch_engine import TorchEngine

        return TorchEngine(model, pad_id=pad_id, compile=cfg.compile, dtype=dtype)
    if cfg.engine == "vllm_server":
        from aligner.rollout.vllm_server import VLLMServerEngine

        return VLLMServerEngine(cfg.server_url, bucket_mb=cfg.sync_bucket_mb, sender=main)
    from aligner.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(
        checkpoint,
        gpu_memory_utilization=cfg.vllm_memory,
        max_model_len=max_model_len,
        enable_sleep_mode=cfg.vllm_sleep,
        seed=seed,
        bucket_mb=cfg.sync_bucket_mb,
    )
