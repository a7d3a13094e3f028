"""Import boundaries from DESIGN.md, checked in fresh interpreters."""

import subprocess
import sys

import pytest

HEAVY = ("transformers", "peft", "vllm", "datasets", "accelerate")


def imported_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


LIGHT = ["aligner.losses", "aligner.advantages", "aligner.model.gpt", "aligner.config", "aligner.sections", "aligner"]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_do_not_import_heavy_libraries(module):
    assert not imported_after(module) & set(HEAVY)


def test_vllm_only_lazily():
    assert "vllm" not in imported_after("aligner.trainers.sft")


def test_layering():
    """data/ never imports model/ or trainers/; nothing imports cli; losses import only torch."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "aligner"
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        assert "aligner.cli" not in names or rel == "__main__.py", f"{rel} imports aligner.cli"
        if rel.startswith("data/"):
            assert not any(n.startswith(("aligner.model", "aligner.trainers")) for n in names), rel
        if rel in ("losses.py", "advantages.py"):
            assert {n.split(".")[0] for n in names} <= {"torch", "__future__", "math", "typing"}, rel
        if rel.startswith("model/") and rel not in ("model/load.py", "model/heads.py", "model/tokenizer.py"):
            assert not any(n.startswith(("transformers", "peft", "bitsandbytes")) for n in names), rel
        if "vllm" in {n.split(".")[0] for n in names}:
            assert rel == "rollout/vllm_engine.py", rel
