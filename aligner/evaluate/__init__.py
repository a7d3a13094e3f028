"""Evaluation of checkpoints: metric functions (aligner/evaluate/metrics.py), and the task specs of
evals/*.yaml that run them (aligner/evaluate/specs.py, one table of metrics).

    aligner eval runs/grpo/final                              # evals/task_world.yaml
    aligner eval runs/grpo/final win_rate kl --out grpo.json  # evals/win_rate.yaml, evals/kl.yaml
    aligner eval runs/rm/final reward_accuracy
    aligner eval runs/dpo/final implicit_reward                # against runs/sft/final
    from aligner.evaluate import exact_match
    result = exact_match(model, tokenizer, world_rows("rl", "test", n=500))   # {"accuracy", "ci95", ...}

A spec (YAML, header comment, strict keys) names its data, system prompt, metrics and sampling:

    name: task_world
    data: {source: "world:rl", split: test, items: 500}    # or a jsonl/parquet/csv file, or a hub name
    prompt: system.txt                                      # a file in prompts/ (replaces the rows' system turn)
    metrics: [exact_match, pass_at_k, samples]
    sampling: {k: 8, temperature: 1.0, max_new_tokens: 160}

Metrics (METRICS):
    exact_match      greedy answers, checked by the reward functions' checker (`aligner.data.world.is_correct`)
    pass_at_k        a right answer among k samples, and maj_at_k: the most common of the k answers is right
    perplexity       exp(mean NLL) of the assistant tokens of conversations (data: world:sft or chat rows)
    reward_accuracy  pairwise accuracy of a reward model (`reward_model`, else the checkpoint) on preference pairs
    implicit_reward_accuracy   the same for a policy's DPO implicit reward against `reference`
    win_rate         the checkpoint's greedy replies against `reference`'s, judged by `reward_model` (ties: half)
    kl               KL(checkpoint || reference) per reply on the checkpoint's own samples (k1, sequence-summed)
    samples          a table of the first few prompts, greedy replies and whether they are right

Prompts are rendered with the chat template exactly as training rendered them (generation prompt
appended) and replies are decoded until the template's end-of-turn token. Intervals are 95% Wilson
intervals, which stay inside [0, 1] at accuracies near 0 or 1.
"""

from aligner.evaluate.metrics import (  # noqa: F401  (this package's API)
    exact_match,
    greedy_replies,
    implicit_reward_accuracy,
    judge,
    kl_to_reference,
    log_ratios,
    paired_difference,
    pass_at_k,
    perplexity,
    reward_accuracy,
    wilson_interval,
    win_rate,
)
from aligner.evaluate.specs import (  # noqa: F401
    METRICS,
    DataSpec,
    EvalSpec,
    Metric,
    SamplingSpec,
    default_output,
    evaluate,
    find_spec,
    load_spec,
    run_spec,
    spec_rows,
    summary_lines,
    unique_rows,
)
