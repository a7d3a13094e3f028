"""Metrics: metrics.jsonl always; TensorBoard and wandb when the recipe asks; a progress bar; plots.

Metric names are namespaced (`train/loss`, `eval/loss`, `dpo/margin`). Only the main process writes.
`aligner.tracking` imports tensorboard, wandb and matplotlib lazily, with an install hint if missing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from aligner.errors import ConfigError


class Tracker:
    """Writes one JSON object per logged step to <run_dir>/metrics.jsonl, plus optional backends."""

    def __init__(self, run_dir: Path, trackers: list[str], enabled: bool = True, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if "tensorboard" in trackers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                hint = "train.trackers has tensorboard but it is not installed: pip install tensorboard"
                raise ConfigError(hint) from None
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if "wandb" in trackers:
            try:
                import wandb
            except ImportError:
                raise ConfigError("train.trackers has wandb but it is not installed: pip install wandb") from None
            self._wandb = wandb.init(project="aligner", name=Path(run_dir).name, config=config, dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (a resumed run re-logs the steps it repeats), and a last line cut off
        by a crash while it was written (with a notice)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [row for row in read_metrics(self.path.parent, notice=True) if row["step"] <= step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return v


def read_metrics(run_dir: Path, notice: bool = False) -> list[dict]:
    """The rows of <run_dir>/metrics.jsonl. A last line that is not whole JSON (the run was killed while
    writing it) is left out, with a line on stderr when `notice`; a damaged line elsewhere is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ConfigError(f"{path} line {i + 1} is not JSON; the run's metrics are damaged") from None
            if notice:
                print(
                    f"{path}: its last line was cut off (the run stopped while writing it); dropped", file=sys.stderr
                )
    return rows


class Progress:
    """A tqdm bar over optimizer steps showing loss and tokens/s (ETA comes from tqdm), or over the items
    of any other long phase (`unit`): encoding, reference log-probs, sampling, evaluation."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, unit: str = "step", every: float = 30.0):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # In a log file (no terminal) a line of its own every `every` s instead of redrawing one line.
            tty = sys.stderr.isatty()
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                file=sys.stderr if tty else _Lines(sys.stderr),
                dynamic_ncols=True,
                mininterval=0.1 if tty else every,
            )

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(n)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def main_process() -> bool:
    """Whether this is the main process of a launch (or the only one): the one that prints progress."""
    return os.environ.get("RANK", "0") == "0"


def phase(items: Sequence, desc: str, unit: str = "row", min_items: int = 100) -> Iterator:
    """`items`, iterated under a progress bar on stderr: a long phase before or between training steps
    (encoding data, reference log-probs, sampling) shows its count and rate at once and then at least every
    4 s, also in a log file. Only the main process draws it, and only for `min_items` items or more."""
    bar = Progress(len(items), 0, main_process() and len(items) >= min_items, desc, unit=unit, every=4.0)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()


def tqdm_write(text: str) -> None:
    """A line on stderr that does not break a progress bar being drawn there."""
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


class _Lines:
    """A stream for tqdm that ends each redraw of the bar with a newline (for log files)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:  # not the blanks tqdm writes to clear the line
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3g}"
    return str(v)


def plot_metrics(run_dir: Path, keys: tuple[str, ...] = ("train/loss", "eval/loss", "train/lr")) -> Path | None:
    """Write <run_dir>/metrics.png with one panel per metric present; None if matplotlib is missing."""
    rows = read_metrics(run_dir)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.5 * len(present), 3.2), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
