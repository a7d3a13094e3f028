"""`aligner report RUN_DIR...`: PNG plots of the runs' curves and a markdown summary.

    aligner report runs/sft runs/dpo runs/grpo runs/ppo          # -> runs/report/
    aligner report runs/grpo --out reports/grpo

Each run directory's metrics.jsonl gives the curves, one line per run in each plot (CURVES: loss,
learning rate, reward, KL); accuracy.png compares the runs' held-out exact match (accuracy.json,
written at the end of SFT / DPO / GRPO / PPO) with its 95% interval. report.md holds a table per run
(stage, steps, wall time, last losses, held-out accuracy) and links the plots. `write_report` returns
what each plot shows ({file: {line label: (steps, values)}}, read back from the axes), so callers and
tests can check the figures against the metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligner import sections  # noqa: F401  (registers the algorithms)
from aligner.errors import ConfigError
from aligner.registry import ALGORITHMS
from aligner.tracking import read_metrics

# plot file -> (title, y label, metric keys drawn when a run has them)
CURVES = {
    "loss.png": ("loss", "loss", ("train/loss", "eval/loss")),
    "lr.png": ("learning rate", "lr", ("train/lr",)),
    "reward.png": (
        "reward",
        "mean reward",
        ("rollout/reward_mean", "rollout/score_mean", "eval/reward_mean", "eval/score"),
    ),
    "kl.png": ("KL to the reference", "nats", ("kl/mean", "grpo/kl", "eval/kl")),
}


def stage_of(rows: list[dict], run_dir: Path) -> str:
    """The command that wrote the run, from its metric names: each algorithm logs its loss's terms as
    "<section>/..." (pretrain and SFT share theirs: told apart by accuracy.json)."""
    keys = {k.split("/")[0] for r in rows for k in r}
    for algorithm in ALGORITHMS.values():
        if algorithm.section != "sft" and algorithm.section in keys:
            return algorithm.name
    return "sft" if (run_dir / "accuracy.json").is_file() else "pretrain"


def run_summary(run_dir: Path) -> dict:
    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"aligner report: {run_dir} has no metrics.jsonl (is it a run directory?)")
    summary = {"run": run_dir.name, "dir": str(run_dir), "stage": stage_of(rows, run_dir), "steps": rows[-1]["step"]}
    times = [r["time"] for r in rows if "time" in r]
    first_step = next((r.get("train/step_time", 0.0) for r in rows), 0.0)
    summary["wall_s"] = (times[-1] - times[0] + first_step) if times else None
    for key in ("train/loss", "eval/loss"):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        summary[key] = values[-1] if values else None
    acc = run_dir / "accuracy.json"
    summary["accuracy"] = json.loads(acc.read_text()) if acc.is_file() else None
    return summary


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("aligner report needs matplotlib: pip install matplotlib") from None
    return plt


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Plots and report.md for `run_dirs` in `out_dir`; returns {png file: {label: (steps, values)}}."""
    plt = _plt()
    runs = [Path(d) for d in run_dirs]
    summaries = [run_summary(d) for d in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown: dict[str, dict] = {}
    for name, (title, ylabel, keys) in CURVES.items():
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        for run in runs:
            rows = read_metrics(run)
            for key in keys:
                pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), label=f"{run.name} {key}", marker="." if len(pts) < 40 else None)
        if not ax.get_lines():
            plt.close(fig)
            continue
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        shown[name] = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        plt.close(fig)
    scored = [s for s in summaries if s["accuracy"]]
    if scored:
        fig, ax = plt.subplots(figsize=(6.4, 3.8))
        names = [s["run"] for s in scored]
        acc = [s["accuracy"]["accuracy"] for s in scored]
        err = [
            [a - s["accuracy"]["ci95"][0] for a, s in zip(acc, scored)],
            [s["accuracy"]["ci95"][1] - a for a, s in zip(acc, scored)],
        ]
        bars = ax.bar(names, acc, yerr=err, capsize=4, color="#4c72b0")
        ax.set(title="held-out exact match (95% interval)", ylabel="accuracy", ylim=(0, 1))
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "accuracy.png", dpi=100)
        shown["accuracy.png"] = {"accuracy": (names, [b.get_height() for b in bars])}
        plt.close(fig)
    (out / "report.md").write_text(markdown(summaries, shown))
    return shown


def markdown(summaries: list[dict], shown: dict) -> str:
    def fmt(x, spec=".4f"):
        return "-" if x is None else format(x, spec)

    lines = [
        "# Run report",
        "",
        "| run | stage | steps | wall time | last train loss | last eval loss | held-out accuracy (95% interval) |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for s in summaries:
        acc = s["accuracy"]
        acc_text = f"{acc['accuracy']:.3f} ({acc['ci95'][0]:.3f} - {acc['ci95'][1]:.3f}, n={acc['n']})" if acc else "-"
        wall = "-" if s["wall_s"] is None else f"{s['wall_s'] / 60:.1f} min"
        losses = f"{fmt(s['train/loss'])} | {fmt(s['eval/loss'])}"
        lines.append(f"| {s['run']} | {s['stage']} | {s['steps']} | {wall} | {losses} | {acc_text} |")
    lines += [""] + [f"![{name[:-4]}]({name})" for name in shown] + [""]
    lines += [f"Runs: {', '.join(s['dir'] for s in summaries)}", ""]
    return "\n".join(lines)
