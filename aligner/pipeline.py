"""`aligner pipeline recipes/pipeline.yaml`: pretrain -> SFT -> reward model -> DPO, PPO and GRPO (each
from the SFT model) -> eval, then one comparison table and a report.

    aligner pipeline recipes/pipeline.yaml             # `make demo`: the embedded task world end to end
    aligner pipeline recipes/pipeline.yaml --redo sft  # rerun SFT and every stage after it
    aligner pipeline recipes/pipeline.yaml --redo all

A stage whose run directory already has a final checkpoint is skipped (its outputs are reused) unless
asked to redo it; redoing a stage redoes the stages that start from it. Each stage is the stage's own
command on its recipe, with the recipe's flags from the pipeline file applied and the chain wired in:
the stage's run directory (<out_dir>/<prefix><stage>), `model.init_from` (SFT from pretrain, the others
from SFT) and PPO's reward model. The eval step scores every policy the same way on the same held-out
items: exact match with its 95% interval (written to the run's accuracy.json), the reward model's mean
score of the greedy replies, and the KL to the SFT model on the policy's own samples; the table sets
each policy's difference from SFT against SFT's interval and against the paired interval of the
difference (per-item results in <run dir>/pipeline_eval.json).

Every stage, and each policy's eval, is a job that waits for the jobs it needs. With `parallel: N`
up to N jobs run side by side, each in a process of its own with its output in
<out_dir>/<prefix>logs/<job>.log and an equal share of the CPU threads (all of them for a job that
starts alone, as pretraining and SFT do); DPO, PPO and GRPO (and the evals) are
independent of one another once SFT and the reward model are done. Of the jobs ready to start, the
stage listed first in the pipeline file starts first (`start_order`), the evals after every stage.
On a CPU, small models use a second core poorly (a decode step of the task world's model runs ~1.3x
faster on two cores than on one, a training step ~1.7x), so two one-core processes get more done than
one two-core process.
With `parallel: 1` (the default) the jobs run one after another in this process.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import multiprocessing.connection
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aligner.config import ALGORITHMS  # every registered algorithm is a stage, in registration order
from aligner.errors import AlignerError, ConfigError


def stages() -> list[str]:
    return list(ALGORITHMS)


def policies() -> list[str]:
    """The stages whose models the eval step scores (not the base model or the reward model)."""
    return [name for name, alg in ALGORITHMS.items() if alg.policy]


@dataclass
class StageConfig:
    recipe: str  # the stage's recipe file
    flags: dict = field(default_factory=dict, metadata={"internal": True})  # recipe overrides: {train.max_steps: 100}
    enabled: bool = True  # false = leave the stage out (and the stages that need it)


@dataclass
class EvalConfig:
    items: int = 500  # held-out test items for exact match and the reward-model score
    unique: bool = False  # score each distinct question of those items once (a repeat adds no evidence)
    kl_items: int = 200  # prompts for the KL to the SFT model
    max_new_tokens: int = 160  # longest reply
    seed: int = 0  # task-world seed of the items


@dataclass
class PipelineConfig:
    out_dir: str = "runs"  # parent of every stage's run directory
    prefix: str = ""  # run names are <prefix><stage>
    parallel: int = 1  # jobs side by side, each in its own process (an equal share of the threads; alone, all)
    stages: dict = field(default_factory=dict, metadata={"internal": True})  # stage -> StageConfig
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"internal": True})
    path: str = field(default="pipeline", metadata={"internal": True})

    def run_dir(self, stage: str) -> Path:
        return Path(self.out_dir) / f"{self.prefix}{stage}"


def load_pipeline(path: str | Path) -> PipelineConfig:
    """The pipeline file, strictly: unknown stages or keys and wrong types are one-line errors."""
    from aligner.config import build_section, read_yaml, resolve_path

    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(f"pipeline file '{path}' not found")
    values = read_yaml(p, "pipeline file") or {}
    values = dict(values) if isinstance(values, dict) else {"stages": values}
    entries = values.pop("stages", None)
    if not isinstance(entries, dict) or not entries:
        raise ConfigError(f"{p}: 'stages' must map stage names ({', '.join(stages())}) to {{recipe: FILE}}")
    built = {}
    for name, stage in entries.items():
        if name not in ALGORITHMS:
            raise ConfigError(f"{p}: unknown stage '{name}' (use {', '.join(stages())})")
        if not isinstance(stage, dict) or "recipe" not in stage:
            raise ConfigError(f"{p}: stages.{name} needs a 'recipe' file")
        stage = dict(stage)
        flags = stage.pop("flags", None) or {}
        if not isinstance(flags, dict):
            raise ConfigError(f"{p}: stages.{name}.flags must map recipe keys to values, got {flags!r}")
        built[name] = build_section(StageConfig, stage, f"{p}: stages.{name}")
        built[name].flags = flags
    evals = build_section(EvalConfig, values.pop("eval", None) or {}, f"{p}: eval")
    cfg = build_section(PipelineConfig, values, str(p))
    cfg.stages, cfg.eval, cfg.path = built, evals, str(p)
    if cfg.parallel < 1:
        raise ConfigError(f"{p}: parallel must be 1 or more (got {cfg.parallel})")
    for name in built:
        for need in needs_of(name):
            if need not in built:
                raise ConfigError(f"{p}: stage '{name}' needs stage '{need}' (add it, or drop '{name}')")
    return cfg


def downstream(stages: set[str]) -> set[str]:
    """`stages` and every stage that starts from or needs one of them."""
    out = set(stages)
    while True:
        more = {s for s in ALGORITHMS if set(needs_of(s)) & out and s not in out}
        if not more:
            return out
        out |= more


def start_order(stages: list[str]) -> list[str]:
    """`stages` in the order their jobs are queued: each after the stages it needs, otherwise in the
    pipeline file's order (so with `parallel` > 1, of the jobs ready to start, the one listed first
    starts first: list a long stage before short ones and they share the cores better).

    >>> start_order(["grpo", "pretrain", "sft", "ppo", "rm"])
    ['pretrain', 'sft', 'grpo', 'rm', 'ppo']
    """
    order, left = [], list(stages)
    while left:
        stage = next(s for s in left if all(n in order or n not in stages for n in needs_of(s)))
        order.append(stage)
        left.remove(stage)
    return order


def needs_of(stage: str) -> list[str]:
    """The stages `stage` needs: the one it starts from, and any others (PPO's reward model)."""
    alg = ALGORITHMS[stage]
    return list(dict.fromkeys(n for n in (alg.starts_from, *alg.wires.values()) if n))


def is_done(run_dir: Path) -> bool:
    final = run_dir / "final"
    return (final / "config.json").is_file() or (final / "adapter_config.json").is_file()


def stage_recipe(cfg: PipelineConfig, stage: str, redo: bool):
    """The stage's recipe with the pipeline's flags and the chain (run dir, start model, reward model)."""
    from aligner.config import load_recipe

    overrides = dict(cfg.stages[stage].flags)
    overrides.update({"train.out_dir": cfg.out_dir, "train.name": f"{cfg.prefix}{stage}", "train.overwrite": redo})
    alg = ALGORITHMS[stage]
    if alg.starts_from:
        overrides["model.init_from"] = str(cfg.run_dir(alg.starts_from) / "final")
    for key, source in alg.wires.items():  # PPO's reward model, say
        overrides[key] = str(cfg.run_dir(source) / "final")
    if alg.policy and "accuracy_items" in {f.name for f in dataclasses.fields(alg.config)}:
        overrides[f"{alg.section}.accuracy_items"] = 0  # the eval step scores every policy alike
    try:
        return load_recipe(cfg.stages[stage].recipe, overrides, command=stage)
    except ConfigError as e:
        raise ConfigError(f"{cfg.path}: stage {stage}: {e}") from None


def run_stage(stage: str, recipe) -> None:
    ALGORITHMS[stage].command()(recipe)


def evaluate_policy(cfg: PipelineConfig, stage: str) -> dict:
    """One policy's row: exact match (also written to the run's accuracy.json), the reward model's mean
    score of its greedy replies and its KL to the SFT model; also written to <run dir>/pipeline_eval.json."""
    import torch

    from aligner.data.world import world_rows
    from aligner.evaluate import exact_match, kl_to_reference, unique_rows
    from aligner.model.heads import load_reward_model
    from aligner.model.load import load_model, load_tokenizer
    from aligner.rewards import score_conversations

    e = cfg.eval
    rows = world_rows("rl", "test", n=e.items, seed=e.seed)
    if e.unique:
        rows = unique_rows(rows)
    ckpt = cfg.run_dir(stage) / "final"
    model, tok = load_model(ckpt).eval(), load_tokenizer(ckpt)
    acc = exact_match(model, tok, rows, max_new_tokens=e.max_new_tokens)
    summary = {k: v for k, v in acc.items() if k != "completions"} | {"split": "test"}
    (cfg.run_dir(stage) / "accuracy.json").write_text(json.dumps(summary, indent=1))
    row = {"stage": stage, "accuracy": acc["accuracy"], "ci95": acc["ci95"], "n": acc["n"]}
    row["correct"] = [bool(c["correct"]) for c in acc["completions"]]  # per item, for paired comparisons
    if "rm" in cfg.stages and is_done(cfg.run_dir("rm")):
        reward_model = load_reward_model(cfg.run_dir("rm") / "final")
        convs = [
            r["prompt"] + [{"role": "assistant", "content": c["completion"].strip()}]
            for r, c in zip(rows, acc["completions"])
        ]
        with torch.no_grad():
            scores = score_conversations(reward_model, tok, convs)
        row["rm_score"] = sum(scores) / len(scores)
    row["kl"] = 0.0
    if stage != "sft":
        sft_model = load_model(cfg.run_dir("sft") / "final").eval()
        row["kl"] = kl_to_reference(model, sft_model, tok, rows[: e.kl_items], max_new_tokens=e.max_new_tokens)["kl"]
    (cfg.run_dir(stage) / "pipeline_eval.json").write_text(json.dumps(row, indent=1))
    return row


# --- jobs -------------------------------------------------------------------------------------------


@dataclass
class Job:
    name: str  # a stage, or "eval <policy>"
    needs: list[str]  # jobs that must have finished first
    stage: str
    recipe: object = None  # the stage's recipe (None for an eval)


def run_job(cfg: PipelineConfig, job: Job) -> None:
    if job.recipe is not None:
        run_stage(job.stage, job.recipe)
    else:
        evaluate_policy(cfg, job.stage)


def _job_process(cfg: PipelineConfig, job: Job, threads: int, log: str) -> None:
    """A job in a process of its own: `threads` CPU threads, stdout and stderr to `log`."""
    import torch

    torch.set_num_threads(threads)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    from aligner.trainers.base import TrainingError

    try:
        run_job(cfg, job)
    except AlignerError as e:  # the exit codes of `aligner <command>`: 1 for a run that cannot go on, else 2
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, TrainingError) else 2)


