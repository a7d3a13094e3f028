"""Eval specs (evals/*.yaml) and the table of metrics they name: what each metric needs, how it runs on a
checkpoint and how its figures print. `aligner eval` loads specs (`load_spec`) and runs them (`evaluate`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aligner.errors import ConfigError, DataError
from aligner.evaluate.metrics import (
    greedy_replies,
    implicit_reward_accuracy,
    judge,
    kl_to_reference,
    pass_at_k,
    perplexity,
    reward_accuracy,
    wilson_interval,
    win_rate,
)

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
    from aligner.config import build_section, read_yaml

    values = read_yaml(path, "eval spec")

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


# --- the metrics ----------------------------------------------------------------------------------------


class SpecRun:
    """One spec on one checkpoint: its tokenizer, the models it loads (shared through `cache`) and the greedy
    replies that exact_match, samples and win_rate share."""

    def __init__(self, spec: EvalSpec, checkpoint: str, template: str | None, cache: dict):
        from aligner.model.load import load_tokenizer

        self.spec, self.checkpoint, self.template, self.cache = spec, checkpoint, template, cache
        self.tokenizer = load_tokenizer(checkpoint)
        self._replies: dict | None = None

    def model(self, path: str | None = None):
        from aligner.model.heads import is_reward_checkpoint, load_reward_model
        from aligner.model.load import load_model

        path = path or self.checkpoint
        if path not in self.cache:
            self.cache[path] = load_reward_model(path) if is_reward_checkpoint(path) else load_model(path).eval()
        return self.cache[path]

    def replies(self) -> dict:
        """The checkpoint's greedy reply to every prompt row, judged when a judged metric is asked for."""
        if self._replies is None:
            spec = self.spec
            judged = any(m in spec.metrics for m in ("exact_match", "samples"))
            rows = _prompt_rows(spec, judged)
            texts = greedy_replies(
                self.model(), self.tokenizer, rows, self.template, spec.sampling.max_new_tokens, progress=True
            )
            verdicts = judge(spec.checker, rows, texts) if judged else [False] * len(rows)
            self._replies = {
                "accuracy": sum(verdicts) / len(rows), "ci95": wilson_interval(sum(verdicts), len(rows)),
                "n": len(rows), "correct": sum(verdicts), "rows": rows,
                "completions": [
                    {"answer": r.get("answer"), "completion": t, "correct": ok}
                    for r, t, ok in zip(rows, texts, verdicts)
                ],
            }  # fmt: skip
        return self._replies

    def pairs(self) -> list[dict]:
        from aligner.data.preferences import to_preference_records

        rows = spec_rows(self.spec, "preference")
        return to_preference_records(rows, self.spec.data.format, f"eval '{self.spec.name}'")[0]


def _perplexity(run: SpecRun) -> dict:
    from aligner.data.formats import to_records

    spec = run.spec
    convs = [r["messages"] for r in to_records(spec_rows(spec, "sft"), spec.data.format, f"eval '{spec.name}'")]
    return perplexity(run.model(), run.tokenizer, convs, run.template)


def _exact_match(run: SpecRun) -> dict:  # every reply kept, for paired comparisons of two checkpoints
    return {k: v for k, v in run.replies().items() if k != "rows"}


def _samples(run: SpecRun) -> list[dict]:
    r = run.replies()
    return [
        {"question": row["prompt"][-1]["content"], **c}
        for row, c in zip(r["rows"], r["completions"][: run.spec.samples])
    ]


def _win_rate(run: SpecRun) -> dict:
    from aligner.model.load import load_tokenizer

    spec, r = run.spec, run.replies()
    theirs = greedy_replies(
        run.model(spec.reference), load_tokenizer(spec.reference), r["rows"], run.template,
        spec.sampling.max_new_tokens, progress=True,
    )  # fmt: skip
    ours = [c["completion"] for c in r["completions"]]
    return win_rate(ours, theirs, r["rows"], run.model(spec.reward_model), load_tokenizer(spec.reward_model))


def _pass_at_k(run: SpecRun) -> dict:
    spec, s = run.spec, run.spec.sampling
    return pass_at_k(
        run.model(), run.tokenizer, _prompt_rows(spec), k=s.k, temperature=s.temperature, top_p=s.top_p,
        max_new_tokens=s.max_new_tokens, template=run.template, seed=s.seed, checker=spec.checker, progress=True,
    )  # fmt: skip


