"""The rows of `benchmarks/gpu_check.sh`'s summary table, from the JSON its steps wrote.

python benchmarks/gpu_summary.py OUT_DIR EAGER_EXIT COMPILED_EXIT TRL_EXIT VRAM_EXIT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(out: Path, codes: dict) -> list[str]:
    lines = []

    def load(name):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    for label, code in (("eager", codes["eager"]), ("compiled", codes["compiled"])):
        r = load(f"pretrain_{label}.json")
        if code or r is None:
            lines.append(f"| GPT core, GPT-2 small, {label} | failed ({code}): see pretrain_{label}.log |")
            continue
        for run, f in r["runs"].items():
            sheet = f" / {100 * f['mfu_dense_peak']:.1f}% of the dense bf16 peak" if f["mfu_dense_peak"] else ""
            lines.append(
                f"| GPT core, GPT-2 small, {label}, {run} | {f['tokens_per_s']:,.0f} tokens/s, MFU "
                f"{100 * f['mfu_matmul']:.1f}% of the measured matmul peak{sheet} |"
            )
    results = load("compare_trl.json")
    if codes["trl"] or results is None:
        lines.append(f"| aligner vs TRL | failed ({codes['trl']}): see compare_trl.log |")
    else:
        for r in results:
            a, t = r["aligner"], r["trl"]
            speed, memory = a["tokens_per_s"] / t["tokens_per_s"], a["peak_mib"] / t["peak_mib"]
            lines.append(
                f"| aligner vs TRL, {r['trainer']} ({r['params'] / 1e6:.0f}M) | {speed:.2f}x tokens/s "
                f"({a['tokens_per_s']:,.0f} vs {t['tokens_per_s']:,.0f}), {memory:.2f}x peak memory "
                f"({a['peak_mib']:,.0f} vs {t['peak_mib']:,.0f} MiB) |"
            )
    vram = load("recipe_vram.json")
    if codes["vram"] or vram is None:
        lines.append(f"| recipes/real peak memory | failed ({codes['vram']}): see recipe_vram.log |")
    else:
        for name, r in vram["cases"].items():
            if "skipped" in r:
                figure = r["skipped"]
            elif r["exit"]:
                figure = f"failed (exit {r['exit']})"
            else:
                step = f", {r['step_s']:.2f} s/step" if r["step_s"] is not None else ""
                figure = f"{r['peak_gib']:.1f} GiB peak{step}"
            lines.append(f"| recipes/real: {name} | {figure} |")
    return lines


if __name__ == "__main__":
    codes = dict(zip(["eager", "compiled", "trl", "vram"], map(int, sys.argv[2:6])))
    print("\n".join(rows(Path(sys.argv[1]), codes)))