def run_jobs(cfg: PipelineConfig, jobs: list[Job]) -> dict[str, float]:
    """Run `jobs` (in an order where every job comes after those it needs); returns each one's wall time."""
    walls: dict[str, float] = {}
    if cfg.parallel == 1:
        for job in jobs:
            print(
                f"pipeline: {job.name}"
                + (f": {cfg.stages[job.stage].recipe} -> {cfg.run_dir(job.stage)}" if job.recipe else "")
            )
            start = time.perf_counter()
            run_job(cfg, job)
            walls[job.name] = time.perf_counter() - start
        return walls
    import torch

    cores = torch.get_num_threads()
    logs = Path(cfg.out_dir) / f"{cfg.prefix}logs"
    logs.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    pending, running, done, failed = list(jobs), {}, set(), None
    try:
        while pending or running:
            while failed is None and len(running) < cfg.parallel:
                ready = [j for j in pending if all(n in done for n in j.needs)]
                if not ready:
                    break
                job = ready[0]
                pending.remove(job)
                # a job that runs alone (pretraining, SFT) gets every core; side by side, an equal share
                threads = max(1, cores // min(cfg.parallel, len(running) + len(ready)))
                log = logs / f"{job.name.replace(' ', '_')}.log"
                proc = ctx.Process(target=_job_process, args=(cfg, job, threads, str(log)), name=job.name)
                proc.start()
                running[job.name] = (proc, time.perf_counter(), log)
                print(f"pipeline: {job.name}: started ({threads} thread{'s' * (threads > 1)}, output in {log})")
            if not running:
                break
            multiprocessing.connection.wait([proc.sentinel for proc, _, _ in running.values()])
            for name, (proc, start, log) in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[name]
                walls[name] = time.perf_counter() - start
                if proc.exitcode == 0:
                    done.add(name)
                    print(f"pipeline: {name}: done in {walls[name] / 60:.1f} min")
                elif failed is None:
                    failed = (name, proc.exitcode, log)
    finally:
        for proc, _, _ in running.values():
            proc.terminate()
    if failed:
        from aligner.trainers.base import TrainingError

        name, code, log = failed
        lines = Path(log).read_text(errors="replace").strip().splitlines()
        error = ConfigError if code == 2 else TrainingError  # the exit codes of `aligner <command>`
        raise error(f"pipeline: {name} failed: {lines[-1] if lines else f'exit code {code}'} (output in {log})")
    return walls


def table(rows: list[dict], walls: dict) -> str:
    """The comparison table (markdown). Against SFT each policy's accuracy difference is set against
    SFT's own 95% interval, and against the paired 95% interval of the difference (the same items)."""
    from aligner.stats import paired_difference

    sft = next((r for r in rows if r["stage"] == "sft"), None)
    lines = [
        "| stage | held-out accuracy | 95% interval | vs SFT (SFT's interval) | vs SFT (paired interval) "
        "| reward-model score | KL to SFT (nats) | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def verdict(diff: float, half: float) -> str:
        where = "above" if diff > half else "below" if diff < -half else "within"
        return f"{diff:+.3f} ({where} +-{half:.3f})"

    for r in rows:
        lo, hi = r["ci95"]
        vs_sft = paired = "-"
        if sft is not None and r["stage"] != "sft":
            vs_sft = verdict(r["accuracy"] - sft["accuracy"], (sft["ci95"][1] - sft["ci95"][0]) / 2)
            if "correct" in r and "correct" in sft and len(r["correct"]) == len(sft["correct"]):
                paired = verdict(*paired_difference(sft["correct"], r["correct"]))
        score = f"{r['rm_score']:.2f}" if "rm_score" in r else "-"
        wall = f"{walls[r['stage']] / 60:.1f} min" if walls.get(r["stage"]) else "-"
        cells = [r["stage"], f"{r['accuracy']:.3f}", f"{lo:.3f} - {hi:.3f}", vs_sft, paired, score, f"{r['kl']:.3f}"]
        cells.append(wall)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipeline(path: str | Path, redo: list[str] | None = None) -> dict:
    """Run (or reuse) every stage, evaluate the policies, print the table, write the report."""
    from aligner.report import run_summary, write_report

    cfg = load_pipeline(path)
    redo = list(redo or [])
    unknown = [s for s in redo if s != "all" and s not in ALGORITHMS]
    if unknown:
        raise ConfigError(f"--redo: unknown stage '{unknown[0]}' (use all or {', '.join(stages())})")
    asked = set(cfg.stages) if "all" in redo else downstream(set(redo))
    active = start_order([s for s in cfg.stages if cfg.stages[s].enabled])
    for s in active:
        for need in needs_of(s):
            if need not in active:
                raise ConfigError(f"{cfg.path}: stage '{s}' is enabled but stage '{need}' it needs is not")
    jobs, walls = [], {}
    for stage in active:
        run_dir = cfg.run_dir(stage)
        if is_done(run_dir) and stage not in asked:
            print(f"pipeline: {stage}: {run_dir}/final exists, reused (--redo {stage} to rerun)")
            walls[stage] = run_summary(run_dir)["wall_s"] or 0.0  # the time its run took
            continue
        recipe = stage_recipe(cfg, stage, redo=stage in asked or run_dir.exists())  # every recipe checked first
        jobs.append(Job(stage, [n for n in needs_of(stage) if n not in walls], stage, recipe))
    scored = [s for s in policies() if s in active]
    for stage in scored:
        needs = [n for n in (stage, "sft", "rm") if n in active and n not in walls]
        jobs.append(Job(f"eval {stage}", list(dict.fromkeys(needs)), stage))
    print(
        f"pipeline: {len(jobs) - len(scored)} stage(s) to run, then "
        + ("the distinct questions of " if cfg.eval.unique else "")
        + f"{cfg.eval.items} held-out items per policy"
        + (f"; {cfg.parallel} jobs at a time" if cfg.parallel > 1 else "")
    )
    start = time.perf_counter()
    times = run_jobs(cfg, jobs)
    walls.update({k: v for k, v in times.items() if k in ALGORITHMS})
    rows = [json.loads((cfg.run_dir(s) / "pipeline_eval.json").read_text()) for s in scored]
    text = table(rows, walls)
    print(text)
    print(f"pipeline: {(time.perf_counter() - start) / 60:.1f} min")
    report_dir = Path(cfg.out_dir) / f"{cfg.prefix}report"
    write_report([cfg.run_dir(s) for s in ALGORITHMS if s in active], report_dir)
    md = report_dir / "report.md"
    evals = sum(v for k, v in times.items() if k.startswith("eval "))
    md.write_text(f"# Pipeline: {cfg.path}\n\n{text}\n\nEval: {evals:.0f} s in all.\n\n" + md.read_text())
    print(f"pipeline: report {md}")
    return {"rows": rows, "walls": walls, "report": str(md)}
