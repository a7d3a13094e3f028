"""The `online_dpo:` section and the `aligner online_dpo` command (aligner/trainers/online_dpo.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from aligner.registry import Algorithm, register
from aligner.sections.base import ONLINE, choice


@dataclass
class OnlineDPOConfig:
    loss: str = choice("sigmoid", "sigmoid", "ipo", "hinge")  # the DPO variant applied to each sampled pair
    beta: float = 0.1  # strength of the implicit KL to the reference
    num_generations: int = 2  # samples per prompt; the best and the worst by reward make its pair (ties: no pair)
    rewards: list[str] = field(default_factory=lambda: ["correct_answer", "format_reward"])  # the judge: names
    reward_weights: list[float] = field(default_factory=list)  # one per reward (reward_model's first); [] = all 1
    reward_model: str | None = None  # a reward-model checkpoint, scored as one more reward (the first)
    missing_eos_penalty: float = 0.0  # subtracted from the reward of a sample that never ends
    chat_template: str | None = None  # template file or name in prompts/; None = the tokenizer's own
    accuracy_items: int = 500  # held-out task-world items for exact-match accuracy at the end; 0 = skip
    accuracy_tokens: int = 160  # max new tokens per answer in that eval

    def checks(self, recipe) -> list[tuple[bool, str]]:
        return [
            (self.beta > 0, "online_dpo.beta must be positive"),
            (self.num_generations >= 2, "online_dpo.num_generations must be at least 2 (a pair per prompt)"),
            (self.missing_eos_penalty >= 0, "online_dpo.missing_eos_penalty must be 0 or more"),
        ]


register(Algorithm(
    name="online_dpo",
    section="online_dpo",
    config=OnlineDPOConfig,
    run="aligner.trainers.online_dpo:online_dpo",
    trainer="aligner.trainers.online_dpo:OnlineDPOTrainer",
    recipe="online_dpo.yaml",
    help="online DPO: pairs sampled from the current policy every step, judged by reward functions or a model",
    reads=("online_dpo", *ONLINE),
    starts_from="sft",
    hub_lr=(5e-7, 5e-6),  # TRL
))  # fmt: skip
