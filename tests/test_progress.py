"""No command stays silent: `aligner rm` on its default data (16,000 task-world pairs, the run that printed
nothing for 40 seconds) says what it is doing at once, and then at least every few seconds while it reads
and encodes the data, also when its output goes to a file or a pipe."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def test_rm_on_the_default_data_speaks_at_once_and_keeps_speaking(bases, tmp_path):
    import shutil

    shutil.copytree(bases / "gpt", tmp_path / "runs" / "sft" / "final")  # the default recipe's start model
    aligner = str(Path(sys.executable).parent / "aligner")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.Popen(
        [aligner, "rm", "--max_steps", "1"], cwd=tmp_path, env=env, text=True, bufsize=1,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    lines = []
    try:
        for line in proc.stdout:
            lines.append((time.monotonic() - start, line.rstrip()))
            if "encoding" in line and "%" in line and "| 0/" not in line:  # the bar has moved once: enough
                break
    finally:
        proc.kill()
        proc.wait()
    text = "\n".join(f"{t:5.1f}s {line}" for t, line in lines)
    assert lines and lines[0][0] < 5.0 and lines[0][1].startswith("rm: "), text  # the first line, promptly
    assert any("data: reading world:preference" in line for _, line in lines), text
    assert any("0/16000" in line for _, line in lines), text  # the encoding bar counts the pairs
    gaps = [b[0] - a[0] for a, b in zip(lines, lines[1:])]
    assert max(gaps) < 7.0, text  # ~4 s of imports at worst, then a bar line every 4 s (slack for a busy CI)
