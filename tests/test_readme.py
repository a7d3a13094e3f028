"""The README's Python API examples run as written (in a scratch working directory)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def api_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("### Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_python_api_examples_run_as_written(tmp_path):
    blocks = api_blocks()
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(code)
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"README Python API block {i} failed:\n{proc.stderr[-3000:]}"
        assert proc.stdout.strip(), f"block {i} printed nothing"
    assert (tmp_path / "runs" / "api" / "chat" / "final" / "config.json").is_file()
