"""`aligner report`: the PNGs open and their axes hold the runs' metrics; report.md tabulates the runs."""

from __future__ import annotations

import json

import pytest

from aligner.cli import main
from aligner.report import write_report


def fake_run(root, name, rows, accuracy=None):
    run = root / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if accuracy is not None:
        (run / "accuracy.json").write_text(
            json.dumps({"accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05], "n": 500})
        )
    return run


@pytest.fixture
def runs(tmp_path):
    sft_rows = [
        {"step": s, "time": 100.0 + s, "train/loss": 2.0 / s, "train/lr": 1e-3, "train/step_time": 1.0}
        for s in range(1, 6)
    ]
    sft = fake_run(tmp_path, "sft", sft_rows + [{"step": 5, "eval/loss": 0.9}], accuracy=0.5)
    grpo_rows = [
        {
            "step": s,
            "time": 200.0 + 2 * s,
            "train/loss": 0.01 * s,
            "train/lr": 1e-4,
            "rollout/reward_mean": 0.4 + 0.05 * s,
        }
        | {"grpo/clip_ratio": 0.0, "grpo/kl": 0.02 * s}
        for s in range(1, 5)
    ]
    grpo = fake_run(tmp_path, "grpo", grpo_rows, accuracy=0.56)
    return [sft, grpo]


def test_plots_hold_the_metrics_and_open(runs, tmp_path):
    import matplotlib.image

    shown = write_report(runs, tmp_path / "report")
    assert set(shown) == {"loss.png", "lr.png", "reward.png", "kl.png", "accuracy.png"}
    loss = shown["loss.png"]
    assert loss["sft train/loss"] == ([1, 2, 3, 4, 5], [2.0, 1.0, 2.0 / 3, 0.5, 0.4])
    assert loss["sft eval/loss"] == ([5], [0.9])
    assert shown["reward.png"]["grpo rollout/reward_mean"][1] == pytest.approx([0.45, 0.5, 0.55, 0.6])
    assert shown["kl.png"]["grpo grpo/kl"][1] == pytest.approx([0.02, 0.04, 0.06, 0.08])
    assert shown["accuracy.png"]["accuracy"] == (["sft", "grpo"], [0.5, 0.56])
    for name in shown:
        image = matplotlib.image.imread(tmp_path / "report" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


def test_command_writes_the_markdown_summary(runs, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| sft | sft | 5 |" in md and "| grpo | grpo | 4 |" in md
    assert "0.560 (0.510 - 0.610, n=500)" in md and "![loss](loss.png)" in md
    assert "report.md" in capsys.readouterr().out


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_progress_in_a_log_file_writes_whole_lines(capsys):
    """Without a terminal the bar is a line of its own per redraw (no carriage returns) and eval lines
    interleave cleanly, so `tail logs/<job>.log` reads."""
    from aligner.tracking import Progress

    bar = Progress(3, 0, enabled=True, desc="sft")
    for _ in range(3):
        bar.update(loss=0.5, tok_s=100)
    bar.write("step 3: eval/loss 0.4")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err and err.endswith("\n")
    lines = err.splitlines()
    assert all(line.strip() for line in lines)
    assert lines[0].startswith("sft:   0%") and "step 3: eval/loss 0.4" in lines
    assert lines[-1].startswith("sft: 100%") and "loss=0.5" in lines[-1]


def test_each_registered_algorithm_is_told_by_its_metric_names(tmp_path):
    """Every algorithm logs its loss's terms as "<section>/..."; the registry says whose section is whose."""
    from aligner.report import stage_of

    cases = {"rloo": "rloo/clipfrac", "reinforce_pp": "reinforce_pp/clipfrac", "online_dpo": "online_dpo/margin",
             "dpo": "dpo/loss", "grpo": "grpo/kl", "ppo": "ppo/value_loss", "rm": "rm/accuracy"}  # fmt: skip
    for stage, key in cases.items():
        assert stage_of([{"step": 1, "train/loss": 0.1, key: 0.0}], tmp_path) == stage
    assert stage_of([{"step": 1, "train/loss": 0.1, "sft/nll": 1.0}], tmp_path) == "pretrain"
    (tmp_path / "accuracy.json").write_text("{}")
    assert stage_of([{"step": 1, "train/loss": 0.1}], tmp_path) == "sft"
