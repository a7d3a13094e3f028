"""The `rloo:` section and the `aligner rloo` command (aligner/trainers/rloo.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.registry import Algorithm, register
from aligner.sections.base import ONLINE


@dataclass
class RLOOConfig:
    num_generations: int = 4  # k completions per prompt; each one's baseline is the mean reward of the other k - 1
    rewards: list[str] = field(default_factory=lambda: ["correct_answer", "format_reward"])  # names or module:fn
    reward_weights: list[float] = field(default_factory=list)  # one per reward (reward_model's first); [] = all 1
    reward_model: str | None = None  # a reward-model checkpoint, scored as one more reward (the first)
    beta: float = 0.0  # sequence KL to the reference subtracted from each reward; 0 = no reference model is loaded
    normalize_advantages: bool = False  # scale the advantages of a rollout to mean 0, std 1
    epsilon: float = 0.2  # clip of the sequence ratio: >= 1 - epsilon
    epsilon_high: float | None = None  # clip: <= 1 + epsilon_high; None = epsilon
    num_iterations: int = 1  # optimizer steps per rollout (old log-probs recomputed when > 1)
    mask_truncated: bool = True  # completions that hit rollout.max_new_tokens get no loss
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.num_generations >= 2, "rloo.num_generations must be at least 2 (the baseline leaves one out)"),
            (self.num_iterations > 0, "rloo.num_iterations must be positive"),
            (self.beta >= 0 and self.epsilon > 0, "rloo.beta must be >= 0 and rloo.epsilon positive"),
        ]


register(Algorithm(
    name="rloo",
    section="rloo",
    config=RLOOConfig,
    run="aligner.trainers.rloo:rloo",
    trainer="aligner.trainers.rloo:RLOOTrainer",
    recipe="rloo.yaml",
    help="RLOO: online RL with reward functions, k samples per prompt, leave-one-out baselines",
    reads=("rloo", *ONLINE),
    starts_from="sft",
    hub_lr=(1e-6, 1e-5),  # TRL
))  # fmt: skip
