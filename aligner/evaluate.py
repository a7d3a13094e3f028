"""Held-out evaluation of a checkpoint: exact-match accuracy of greedy answers, with a 95% interval.

    from aligner.evaluate import exact_match
    result = exact_match(model, tokenizer, world_rows("rl", "test", n=500))   # {"accuracy", "ci95", ...}

Prompts are rendered with the chat template exactly as training rendered them (generation prompt
appended), answers are generated greedily until the template's end-of-turn token, and the final
answer is checked by the same function the reward functions use (`aligner.data.world.is_correct`).
The interval is Wilson's score interval, which stays inside [0, 1] at accuracies near 0 or 1.
"""

from __future__ import annotations

import math

import torch

from aligner.data.chat import encode_prompt, pad_token_id, reply_stop_ids
from aligner.data.world import is_correct


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion.

    >>> tuple(round(x, 3) for x in wilson_interval(50, 100))
    (0.404, 0.596)
    """
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    *,
    template: str | None = None,
    max_new_tokens: int = 160,
    batch_size: int = 64,
) -> dict:
    """Greedy exact-match accuracy over rows {"prompt": messages, "answer": str}; also returns completions."""
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine

    engine = TorchEngine(model, pad_id=pad_token_id(tokenizer))
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tuple(reply_stop_ids(tokenizer, template))
    )
    completions, correct = [], 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, r["prompt"], template) for r in chunk]
        for row, out in zip(chunk, engine.generate(prompts, params)):
            text = tokenizer.decode(out.token_ids, skip_special_tokens=True)
            ok = is_correct(text, row["answer"])
            correct += ok
            completions.append({"answer": row["answer"], "completion": text, "correct": ok})
    n = len(rows)
    return {
        "accuracy": correct / n if n else 0.0,
        "ci95": wilson_interval(correct, n),
        "n": n,
        "correct": correct,
        "completions": completions,
    }
