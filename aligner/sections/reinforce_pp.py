"""The `reinforce_pp:` section and the `aligner reinforce_pp` command (aligner/trainers/reinforce_pp.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.registry import Algorithm, register
from aligner.sections.base import ONLINE, choice


@dataclass
class ReinforcePPConfig:
    num_generations: int = 1  # completions per prompt (the paper's REINFORCE++ samples one)
    rewards: list[str] = field(default_factory=lambda: ["correct_answer", "format_reward"])  # names or module:fn
    reward_weights: list[float] = field(default_factory=list)  # one per reward (reward_model's first); [] = all 1
    reward_model: str | None = None  # a reward-model checkpoint, scored as one more reward (the first)
    kl_coef: float = 0.01  # per-token KL penalty in the reward: r_t = -kl_coef * KL_t (+ the score at the end)
    kl_estimator: str = choice("k1", "k1", "k3")  # per-token KL estimate in the reward
    gamma: float = 1.0  # discount of the returns
    epsilon: float = 0.2  # token ratio clip
    num_iterations: int = 1  # optimizer steps per rollout (old log-probs recomputed when > 1)
    mask_truncated: bool = True  # completions that hit rollout.max_new_tokens get no loss
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.num_generations >= 1, "reinforce_pp.num_generations must be 1 or more"),
            (self.num_iterations > 0, "reinforce_pp.num_iterations must be positive"),
            (self.kl_coef >= 0 and self.epsilon > 0, "reinforce_pp.kl_coef must be >= 0 and epsilon positive"),
            (0 < self.gamma <= 1, "reinforce_pp.gamma must be in (0, 1]"),
        ]


register(Algorithm(
    name="reinforce_pp",
    section="reinforce_pp",
    config=ReinforcePPConfig,
    run="aligner.trainers.reinforce_pp:reinforce_pp",
    trainer="aligner.trainers.reinforce_pp:ReinforcePPTrainer",
    recipe="reinforce_pp.yaml",
    help="REINFORCE++: online RL without a critic, token-level KL in the reward, batch-normalised advantages",
    reads=("reinforce_pp", *ONLINE),
    starts_from="sft",
    hub_lr=(1e-6, 1e-5),
))  # fmt: skip
