"""Recipe sections: one dataclass per YAML section, and `Recipe`, one instance of each.

    aligner/sections/base.py   the shared sections: model, tokenizer, data, train, lora, rollout
    aligner/sections/core.py   sft, rm, dpo, ppo, grpo (and pretrain, which reads sft), registered
    aligner/sections/<name>.py one more algorithm's section, registered beside its dataclass

Every module of this package is imported here (base, core, then the others by name), so an algorithm's
section file is all it takes to add its section, its command and its pipeline stage (aligner.registry).
A section's `checks(recipe)` returns (condition, message) pairs that `aligner.config.validate` enforces.
`aligner.config` loads recipes from YAML and flags, strictly, and re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

import yaml

from aligner.registry import SECTIONS
from aligner.sections.base import (  # noqa: F401  (the shared sections are this package's API)
    COMMON,
    ONLINE,
    DataConfig,
    LoRAConfig,
    MixSource,
    ModelConfig,
    RolloutConfig,
    TokenizerConfig,
    TrainConfig,
    choice,
)
from aligner.sections.core import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig  # noqa: F401

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")  # each registers its algorithm


class Recipe:
    """A resolved recipe: one dataclass instance per section of `SECTIONS` (`recipe.train.lr`), where it was
    loaded from (`path`) and the "section.key"s the user set, by a flag or in a recipe file other than the
    command's default recipe (`explicit`). A section registered after the recipe was made reads its defaults."""

    def __init__(self, path: str | None = None, explicit: set[str] | None = None, **sections):
        unknown = sorted(set(sections) - set(SECTIONS))
        if unknown:
            raise TypeError(f"Recipe got unknown sections {unknown}")
        for name, cls in SECTIONS.items():
            setattr(self, name, sections[name] if name in sections else cls())
        self.path = path
        self.explicit = set(explicit or ())

    def __getattr__(self, name: str):
        if name in SECTIONS:  # registered after this recipe was made: its defaults
            value = SECTIONS[name]()
            setattr(self, name, value)
            return value
        raise AttributeError(f"'Recipe' has no section '{name}'")

    def __eq__(self, other) -> bool:
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what gets saved next to every checkpoint)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        header = f"# resolved recipe (from {self.path or 'built-in defaults'})\n"
        return header + yaml.safe_dump(self.to_dict(), sort_keys=False)
