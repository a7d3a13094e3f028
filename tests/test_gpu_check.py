"""What can be checked of the GPU tier without a GPU: the tier is collected and skipped cleanly with its
reason, and benchmarks/gpu_check.sh's summary table reads sample outputs of every step (failed ones too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_tier_is_skipped_with_its_reason_without_cuda():
    import torch

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if torch.cuda.is_available():  # on a GPU machine this is `make test-gpu` itself: it must pass
        assert proc.returncode == 0, proc.stdout[-3000:]
    else:
        assert proc.returncode == 0 and "needs a CUDA device" in proc.stdout and " skipped" in proc.stdout
        assert " passed" not in proc.stdout and " failed" not in proc.stdout


def test_summary_table_from_sample_outputs(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from gpu_summary import rows

    run = {"tokens_per_s": 401000.0, "mfu_matmul": 0.52, "mfu_dense_peak": 0.41}
    (tmp_path / "pretrain_eager.json").write_text(json.dumps({"runs": {"bare model": run, "trainer loop": run}}))
    trl = [
        {"trainer": t, "params": 452e6, "aligner": {"tokens_per_s": 3e4, "peak_mib": 8e3},
         "trl": {"tokens_per_s": 2e4, "peak_mib": 1e4}}
        for t in ("sft", "dpo")
    ]  # fmt: skip
    (tmp_path / "compare_trl.json").write_text(json.dumps(trl))
    cases = {"sft_qwen (full)": {"exit": 0, "peak_gib": 11.2, "step_s": 1.5}, "x": {"skipped": "no bitsandbytes"}}
    (tmp_path / "recipe_vram.json").write_text(json.dumps({"cases": cases}))
    lines = rows(tmp_path, {"eager": 0, "compiled": 3, "trl": 0, "vram": 0})
    text = "\n".join(lines)
    assert "401,000 tokens/s, MFU 52.0% of the measured matmul peak / 41.0% of the dense bf16 peak" in text
    assert "| GPT core, GPT-2 small, compiled | failed (3): see pretrain_compiled.log |" in text
    assert "aligner vs TRL, sft (452M) | 1.50x tokens/s (30,000 vs 20,000), 0.80x peak memory" in text
    assert "| recipes/real: sft_qwen (full) | 11.2 GiB peak, 1.50 s/step |" in text and "no bitsandbytes" in text
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
