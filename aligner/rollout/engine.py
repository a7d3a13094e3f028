"""The rollout engine interface: token ids in, token ids and per-token sampling log-probs out.

Engines know nothing of tokenization: callers render and encode prompts, engines return ids. Two
implementations: `TorchEngine` (aligner/rollout/torch_engine.py, batched KV-cache sampling in the
training process, for the GPT core and any Hugging Face causal LM) and the vLLM engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass
class SamplingParams:
    max_new_tokens: int = 64  # generate at most this many tokens per completion
    temperature: float = 1.0  # divides the logits; 0 = greedy
    top_k: int = 0  # sample among the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: the smallest set with cumulative probability >= top_p; 1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token); 0 = off
    n: int = 1  # completions per prompt
    stop_ids: tuple[int, ...] = ()  # stop after emitting any of these (the stop id is kept in the output)
    seed: int | None = None  # seeds the sampler for reproducible draws; None = torch's global RNG

    def __post_init__(self):
        self.stop_ids = tuple(int(i) for i in self.stop_ids)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature < float("inf"):  # NaN too
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")


@dataclass
class Completion:
    prompt_ids: list[int]  # the prompt as given
    token_ids: list[int]  # generated ids, ending with the stop id when finished
    logprobs: list[float]  # sampling log-prob of each generated id (see the engine for which distribution)
    finished: bool  # True = stopped on a stop id; False = ran into max_new_tokens


def check_prompts(prompts: list[list[int]]) -> None:
    """Every prompt needs at least one token (e.g. BOS) to condition on."""
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token (e.g. BOS)")


@runtime_checkable
class Engine(Protocol):
    """A rollout engine. `generate` is the whole contract; the lifecycle methods have no-op defaults, for an
    engine that samples from the policy itself (the torch engine): one holding a copy of the weights (vLLM)
    gets them with `sync_weights` and can free its memory between rollouts (`sleep` / `wake_up`)."""

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """len(prompts) * params.n completions, grouped by prompt: the n samples of prompt 0 first."""
        ...

    def sync_weights(self, model) -> None:
        """Take the policy's current weights (adapters merged)."""

    def sleep(self) -> None:
        """Free the engine's memory while the trainer runs."""

    def wake_up(self) -> None:
        """Take the memory back before generating."""
