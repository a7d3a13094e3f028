"""Smoke test of benchmarks/compare_trl.py: every trainer runs in both frameworks and their losses agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_trl.py"


def test_quick_mode_runs_all_trainers_with_equal_losses(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--precision", "fp32", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["trainer"] for r in results] == ["sft", "rm", "dpo", "grpo"]
    for r in results:
        for framework in ("bare", "aligner", "trl"):
            figures = r[framework]
            assert figures["tokens_per_s"] > 0 and figures["steps_per_s"] > 0 and figures["peak_mib"] > 0
        if r["trainer"] != "grpo":  # same batches from the same weights, fp32: the same first two losses
            assert len(r["aligner"]["losses"]) == 2
            for a, t in zip(r["aligner"]["losses"], r["trl"]["losses"]):
                assert a == pytest.approx(t, abs=2e-5)
    assert "| ratio |" in proc.stdout and "| bare tokens/s |" in proc.stdout and "1 repeats, medians" in proc.stdout
    for r in results:  # the protocol's figures: medians with their ranges, memory from a run of its own
        for framework in ("bare", "aligner", "trl"):
            low, high = r[framework]["tokens_per_s_range"]
            assert low <= r[framework]["tokens_per_s"] <= high and len(r[framework]["repeats"]) == 1
