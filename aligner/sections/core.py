"""The built-in algorithms' sections, registered beside their dataclasses (in the pipeline's order):

sft:       supervised fine-tuning / pretraining options (chat template, loss mask, packing)
rm:        Bradley-Terry reward models
dpo:       direct preference optimisation and its variants (and KTO on unpaired rows)
ppo:       PPO with a KL penalty, a value model and GAE (online RL with a reward model)
grpo:      group relative policy optimisation (online RL with reward functions)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.registry import Algorithm, register
from aligner.sections.base import COMMON, ONLINE, choice


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
    # packed pairs: chosen and rejected share one pass over their common prefix (the prompt), each reply then
    # attending to it and to itself; the same rewards with fewer tokens (needs packing and no LM term)
    share_prefix: bool = True
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
    hub_lr=(2e-5, 2e-4),  # Zephyr, Alpaca
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
    hub_lr=(1e-5, 1e-4),
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
    hub_lr=(5e-7, 5e-6),  # Zephyr, Tulu 3
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
    hub_lr=(3e-6, 3e-5),  # InstructGPT, TRL
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
    hub_lr=(1e-6, 1e-5),  # TRL
))  # fmt: skip
