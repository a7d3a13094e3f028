"""The sections every command shares: one dataclass per YAML section, each field a typed default with a
one-line comment (`aligner <command> --help` prints it).

    model:     what to train (the GPT core from scratch, a checkpoint, or a Hugging Face model)
    tokenizer: where the tokenizer comes from, or how to train one
    data:      where rows come from and how they become sequences
    train:     the shared training loop (optimizer, schedule, batch, precision, cadence, run dir)
    lora:      LoRA / QLoRA adapters instead of full fine-tuning
    rollout:   how the online trainers sample (engine, length, temperature and filters, vLLM)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aligner.registry import SECTIONS


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": choices})


# --- sections -------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    init_from: str | None = None  # checkpoint dir / HF model dir or hub name; None = fresh GPT core
    # auto = the GPT core for a fresh model or a local Llama checkpoint whose every config field it implements
    # (checkpoints aligner wrote among them), transformers for everything else; gpt / hf force one or the other
    arch: str = choice("auto", "auto", "gpt", "hf")
    dtype: str = choice(
        "auto", "auto", "fp32", "bf16", "fp16"
    )  # weights; auto = bf16 if loaded on a bf16 GPU, else fp32
    attn_implementation: str = (
        "auto"  # transformers attention kernel (sdpa, eager, flash_attention_2); auto = its choice
    )
    hidden_size: int = 256  # GPT core width (fresh init only)
    num_layers: int = 4  # GPT core depth
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 2  # key/value heads (grouped-query attention); must divide num_heads
    intermediate_size: int | None = None  # SwiGLU width; None = 8/3 * hidden_size rounded up to 64
    max_seq_len: int = 512  # RoPE context length written to config.json
    rope_theta: float = 10000.0  # RoPE base
    tie_embeddings: bool = True  # share input embedding and output head
    trust_remote_code: bool = False  # only for hf models whose code lives in the model repo


@dataclass
class TokenizerConfig:
    path: str | None = None  # tokenizer dir or hub name; None = init_from's tokenizer, else train one
    vocab_size: int = 2048  # byte-level BPE vocabulary size when training one
    chat_template: str = "prompts/chatml.jinja"  # template file (or name in prompts/) attached to it
    train_rows: int = 20000  # rows of the training text used to fit the BPE merges


@dataclass
class MixSource:
    source: str  # world[:kind], a jsonl/json/parquet/csv/txt file or dir, a dataset snapshot dir, or hub name
    subset: str | None = None  # config name of a hub dataset or snapshot dir (main for openai/gsm8k)
    split: str = "train"  # split of `source` to draw rows from
    columns: dict[str, str] = field(default_factory=dict)  # rename map for this source's rows: {question: prompt}
    weight: float = 1.0  # relative share of the training rows: round(data.num_rows * weight / sum of weights)


@dataclass
class DataConfig:
    source: str = "world:pretrain"  # world[:kind], a jsonl/json/parquet/csv/txt file or dir, or hub name
    subset: str | None = None  # config name of a hub dataset or snapshot dir (main for openai/gsm8k); eval too
    split: str = "train"  # split of `source` to train on
    columns: dict[str, str] = field(default_factory=dict)  # renames after loading: {question: prompt}; eval too
    streaming: bool = False  # stream source / eval_source: read only the first num_rows / num_eval_rows rows
    # weighted sources instead of `source` (which then reads 'mix'); without num_rows, the largest mix repeating no row
    mix: list[MixSource] = field(default_factory=list)
    system_prompt: str | None = None  # system turn for conversations and prompts without one: prompts/ file or text
    eval_source: str | None = None  # None = the world's val split, or a held-out slice of `source`
    eval_split: str = "val"  # split of eval_source
    eval_fraction: float = 0.02  # held-out fraction of `source` (or of the mix) when there is no eval source
    text_field: str = "text"  # column holding plain text (pretraining)
    format: str | None = None  # row format (messages, sharegpt, alpaca, prompt_completion, text); None = detect
    num_rows: int | None = None  # use only the first N training rows (with mix: N in all, shared by weight)
    num_eval_rows: int | None = 500  # use only the first N eval rows; 0 = no eval split
    seq_len: int = 256  # tokens per training sequence
    world_seed: int = 0  # seed of the built-in task world
    world_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # task difficulty levels


@dataclass
class TrainConfig:
    name: str = "pretrain"  # run name: checkpoints go to <out_dir>/<name>
    out_dir: str = "runs"  # parent of run directories
    seed: int = 0  # seeds init, data order and sampling
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.03  # fraction of steps spent in linear warmup (ignored if warmup_steps set)
    warmup_steps: int | None = None  # explicit warmup steps
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms, biases, embeddings)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # clip global grad norm; 0 disables
    micro_batch_size: int = 16  # sequences per forward/backward on each process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int | None = None  # optimizer steps; None = derive from epochs
    epochs: float = 1.0  # passes over the training rows when max_steps is None
    precision: str = choice("auto", "auto", "fp32", "bf16", "fp16")  # auto = bf16 autocast where supported
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, ~1/3 more compute
    compile: bool = False  # torch.compile the model's forward and backward (the first steps compile: slower)
    deterministic: bool = False  # bitwise-repeatable GPU kernels (slower): exact resume on CUDA
    eval_every: int = 100  # steps between evals; 0 = only at the end
    save_every: int = 200  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # step_* directories kept (final is always kept)
    log_every: int = 1  # steps between metrics.jsonl lines
    trackers: list[str] = field(default_factory=list)  # extra trackers: tensorboard, wandb
    progress: bool = True  # progress bar on stderr
    resume: bool = False  # continue from the newest checkpoint in the run dir
    # resume although the recipe changed in what shapes the optimisation (lr, schedule, batch, seed, data): the
    # new values apply from the checkpoint's step on, recorded in <run dir>/resume_changes.jsonl
    resume_with_changes: bool = False
    overwrite: bool = False  # replace an existing run dir instead of refusing


@dataclass
class LoRAConfig:
    enabled: bool = False  # train low-rank adapters (peft) instead of every weight
    r: int = 16  # adapter rank
    alpha: float = 32.0  # scaling numerator: W = W0 + (alpha / r) * B @ A
    dropout: float = 0.05  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # names; all-linear = all but the head
    quantize: str = choice("none", "none", "nf4")  # nf4 = QLoRA: frozen base in 4-bit NF4 (bitsandbytes)
    double_quant: bool = True  # QLoRA: quantize the quantization constants too
    compute_dtype: str = choice("auto", "auto", "bf16", "fp32")  # QLoRA matmul dtype; auto = bf16 where it is fast


@dataclass
class RolloutConfig:
    # built-in KV-cache engine, vLLM in the training process, or a vLLM server (aligner serve-rollouts)
    engine: str = choice("torch", "torch", "vllm", "vllm_server")
    max_new_tokens: int = 160  # longest completion
    temperature: float = 1.0  # sampling temperature (the loss's log-probs use the same one)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # top-k sampling; 0 = off
    min_p: float = 0.0  # min-p sampling; 0 = off
    compile: bool = False  # torch engine: torch.compile its decoding step (~20 s once; ~1.1x tokens/s)
    # torch engine: the precision it samples in; auto = bf16 where training runs under bf16 autocast (a bf16
    # copy of the weights per rollout, as vLLM samples in bf16), else the weights' own
    dtype: str = choice("auto", "auto", "fp32", "bf16")
    vllm_memory: float = 0.2  # vLLM's gpu_memory_utilization (on its CPU backend: the share of CPU memory)
    vllm_sleep: bool = False  # free vLLM's GPU memory while training (CUDA sleep mode)
    server_url: str = "http://127.0.0.1:8000"  # vllm_server: where `aligner serve-rollouts` listens
    sync_bucket_mb: float = 16.0  # vLLM engines: weights are pushed in buckets of at most this many MiB
    # truncated importance sampling: weigh each token's surrogate by min(trainer / sampler probability, tis_cap)
    # where the sampler's numerics differ from the trainer's (vLLM, bf16); 0 = off (the mismatch is logged anyway)
    tis_cap: float = 0.0
    # GRPO, RLOO, REINFORCE++: train on a group's completions as branches after one copy of their prompt
    # where that makes the forward cheaper (exact: each completion attends to the prompt and itself only)
    share_prompts: bool = True

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.max_new_tokens > 0, "rollout.max_new_tokens must be positive"),
            (self.temperature > 0, "rollout.temperature must be positive (the policy samples its rollouts)"),
            (0 < self.top_p <= 1 and self.top_k >= 0, "rollout.top_p must be in (0, 1] and rollout.top_k >= 0"),
            (0 <= self.min_p <= 1, "rollout.min_p must be in [0, 1]"),
            (self.tis_cap == 0 or self.tis_cap >= 1, "rollout.tis_cap must be 0 (off) or at least 1"),
            (self.sync_bucket_mb > 0, "rollout.sync_bucket_mb must be positive"),
            (
                self.engine != "vllm_server" or self.server_url.startswith(("http://", "https://")),
                f"rollout.server_url must be an http:// or https:// URL, got '{self.server_url}'",
            ),
        ]


SECTIONS.update(
    model=ModelConfig,
    tokenizer=TokenizerConfig,
    data=DataConfig,
    train=TrainConfig,
    lora=LoRAConfig,
    rollout=RolloutConfig,
)
# the sections every training command reads besides its own (`aligner <command> --help` lists them)
COMMON = ("lora", "model", "tokenizer.path", "data", "train")
ONLINE = ("rollout", "sft.chat_template", *COMMON)  # the online trainers also sample
