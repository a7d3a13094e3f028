"""Evaluation of checkpoints: metric functions, and the task specs of evals/*.yaml that run them.

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

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from aligner.data.chat import encode_conversation, encode_prompt, pad_token_id, reply_stop_ids
from aligner.errors import ConfigError, DataError
from aligner.stats import paired_difference, wilson_interval  # noqa: F401  (part of this module's API)


def _engine(model, tokenizer):
    from aligner.rollout.torch_engine import TorchEngine

    return TorchEngine(model, pad_id=pad_token_id(tokenizer))


def _params(tokenizer, template, max_new_tokens: int, temperature: float = 0.0, n: int = 1, top_p=1.0, seed=0):
    from aligner.rollout.engine import SamplingParams

    stop = tuple(reply_stop_ids(tokenizer, template))
    return SamplingParams(
        max_new_tokens=max_new_tokens, temperature=temperature, n=n, top_p=top_p, stop_ids=stop, seed=seed
    )


def judge(checker: str, rows: list[dict], texts: list[str]) -> list[bool]:
    """Whether each reply is right for its row, by the answer checker `checker` (a reward function of
    aligner.rewards or module:function, called with the rows' columns, e.g. `answer`): score > 0.5."""
    from aligner.rewards import resolve_reward

    fn = resolve_reward(checker)
    columns = {k: [r.get(k) for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
    try:
        scores = fn([r["prompt"] for r in rows], texts, **columns)
    except Exception as e:
        raise DataError(f"answer checker '{checker}' raised {type(e).__name__}: {e}") from None
    return [float(x) > 0.5 for x in scores]


def _bar(total: int, desc: str, unit: str = "item"):
    from aligner.tracking import Progress

    return Progress(total, 0, enabled=True, desc=desc, unit=unit, every=4.0)


@torch.no_grad()
def greedy_replies(
    model, tokenizer, rows, template=None, max_new_tokens=160, batch_size: int = 64, progress: bool = False
) -> list[str]:
    """The greedy reply to each row's prompt, decoded until the template's end of turn."""
    engine, params = _engine(model, tokenizer), _params(tokenizer, template, max_new_tokens)
    texts = []
    bar = _bar(len(rows), "greedy replies") if progress else None
    for start in range(0, len(rows), batch_size):
        prompts = [encode_prompt(tokenizer, r["prompt"], template) for r in rows[start : start + batch_size]]
        texts += [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in engine.generate(prompts, params)]
        if bar is not None:
            bar.update(len(prompts))
    if bar is not None:
        bar.close()
    return texts


def exact_match(
    model: torch.nn.Module,
    tokenizer,
    rows: list[dict],
    *,
    template: str | None = None,
    max_new_tokens: int = 160,
    batch_size: int = 64,
    checker: str = "correct_answer",
    progress: bool = False,
) -> dict:
    """Greedy exact-match accuracy over rows {"prompt": messages, "answer": ...}, each reply judged by the
    answer checker `checker` (the task world's by default; `math_answer` for gsm8k / MATH-style rows);
    also returns the completions. `progress` shows a bar over the rows on stderr."""
    texts = greedy_replies(model, tokenizer, rows, template, max_new_tokens, batch_size, progress)
    verdicts = judge(checker, rows, texts) if rows else []
    completions = [
        {"answer": row["answer"], "completion": text, "correct": ok} for row, text, ok in zip(rows, texts, verdicts)
    ]
    n, correct = len(rows), sum(verdicts)
    return {
        "accuracy": correct / n if n else 0.0,
        "ci95": wilson_interval(correct, n),
        "n": n,
        "correct": correct,
        "completions": completions,
    }


# --- more metrics -----------------------------------------------------------------------------------


@torch.no_grad()
def pass_at_k(
    model, tokenizer, rows, *, k=8, temperature=1.0, top_p=1.0, max_new_tokens=160, template=None, seed=0,
    checker="correct_answer", progress=False,
):  # fmt: skip
    """Share of prompts with a right answer among k samples (pass@k) and whose most common answer is
    right (maj@k: the checker's verdict on a sample giving the answer most samples give, answers read by
    the checker's extractor in aligner.rewards.ANSWER_EXTRACTORS, else the whole reply), each with a
    95% interval."""
    from aligner.rewards import ANSWER_EXTRACTORS

    extract = ANSWER_EXTRACTORS.get(checker, str.strip)
    engine = _engine(model, tokenizer)
    params = _params(tokenizer, template, max_new_tokens, temperature, k, top_p, seed)
    passed = majority = 0
    bar = _bar(len(rows), f"pass@{k}") if progress else None
    for start in range(0, len(rows), 16):
        chunk = rows[start : start + 16]
        outs = engine.generate([encode_prompt(tokenizer, r["prompt"], template) for r in chunk], params)
        texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        verdicts = judge(checker, [r for r in chunk for _ in range(k)], texts)
        for i in range(len(chunk)):
            mine, right = texts[i * k : (i + 1) * k], verdicts[i * k : (i + 1) * k]
            passed += any(right)
            answers = [(a, j) for j, a in enumerate(map(extract, mine)) if a]
            if answers:
                top = Counter(a for a, _ in answers).most_common(1)[0][0]
                majority += right[next(j for a, j in answers if a == top)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    n = len(rows)
    return {
        "pass_at_k": passed / n if n else 0.0, "ci95": wilson_interval(passed, n), "k": k,
        "maj_at_k": majority / n if n else 0.0, "maj_ci95": wilson_interval(majority, n), "n": n,
    }  # fmt: skip


@torch.no_grad()
def perplexity(model, tokenizer, conversations: list[list[dict]], template=None, batch_size: int = 16) -> dict:
    """exp(mean NLL per token) of the assistant tokens (end-of-turn included) of each conversation."""
    from aligner.data.collate import pad_examples
    from aligner.logprobs import IGNORE_INDEX
    from aligner.model.forward import causal_lm_token_logprobs

    nll, tokens = 0.0, 0
    for start in range(0, len(conversations), batch_size):
        examples = []
        for messages in conversations[start : start + batch_size]:
            ids, mask = encode_conversation(tokenizer, messages, template)
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
            examples.append({"input_ids": ids[:-1], "labels": labels})
        batch = pad_examples(examples, pad_token_id(tokenizer))
        logps = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"])
        nll -= float(logps.sum())
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    loss = nll / max(tokens, 1)
    return {"perplexity": math.exp(min(loss, 50.0)), "nll": loss, "tokens": tokens, "n": len(conversations)}


def reward_accuracy(reward_model, tokenizer, pairs: list[dict]) -> dict:
    """Share of pairs {"prompt", "chosen", "rejected"} (message lists) the reward model ranks right."""
    from aligner.rewards import score_conversations

    chosen = score_conversations(reward_model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score_conversations(reward_model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    right = sum(c > r for c, r in zip(chosen, rejected))
    n = len(pairs)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / max(n, 1)
    return {"accuracy": right / n if n else 0.0, "ci95": wilson_interval(right, n), "margin": margin, "n": n}


@torch.no_grad()
def log_ratios(model, reference, examples: list[dict], pad_id: int) -> list[float]:
    """sum over each example's labelled tokens of log p(token) - log p_ref(token), in batches of 16."""
    from aligner.data.collate import pad_examples
    from aligner.model.forward import causal_lm_token_logprobs

    out = []
    for start in range(0, len(examples), 16):
        batch = pad_examples(examples[start : start + 16], pad_id)
        ours = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"]).sum(-1)
        theirs = causal_lm_token_logprobs(reference, batch["input_ids"], batch["labels"]).sum(-1)
        out.extend((ours - theirs).float().tolist())
    return out


def implicit_reward_accuracy(model, reference, tokenizer, pairs: list[dict], template=None, max_len=1024) -> dict:
    """Share of pairs whose chosen reply gets the higher DPO implicit reward, log p(y|x) - log p_ref(y|x)
    summed over the reply (beta > 0 scales every reward alike, so the ranking needs none): how well a
    policy trained by the DPO family separates held-out pairs against `reference` (say, its SFT model),
    whatever reference its own training used. margin: the mean chosen-minus-rejected difference, nats."""
    from aligner.data.chat import encode_preferences

    encoded, _ = encode_preferences(pairs, tokenizer, max_len, template=template, source="eval pairs")
    sides = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    ratios, n = log_ratios(model, reference, sides, pad_token_id(tokenizer)), len(encoded)
    diffs = [c - r for c, r in zip(ratios[:n], ratios[n:])]
    right = sum(d > 0 for d in diffs)
    return {"accuracy": right / max(n, 1), "ci95": wilson_interval(right, n), "n": n, "margin": sum(diffs) / max(n, 1)}


def win_rate(replies: list[str], reference_replies: list[str], rows, reward_model, tokenizer) -> dict:
    """Share of prompts where the reward model scores `replies` above the reference's (a tie counts half)."""
    from aligner.rewards import score_conversations

    def convs(texts):
        return [r["prompt"] + [{"role": "assistant", "content": t.strip()}] for r, t in zip(rows, texts)]

    ours = score_conversations(reward_model, tokenizer, convs(replies))
    theirs = score_conversations(reward_model, tokenizer, convs(reference_replies))
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs))
    n = len(rows)
    return {
        "win_rate": wins / n if n else 0.0, "ci95": wilson_interval(round(wins), n), "n": n,
        "score": sum(ours) / max(n, 1), "reference_score": sum(theirs) / max(n, 1),
    }  # fmt: skip


@torch.no_grad()
def kl_to_reference(model, reference, tokenizer, rows, *, max_new_tokens=160, template=None, seed=0) -> dict:
    """Mean over prompts of sum_t [log p(y_t) - log p_ref(y_t)] on one T = 1 sample y of the model per
    prompt: an unbiased estimate of the sequence KL(model || reference), with its standard error."""
    from aligner.logprobs import IGNORE_INDEX

    params = _params(tokenizer, template, max_new_tokens, temperature=1.0, seed=seed)
    outs = _engine(model, tokenizer).generate([encode_prompt(tokenizer, r["prompt"], template) for r in rows], params)
    examples = [
        {
            "input_ids": (o.prompt_ids + o.token_ids)[:-1],
            "labels": [IGNORE_INDEX] * (len(o.prompt_ids) - 1) + o.token_ids,
        }
        for o in outs
    ]
    kls = log_ratios(model, reference, examples, pad_token_id(tokenizer))
    n = len(kls)
    mean = sum(kls) / max(n, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in kls) / max(n - 1, 1))
    return {"kl": mean, "stderr": sd / math.sqrt(max(n, 1)), "n": n}


# --- specs --------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    source: str = "world:rl"  # world:<kind>, a local file, or a hub name
    split: str = "test"  # split of the source
    items: int = 500  # rows evaluated (the first N)
    seed: int = 0  # task-world seed
    format: str | None = None  # row format of a file (None = detect)
    unique: bool = False  # drop rows whose prompt repeats an earlier row's (each question counted once)
    subset: str | None = None  # a Hub dataset's config name (openai/gsm8k: main)
    columns: dict[str, str] = field(default_factory=dict)  # rename map, source column -> prompt / answer / ...


@dataclass
class SamplingSpec:
    k: int = 8  # samples per prompt for pass_at_k
    temperature: float = 1.0  # sampling temperature (pass_at_k; kl samples at 1)
    top_p: float = 1.0  # nucleus sampling for pass_at_k
    max_new_tokens: int = 160  # longest reply
    seed: int = 0  # sampler seed


@dataclass
class EvalSpec:
    name: str
    metrics: list[str]
    data: DataSpec = field(default_factory=DataSpec)
    prompt: str | None = None  # system prompt file (prompts/<name>); None = the rows' own
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    reference: str | None = None  # checkpoint for win_rate and kl
    reward_model: str | None = None  # reward-model checkpoint for win_rate (and reward_accuracy)
    samples: int = 5  # rows in the samples table
    checker: str = "correct_answer"  # answer checker (exact_match, pass_at_k): a reward function name or module:fn


METRICS = (
    "exact_match", "pass_at_k", "perplexity", "reward_accuracy", "implicit_reward_accuracy", "win_rate", "kl",
    "samples",
)  # fmt: skip
NEEDS = {"win_rate": ("reference", "reward_model"), "kl": ("reference",), "implicit_reward_accuracy": ("reference",)}


def find_spec(name_or_path: str) -> Path:
    """A spec file: a path (cwd first, then the repository root) or a name in evals/."""
    from aligner.config import resolve_path

    for candidate in (name_or_path, f"evals/{name_or_path}.yaml", f"evals/{name_or_path}"):
        p = resolve_path(candidate)
        if p.is_file():
            return p
    raise ConfigError(f"eval spec '{name_or_path}' not found (a YAML file, or a name in evals/)")


def load_spec(name_or_path: str) -> EvalSpec:
    path = find_spec(name_or_path)
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    from aligner.config import build_section

    values = values or {}
    if not isinstance(values, dict) or "metrics" not in values:
        raise ConfigError(f"{path}: an eval spec needs at least 'metrics' (and usually 'data')")
    values = {"name": path.stem, **values}
    data = build_section(DataSpec, values.pop("data", None) or {}, f"{path}: data")
    sampling = build_section(SamplingSpec, values.pop("sampling", None) or {}, f"{path}: sampling")
    spec = build_section(EvalSpec, values, str(path))
    spec.data, spec.sampling = data, sampling
    s = spec.sampling
    if s.k < 1 or s.temperature < 0 or not 0 < s.top_p <= 1 or s.max_new_tokens < 1 or spec.data.items < 1:
        raise ConfigError(
            f"{path}: sampling needs k >= 1, temperature >= 0, top_p in (0, 1], max_new_tokens >= 1 and data.items "
            f">= 1 (got k {s.k}, temperature {s.temperature}, top_p {s.top_p}, max_new_tokens {s.max_new_tokens}, "
            f"items {spec.data.items})"
        )
    bad = [m for m in spec.metrics if m not in METRICS]
    if not spec.metrics or bad:
        raise ConfigError(f"{path}: metrics: unknown metric '{bad[0] if bad else ''}' (use {', '.join(METRICS)})")
    return spec


def spec_rows(spec: EvalSpec, kind: str) -> list[dict]:
    """The spec's rows: task-world renderings by kind, or a file / hub dataset read as such."""
    from aligner.data.sources import load_rows

    d = spec.data
    rows = load_rows(d.source, d.split, n=d.items, seed=d.seed, world_kind=kind, subset=d.subset, columns=d.columns)
    if not rows:
        raise DataError(f"eval '{spec.name}': data.source '{d.source}' split '{d.split}' has no rows")
    if d.unique:
        rows = unique_rows(rows)
    if spec.prompt and kind == "rl":
        from aligner.model.tokenizer import system_prompt

        system = {"role": "system", "content": system_prompt(spec.prompt)}
        for r in rows:
            r["prompt"] = [system] + [m for m in r["prompt"] if m["role"] != "system"]
    return rows


def unique_rows(rows: list[dict]) -> list[dict]:
    """The rows whose prompt (or, without one, whose whole content) no earlier row has, in order. A task
    world's test split repeats its smallest cells' questions once a sample outgrows them (2,000 items hold
    1,884 distinct questions, 5,000 hold 4,247); greedy decoding scores a repeat exactly like its first
    occurrence, so repeats would narrow the interval without adding evidence.

    >>> [r["q"] for r in unique_rows([{"q": 1, "prompt": "a"}, {"q": 2, "prompt": "b"}, {"q": 3, "prompt": "a"}])]
    [1, 2]
    """
    seen, out = set(), []
    for r in rows:
        key = json.dumps(r.get("prompt", r), sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _prompt_rows(spec: EvalSpec, judged: bool = True) -> list[dict]:
    """The spec's prompt rows (a string prompt becomes one user turn); `judged` metrics also need an answer."""
    rows = spec_rows(spec, "rl")
    missing = [c for c in ("prompt", "answer")[: 2 if judged else 1] if c not in rows[0]]
    if missing:
        raise DataError(
            f"eval '{spec.name}': rows need {' and '.join(repr(c) for c in missing)} (columns: {', '.join(rows[0])}); "
            "map them with data.columns in the spec, e.g. columns: {question: prompt}"
        )
    for r in rows:
        if isinstance(r["prompt"], str):
            r["prompt"] = [{"role": "user", "content": r["prompt"]}]
    return rows


def run_spec(spec: EvalSpec, checkpoint: str, *, template: str | None = None, cache: dict | None = None) -> dict:
    """Every metric of `spec` on `checkpoint`: {metric: figures}. `cache` shares loaded models between specs."""
    from aligner.model.heads import is_reward_checkpoint, load_reward_model
    from aligner.model.load import load_model, load_tokenizer

    cache = {} if cache is None else cache
    for metric in spec.metrics:
        for need in NEEDS.get(metric, ()):
            if getattr(spec, need) is None:
                raise ConfigError(f"eval '{spec.name}': metric {metric} needs '{need}' (a checkpoint) in the spec")

    def model_of(path):
        if path not in cache:
            cache[path] = load_reward_model(path) if is_reward_checkpoint(path) else load_model(path).eval()
        return cache[path]

    tokenizer = load_tokenizer(checkpoint)
    s, out, replies = spec.sampling, {}, None
    for metric in spec.metrics:
        if metric == "perplexity":
            rows = spec_rows(spec, "sft")
            from aligner.data.formats import to_records

            convs = [r["messages"] for r in to_records(rows, spec.data.format, f"eval '{spec.name}'")]
            out[metric] = perplexity(model_of(checkpoint), tokenizer, convs, template)
        elif metric in ("reward_accuracy", "implicit_reward_accuracy"):
            from aligner.data.formats import to_preference_records

            pairs = to_preference_records(spec_rows(spec, "preference"), spec.data.format, f"eval '{spec.name}'")[0]
            if metric == "reward_accuracy":
                out[metric] = reward_accuracy(model_of(spec.reward_model or checkpoint), tokenizer, pairs)
            else:
                policy, reference = model_of(checkpoint), model_of(spec.reference)
                out[metric] = implicit_reward_accuracy(policy, reference, tokenizer, pairs, template)
        elif metric in ("exact_match", "samples", "win_rate"):
            judged = any(m in spec.metrics for m in ("exact_match", "samples"))
            rows = _prompt_rows(spec, judged)
            if replies is None:
                model = model_of(checkpoint)
                texts = greedy_replies(model, tokenizer, rows, template, s.max_new_tokens, progress=True)
                verdicts = judge(spec.checker, rows, texts) if judged else [False] * len(rows)
                replies = {
                    "accuracy": sum(verdicts) / len(rows), "ci95": wilson_interval(sum(verdicts), len(rows)),
                    "n": len(rows), "correct": sum(verdicts),
                    "completions": [
                        {"answer": r.get("answer"), "completion": t, "correct": ok}
                        for r, t, ok in zip(rows, texts, verdicts)
                    ],
                }  # fmt: skip
            if metric == "exact_match":  # every reply kept, for paired comparisons of two checkpoints
                out[metric] = replies
            elif metric == "samples":
                out[metric] = [
                    {"question": r["prompt"][-1]["content"], **c}
                    for r, c in zip(rows, replies["completions"][: spec.samples])
                ]
            else:
                ref = greedy_replies(
                    model_of(spec.reference), load_tokenizer(spec.reference), rows, template, s.max_new_tokens,
                    progress=True,
                )  # fmt: skip
                ours = [c["completion"] for c in replies["completions"]]
                out[metric] = win_rate(ours, ref, rows, model_of(spec.reward_model), load_tokenizer(spec.reward_model))
        elif metric == "pass_at_k":
            rows = _prompt_rows(spec)
            out[metric] = pass_at_k(
                model_of(checkpoint), tokenizer, rows, k=s.k, temperature=s.temperature, top_p=s.top_p,
                max_new_tokens=s.max_new_tokens, template=template, seed=s.seed, checker=spec.checker, progress=True,
            )  # fmt: skip
        elif metric == "kl":
            rows = _prompt_rows(spec, judged=False)
            out[metric] = kl_to_reference(
                model_of(checkpoint), model_of(spec.reference), tokenizer, rows,
                max_new_tokens=s.max_new_tokens, template=template, seed=s.seed,
            )  # fmt: skip
    return out


def summary_lines(name: str, results: dict) -> list[str]:
    """One printed line per figure of a spec's results (the samples as a small table)."""

    def interval(ci):
        return f" ({ci[0]:.3f} - {ci[1]:.3f})"

    lines = []
    for metric, r in results.items():
        if metric == "exact_match":
            lines.append(f"{name:<18}{'exact match':<18}{r['accuracy']:.3f}{interval(r['ci95'])}  n={r['n']}")
        elif metric == "pass_at_k":
            lines.append(f"{name:<18}{'pass@' + str(r['k']):<18}{r['pass_at_k']:.3f}{interval(r['ci95'])}  n={r['n']}")
            lines.append(f"{name:<18}{'maj@' + str(r['k']):<18}{r['maj_at_k']:.3f}{interval(r['maj_ci95'])}")
        elif metric == "perplexity":
            lines.append(
                f"{name:<18}{'perplexity':<18}{r['perplexity']:.3f}  ({r['tokens']} tokens, {r['n']} conversations)"
            )
        elif metric == "reward_accuracy":
            lines.append(
                f"{name:<18}{'pairwise acc.':<18}{r['accuracy']:.3f}{interval(r['ci95'])}  margin {r['margin']:.2f}"
            )
        elif metric == "implicit_reward_accuracy":
            lines.append(
                f"{name:<18}{'implicit reward':<18}{r['accuracy']:.3f}{interval(r['ci95'])}  margin {r['margin']:.2f}"
            )
        elif metric == "win_rate":
            lines.append(
                f"{name:<18}{'win rate':<18}{r['win_rate']:.3f}{interval(r['ci95'])}  "
                f"score {r['score']:.2f} vs {r['reference_score']:.2f}"
            )
        elif metric == "kl":
            lines.append(
                f"{name:<18}{'KL to reference':<18}{r['kl']:.3f} +- {1.96 * r['stderr']:.3f} nats  n={r['n']}"
            )
        elif metric == "samples":
            for row in r:
                mark = "right" if row["correct"] else "wrong"
                reply = " / ".join(row["completion"].strip().splitlines())[:100]
                lines.append(f"  [{mark}] {row['question'][:60]!r} -> {reply!r}")
    return lines


def default_output(checkpoint: str, out_dir: str | Path = "runs") -> Path:
    """Where `aligner eval` writes its JSON by default: <out_dir>/eval/<the checkpoint's name>.json, never
    inside the model's own directory (runs/sft/final -> runs/eval/sft--final.json; a Hub name
    Qwen/Qwen2.5-0.5B -> runs/eval/Qwen--Qwen2.5-0.5B.json)."""
    path = Path(checkpoint)
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    parts = [p for p in path.parts if p not in ("/", ".", "..")]
    if len(parts) > 1 and parts[0] == Path(out_dir).name:
        parts = parts[1:]
    return Path(out_dir) / "eval" / ("--".join(parts) + ".json")


def evaluate(
    checkpoint: str, specs: list[EvalSpec], template: str | None = None, out: str | Path | None = None
) -> dict:
    """Run `specs` on `checkpoint`, print the table, write JSON to `out` (default: `default_output`)."""
    path = Path(out) if out else default_output(checkpoint)
    cache: dict = {}
    results = {}
    for spec in specs:
        print(f"eval {spec.name}: {', '.join(spec.metrics)} on {spec.data.source} {spec.data.split}", flush=True)
        results[spec.name] = run_spec(spec, checkpoint, template=template, cache=cache)
    print(f"{'eval':<18}{'metric':<18}value (95% interval)")
    for name, r in results.items():
        for line in summary_lines(name, r):
            print(line)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": str(checkpoint), "results": results}, indent=1))
    print(f"written: {path}")
    return results
