"""The algorithms aligner trains, each declared once, and the recipe sections they read.

    from aligner.registry import ALGORITHMS, Algorithm, register

An `Algorithm` names its command (`aligner <name>`), its recipe section and that section's dataclass, the
function that runs the command on a resolved recipe and its trainer class (both "module:attribute", imported
only when used), its default recipe, the sections it reads, and where the pipeline chains it. The command
line (commands, bare flags, `--help`), the recipe loader (which sections exist, where a bare flag goes, a
command's default recipe) and the pipeline (stages, their order and wiring) all read `ALGORITHMS`, so an
algorithm is added by its own trainer module, its section (registered beside its dataclass in
aligner/sections/<name>.py), its recipe and its tests: nothing else lists it. Light: no torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

SECTIONS: dict[str, type] = {}  # every recipe section: the shared ones, then each algorithm's (registered)


@dataclass(frozen=True)
class Algorithm:
    name: str  # the command: `aligner <name>`
    section: str  # its recipe section; a bare flag (`--beta`) of the command looks there first
    config: type  # that section's dataclass
    run: str  # "module:function" running the command on a Recipe, returning {"metrics", "run_dir", ...}
    trainer: str  # "module:Class", its trainer on the shared loop
    recipe: str | None  # its default recipe (recipes/<file>), used when no recipe is given
    help: str  # one line for `aligner --help`
    reads: tuple[str, ...] = ()  # sections (or "section.key"s) the command reads, as `aligner <name> --help` lists
    starts_from: str | None = None  # the pipeline stage whose final checkpoint is its model.init_from
    wires: dict = field(default_factory=dict)  # more pipeline wiring: {recipe key: stage whose final it reads}
    policy: bool = True  # a policy the pipeline's eval scores (not a reward model or a base model)
    # train.lr for a pretrained (Hub) model of up to 1.5B parameters: (full fine-tuning, LoRA); halved up to 15B,
    # quartered beyond (aligner.trainers.setup.default_lr). The recipes' own rates fit the task world's core.
    hub_lr: tuple[float, float] = (1e-6, 1e-5)

    def command(self):
        """The function that runs it (imported now)."""
        return _attribute(self.run)

    def trainer_class(self) -> type:
        return _attribute(self.trainer)


ALGORITHMS: dict[str, Algorithm] = {}


def final_of(path) -> str | None:
    """The algorithm whose run writes `path`, when it names a run's final checkpoint (.../<command>/final)."""
    parts = str(path).replace("\\", "/").rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "final" and parts[-2] in ALGORITHMS else None


def register(algorithm: Algorithm) -> Algorithm:
    """Add an algorithm (and its section) to the registry; a name already taken is an error."""
    if algorithm.name in ALGORITHMS and ALGORITHMS[algorithm.name] != algorithm:
        raise ValueError(f"an algorithm named '{algorithm.name}' is already registered")
    known = SECTIONS.get(algorithm.section)
    if known is not None and known is not algorithm.config:
        raise ValueError(f"section '{algorithm.section}' is already another class's ({known.__name__})")
    ALGORITHMS[algorithm.name] = algorithm
    SECTIONS[algorithm.section] = algorithm.config
    return algorithm


def _attribute(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)
