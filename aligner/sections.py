"""Recipe sections: one dataclass per YAML section, each field a typed default with a one-line comment.

    model:     what to train (the GPT core from scratch, a checkpoint, or a Hugging Face model)
    tokenizer: where the tokenizer comes from, or how to train one
    data:      where rows come from and how they become sequences
    train:     the shared training loop (optimizer, schedule, batch, precision, cadence, run dir)
    lora:      LoRA / QLoRA adapters instead of full fine-tuning
    rollout:   how the online trainers sample (engine, length, temperature and filters, vLLM)
and one section per algorithm, each registered beside its dataclass (aligner.registry):
    sft:       supervised fine-tuning / pretraining options (chat template, loss mask, packing)
    rm:        Bradley-Terry reward models
    dpo:       direct preference optimisation and its variants (and KTO on unpaired rows)
    ppo:       PPO with a KL penalty, a value model and GAE (online RL with a reward model)
    grpo:      group relative policy optimisation (online RL with reward functions)

A section's `checks(recipe)` returns (condition, message) pairs that `aligner.config.validate` enforces.
`aligner.config` loads them from YAML and flags, strictly, and re-exports everything here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from aligner.registry import SECTIONS, Algorithm, register


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
class SFTConfig:
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    train_on: str = choice("all", "all", "last")  # assistant turns in the loss: every one, or only the last
    overlong: str = choice("truncate", "truncate", "drop", "error")  # conversations over data.seq_len tokens
    packing: bool = True  # padding-free packing of each micro-batch (same loss, less padding)
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval
    samples: int = 3  # sample generations printed at the end of the run
    sample_tokens: int = 48  # max new tokens per printed sample

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [(self.accuracy_items >= 0, "sft.accuracy_items must be 0 or more")]


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
    engine: str = choice("torch", "torch", "vllm")  # built-in KV-cache engine, or vLLM in the training process
    max_new_tokens: int = 160  # longest completion
    temperature: float = 1.0  # sampling temperature (the loss's log-probs use the same one)
    top_p: float = 1.0  # nucleus sampling; 1 = off
    top_k: int = 0  # top-k sampling; 0 = off
    min_p: float = 0.0  # min-p sampling; 0 = off
    compile: bool = False  # torch engine: torch.compile its decoding step (~20 s once; ~1.1x tokens/s)
    vllm_memory: float = 0.2  # vLLM's gpu_memory_utilization (on its CPU backend: the share of CPU memory)
    vllm_sleep: bool = False  # free vLLM's GPU memory while training (CUDA sleep mode)

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.max_new_tokens > 0, "rollout.max_new_tokens must be positive"),
            (self.temperature > 0, "rollout.temperature must be positive (the policy samples its rollouts)"),
            (0 < self.top_p <= 1 and self.top_k >= 0, "rollout.top_p must be in (0, 1] and rollout.top_k >= 0"),
            (0 <= self.min_p <= 1, "rollout.min_p must be in [0, 1]"),
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


@dataclass
class DPOConfig:
    loss: str = choice("sigmoid", "sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto")  # variant
    beta: float = 0.1  # strength of the implicit KL to the reference (SimPO: reward scale, ~2.0)
    label_smoothing: float = 0.0  # cdpo / robust: assumed probability that a pair's label is flipped
    simpo_gamma: float = 0.5  # SimPO target reward margin
    orpo_lambda: float = 0.1  # ORPO weight of the odds-ratio term against the chosen NLL
    sft_weight: float = 0.0  # RPO: + sft_weight x the chosen replies' token NLL (TRL: loss_type [sigmoid, sft])
    kto_desirable_weight: float = 1.0  # KTO: weight of desirable examples (raise it when they are fewer)
    kto_undesirable_weight: float = 1.0  # KTO: weight of undesirable examples
    sample_pairs: int = 0  # > 0: on-policy pairs from this many samples per training prompt of the start model
    sample_temperature: float = 1.0  # sampling temperature for those pairs
    sample_tokens: int = 160  # max new tokens per sample
    sample_greedy: bool = False  # the greedy reply joins the samples; when wrong it is the rejected reply
    pairs_per_prompt: int = 1  # up to this many distinct (correct, wrong) sampled pairs per prompt
    sample_fill: bool = True  # prompts lacking a correct or a wrong sample: completed from the data (false: left out)
    rounds: int = 1  # > 1: iterative DPO, each round on pairs sampled from the last round's model (its reference)
    packing: bool = True  # padding-free packing of each micro-batch's 2B sequences (same loss, less padding)
    precompute_ref: bool = False  # reference log-probs computed once before training and cached on disk
    ref_cache_dir: str = "runs/.ref_cache"  # where precomputed reference log-probs are kept (keyed by model + data)
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    overlong: str = choice("truncate", "truncate", "drop", "error")  # pairs over data.seq_len tokens
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.beta > 0, "dpo.beta must be positive"),
            (0 <= self.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
            (min(self.kto_desirable_weight, self.kto_undesirable_weight) > 0, "dpo.kto_*_weight must be positive"),
            (self.sft_weight >= 0, "dpo.sft_weight must be 0 or more"),
            (self.sample_pairs >= 0 and self.sample_temperature > 0, "dpo.sample_* must be positive"),
            (self.sample_tokens > 0, "dpo.sample_tokens must be positive"),
            (self.pairs_per_prompt >= 1, "dpo.pairs_per_prompt must be at least 1"),
            (self.rounds >= 1, "dpo.rounds must be at least 1"),
            (
                self.rounds == 1 or (self.sample_pairs > 0 and not recipe.lora.enabled),
                "dpo.rounds > 1 needs on-policy pairs (dpo.sample_pairs > 0) and full fine-tuning (no lora)",
            ),
        ]


@dataclass
class RMConfig:
    center_coef: float = 0.0  # + center_coef * (r_chosen + r_rejected)^2 keeps rewards near 0 (~0.01)
    lm_coef: float = 0.0  # + lm_coef * the chosen replies' token NLL under the LM head (GRM); 0 = off
    # reward = head + likelihood_coef * the reply's summed token log-prob under the model's own LM head
    # (trained so, saved with the checkpoint, used in every score); 0 = the head alone
    likelihood_coef: float = 0.0
    packing: bool = True  # padding-free packing of each micro-batch's 2B sequences (same loss, less padding)
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    overlong: str = choice("truncate", "truncate", "drop", "error")  # pairs over data.seq_len tokens

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.center_coef >= 0, "rm.center_coef must be 0 or more"),
            (min(self.lm_coef, self.likelihood_coef) >= 0, "rm.lm_coef and rm.likelihood_coef must be 0 or more"),
            (
                not (self.likelihood_coef and recipe.lora.enabled),
                "rm.likelihood_coef needs full fine-tuning (no lora): an adapter checkpoint does not keep it",
            ),
        ]


@dataclass
class GRPOConfig:
    num_generations: int = 8  # G completions per prompt; train.micro_batch_size x grad_accum x processes counts them
    rewards: list[str] = field(default_factory=lambda: ["correct_answer", "format_reward"])  # names or module:fn
    reward_weights: list[float] = field(default_factory=list)  # one per reward (reward_model's first); [] = all 1
    reward_model: str | None = None  # a reward-model checkpoint, scored as one more reward (the first)
    scale_rewards: str = choice("group", "group", "batch", "none")  # advantage scale; none = Dr. GRPO
    loss_type: str = choice("dapo", "grpo", "bnpo", "dr_grpo", "dapo")  # loss aggregation
    epsilon: float = 0.2  # clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # clip: ratio <= 1 + epsilon_high; None = epsilon (DAPO: 0.28)
    beta: float = 0.0  # k3 KL to the reference; 0 = no reference model is loaded
    num_iterations: int = 1  # optimizer steps per rollout batch (old log-probs recomputed when > 1)
    importance: str = choice("token", "token", "sequence")  # sequence = GSPO's sequence-level ratio
    mask_truncated: bool = True  # completions that hit rollout.max_new_tokens get no loss
    skip_zero_advantage: bool = True  # no forward/backward for advantage-0 completions (exact at beta 0, not bnpo)
    oversample: int = 1  # DAPO's dynamic sampling: sample k x the prompts, train on groups whose rewards differ
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.num_generations >= 2, "grpo.num_generations must be at least 2 (advantages compare a group)"),
            (self.num_iterations > 0, "grpo.num_iterations must be positive"),
            (self.beta >= 0 and self.epsilon > 0, "grpo.beta must be >= 0 and grpo.epsilon positive"),
            (self.oversample >= 1, "grpo.oversample must be 1 or more"),
        ]


@dataclass
class PPOConfig:
    reward_model: str | None = "runs/rm/final"  # reward-model checkpoint scoring each completion (aligner rm)
    rewards: list[str] = field(default_factory=list)  # reward functions added to the score (names or module:fn)
    reward_weights: list[float] = field(default_factory=list)  # one per reward (reward_model's first); [] = all 1
    value_model: str = choice("separate", "separate", "shared")  # a critic of its own, or a head on the policy
    value_init: str | None = None  # critic start (separate): a reward-model or LM checkpoint; None = reward_model
    rollout_prompts: int = 64  # prompts per rollout (all processes); one completion each
    ppo_epochs: int = 4  # passes over each rollout, in minibatches of the loop's global batch
    kl_coef: float = 0.05  # per-token KL penalty in the reward: r_t = -kl_coef * KL_t (+ score at the end)
    kl_estimator: str = choice("k1", "k1", "k3")  # per-token KL estimate in the reward
    kl_target: float | None = None  # adaptive KL controller (Ziegler et al.) toward this KL per sequence; None = off
    kl_horizon: int = 10000  # the controller's horizon
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    whiten_advantages: bool = True  # normalise advantages over the rollout
    cliprange: float = 0.2  # policy ratio clip
    cliprange_value: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    entropy_coef: float = 0.0  # entropy bonus (0 = off)
    missing_eos_penalty: float = 1.0  # subtracted from the score of a completion that never ends
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (
                self.ppo_epochs > 0 and self.rollout_prompts > 0,
                "ppo.ppo_epochs and ppo.rollout_prompts must be positive",
            )
        ]


# --- the algorithms (in the pipeline's order) --------------------------------------------------------------

register(Algorithm(
    name="pretrain",
    section="sft",
    config=SFTConfig,
    run="aligner.trainers.sft:pretrain",
    trainer="aligner.trainers.sft:SFTTrainer",
    recipe="pretrain.yaml",
    help="train the tokenizer and the GPT core on plain text (packed, every token in the loss)",
    reads=("model", "tokenizer", "data", "train", "sft.samples", "sft.sample_tokens"),
    policy=False,
))  # fmt: skip

register(Algorithm(
    name="sft",
    section="sft",
    config=SFTConfig,
    run="aligner.trainers.sft:sft",
    trainer="aligner.trainers.sft:SFTTrainer",
    recipe="chat.yaml",
    help="supervised fine-tuning on conversations (assistant-only loss), full, LoRA or QLoRA",
    reads=("sft", *COMMON),
    starts_from="pretrain",
))  # fmt: skip

register(Algorithm(
    name="rm",
    section="rm",
    config=RMConfig,
    run="aligner.trainers.rm:rm",
    trainer="aligner.trainers.rm:RewardTrainer",
    recipe="reward.yaml",
    help="Bradley-Terry reward model (scalar head on the last token) from the SFT model",
    reads=("rm", "sft.chat_template", *COMMON),
    starts_from="sft",
    policy=False,
))  # fmt: skip

register(Algorithm(
    name="dpo",
    section="dpo",
    config=DPOConfig,
    run="aligner.trainers.dpo:dpo",
    trainer="aligner.trainers.dpo:DPOTrainer",
    recipe="dpo.yaml",
    help="preference optimisation (DPO, cDPO, robust, hinge, IPO, SimPO, ORPO, KTO) from the SFT model",
    reads=("dpo", "sft.chat_template", *COMMON),
    starts_from="sft",
))  # fmt: skip

register(Algorithm(
    name="ppo",
    section="ppo",
    config=PPOConfig,
    run="aligner.trainers.ppo:ppo",
    trainer="aligner.trainers.ppo:PPOTrainer",
    recipe="ppo.yaml",
    help="PPO with a KL penalty: value model, GAE, clipped losses, scored by a reward model",
    reads=("ppo", *ONLINE),
    starts_from="sft",
    wires={"ppo.reward_model": "rm"},
))  # fmt: skip

register(Algorithm(
    name="grpo",
    section="grpo",
    config=GRPOConfig,
    run="aligner.trainers.grpo:grpo",
    trainer="aligner.trainers.grpo:GRPOTrainer",
    recipe="grpo.yaml",
    help="GRPO: online RL with reward functions (G samples per prompt, group-relative advantages)",
    reads=("grpo", *ONLINE),
    starts_from="sft",
))  # fmt: skip


class Recipe:
    """A resolved recipe: one dataclass instance per section of `SECTIONS` (`recipe.train.lr`), where it was
    loaded from (`path`) and the "section.key"s the user set, by a flag or in a recipe file other than the
    command's default recipe (`explicit`). A section registered after the recipe was made reads its defaults."""

    def __init__(self, path: str | None = None, explicit: set[str] | None = None, **sections):
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise TypeError(f"Recipe got unknown sections {unknown}")
        for name, cls in SECTIONS.items():
            setattr(self, name, sections[name] if name in sections else cls())
        self.path = path
        self.explicit = set(explicit or ())

    def __getattr__(self, name: str):
        if name in SECTIONS:  # registered after this recipe was made: its defaults
            value = SECTIONS[name]()
            setattr(self, name, value)
            return value
        raise AttributeError(f"'Recipe' has no section '{name}'")

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what gets saved next to every checkpoint)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        header = f"# resolved recipe (from {self.path or 'built-in defaults'})\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)
