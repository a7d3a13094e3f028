"""Import boundaries, checked on the source: the floor plan, no cycles, light modules stay light.

Floors, from the bottom up (a module imports its own floor and those below, never one above):
  0  errors, registry, sections, config, stats, logprobs, checkpoint, tracking   recipes, primitives, files
  1  losses, advantages                                                          pure torch math
  2  model/*, data/*                                                             models and data
  3  rollout/*, rewards, evaluate, report                                        generation, scoring, evals
  4  trainers/*                                                                  the loop and the algorithms
  5  pipeline, interactive, help, cli, __main__, the package itself              commands
Imports inside `if TYPE_CHECKING:` do not run and do not count. losses and advantages import torch and
aligner.logprobs only; transformers, peft and bitsandbytes are imported in model/ only by load, quant,
heads and tokenizer; vllm only by rollout/vllm_engine and its worker extension, rollout/vllm_worker.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "aligner"
HEAVY = ("transformers", "peft", "vllm", "datasets", "accelerate")
FLOORS = [
    ("errors", "registry", "sections", "config", "stats", "logprobs", "checkpoint", "tracking"),
    ("losses", "advantages"),
    ("model", "data"),
    ("rollout", "rewards", "evaluate", "report"),
    ("trainers",),
    ("pipeline", "interactive", "help", "cli", "__main__", ""),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(p for p in ("aligner", *parts) if p != "__init__")


def floor(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    return next(i for i, names in enumerate(FLOORS) if first in names)


def imports(path: Path) -> set[str]:
    """aligner modules `path` imports at run time (anywhere in it, lazily too; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aligner"):
            if node.module != "aligner":  # `from aligner import checkpoint` imports aligner.checkpoint only
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aligner"))
    return out


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {m: {d for d in imports(p) if d in MODULES and d != m} for m, p in MODULES.items()}


def test_every_module_has_a_floor_and_no_import_goes_up():
    up = [f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps if floor(d) > floor(m)]
    assert not up, "imports up the floors:\n" + "\n".join(sorted(up))


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(GRAPH[m]):
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


def test_nothing_below_trainers_imports_trainers_or_cli():
    low = [m for m in GRAPH if floor(m) < floor("aligner.trainers")]
    bad = [f"{m} -> {d}" for m in low for d in GRAPH[m] if d.startswith(("aligner.trainers", "aligner.cli"))]
    assert not bad, bad


def test_heavy_libraries_only_where_allowed():
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        rel = path.relative_to(ROOT).as_posix()
        if rel in ("losses.py", "advantages.py", "logprobs.py"):
            assert names <= {"torch", "__future__", "math", "typing", "aligner"}, rel
        if rel.startswith("model/") and rel not in (
            "model/load.py",
            "model/quant.py",
            "model/heads.py",
            "model/tokenizer.py",
        ):
            assert not names & {"transformers", "peft", "bitsandbytes"}, rel
        if "vllm" in names:
            assert rel in ("rollout/vllm_engine.py", "rollout/vllm_worker.py"), rel


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