def _kl(run: SpecRun) -> dict:
    spec, s = run.spec, run.spec.sampling
    return kl_to_reference(
        run.model(), run.model(spec.reference), run.tokenizer, _prompt_rows(spec, judged=False),
        max_new_tokens=s.max_new_tokens, template=run.template, seed=s.seed,
    )  # fmt: skip


def _interval(ci) -> str:
    return f" ({ci[0]:.3f} - {ci[1]:.3f})"


def _sample_lines(name: str, rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        reply = " / ".join(row["completion"].strip().splitlines())[:100]
        out.append(f"  [{'right' if row['correct'] else 'wrong'}] {row['question'][:60]!r} -> {reply!r}")
    return out


@dataclass(frozen=True)
class Metric:
    run: Callable[[SpecRun], object]  # its figures for the spec's checkpoint
    lines: Callable[[str, object], list[str]]  # their printed lines, given the spec's name
    needs: tuple[str, ...] = ()  # spec fields (checkpoints) it cannot run without


METRICS: dict[str, Metric] = {
    "exact_match": Metric(_exact_match, lambda n, r: [
        f"{n:<18}{'exact match':<18}{r['accuracy']:.3f}{_interval(r['ci95'])}  n={r['n']}"]),
    "pass_at_k": Metric(_pass_at_k, lambda n, r: [
        f"{n:<18}{'pass@' + str(r['k']):<18}{r['pass_at_k']:.3f}{_interval(r['ci95'])}  n={r['n']}",
        f"{n:<18}{'maj@' + str(r['k']):<18}{r['maj_at_k']:.3f}{_interval(r['maj_ci95'])}"]),
    "perplexity": Metric(_perplexity, lambda n, r: [
        f"{n:<18}{'perplexity':<18}{r['perplexity']:.3f}  ({r['tokens']} tokens, {r['n']} conversations)"]),
    "reward_accuracy": Metric(
        lambda run: reward_accuracy(run.model(run.spec.reward_model), run.tokenizer, run.pairs()),
        lambda n, r: [
            f"{n:<18}{'pairwise acc.':<18}{r['accuracy']:.3f}{_interval(r['ci95'])}  margin {r['margin']:.2f}"]),
    "implicit_reward_accuracy": Metric(
        lambda run: implicit_reward_accuracy(
            run.model(), run.model(run.spec.reference), run.tokenizer, run.pairs(), run.template),
        lambda n, r: [
            f"{n:<18}{'implicit reward':<18}{r['accuracy']:.3f}{_interval(r['ci95'])}  margin {r['margin']:.2f}"],
        needs=("reference",)),
    "win_rate": Metric(_win_rate, lambda n, r: [
        f"{n:<18}{'win rate':<18}{r['win_rate']:.3f}{_interval(r['ci95'])}  "
        f"score {r['score']:.2f} vs {r['reference_score']:.2f}"], needs=("reference", "reward_model")),
    "kl": Metric(_kl, lambda n, r: [
        f"{n:<18}{'KL to reference':<18}{r['kl']:.3f} +- {1.96 * r['stderr']:.3f} nats  n={r['n']}"],
        needs=("reference",)),
    "samples": Metric(_samples, _sample_lines),
}  # fmt: skip


def run_spec(spec: EvalSpec, checkpoint: str, *, template: str | None = None, cache: dict | None = None) -> dict:
    """Every metric of `spec` on `checkpoint`: {metric: figures}. `cache` shares loaded models between specs."""
    for metric in spec.metrics:
        for need in METRICS[metric].needs:
            if getattr(spec, need) is None:
                raise ConfigError(f"eval '{spec.name}': metric {metric} needs '{need}' (a checkpoint) in the spec")
    run = SpecRun(spec, checkpoint, template, {} if cache is None else cache)
    return {metric: METRICS[metric].run(run) for metric in spec.metrics}


def summary_lines(name: str, results: dict) -> list[str]:
    """One printed line per figure of a spec's results (the samples as a small table)."""
    return [line for metric, r in results.items() for line in METRICS[metric].lines(name, r)]


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
