"""The metric functions `aligner eval` runs (aligner.evaluate.specs) and trainers call directly:
exact_match, pass_at_k, perplexity, reward_accuracy, implicit_reward_accuracy, win_rate, kl_to_reference,
on a model and its tokenizer, each returning its figures with 95% intervals."""

from __future__ import annotations

import math
from collections import Counter

import torch

from aligner.data.chat import encode_conversation, encode_prompt, pad_token_id, reply_stop_ids
from aligner.errors import DataError
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
