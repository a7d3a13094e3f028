"""Recipes: a strict loader for the sections of aligner.sections, and command-line overrides.

A recipe is a YAML file with the sections of `aligner.sections` (all optional; each field has a typed
default): model, tokenizer, data, train, sft, lora, dpo, rm, grpo, ppo.

Loading is strict: malformed YAML, unknown keys, wrong types and missing files raise `ConfigError`
with one line naming the file and key (and the closest valid key). Flags override the recipe:
`--lr 3e-4` resolves to the command's own section first, then to the one section that has that key;
`--train.lr 3e-4` always works. Flag values are parsed as YAML (`--train.trackers [tensorboard]`,
`--data.columns '{question: prompt}'`, `--data.mix '[{source: a.jsonl, weight: 2}, {source: b.jsonl}]'`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from aligner.errors import ConfigError
from aligner.registry import ALGORITHMS  # filled by aligner.sections (imported below) and by plug-ins
from aligner.sections import (  # noqa: F401  (re-exported: the sections are part of this module's API)
    SECTIONS,
    DataConfig,
    DPOConfig,
    GRPOConfig,
    LoRAConfig,
    MixSource,
    ModelConfig,
    PPOConfig,
    Recipe,
    RMConfig,
    RolloutConfig,
    SFTConfig,
    TokenizerConfig,
    TrainConfig,
    choice,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIX_SOURCE = "mix"  # what data.source reads when data.mix lists the training sources


# --- type checking --------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise _type_error(value, tp, where)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, tp, where)
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, tp, where)
        key_tp, value_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, f"{where} key"): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):  # a list of sources, say: each item is built as strictly as a section
        return value if isinstance(value, tp) else build_section(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(value, tp, where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):  # "1e3" from a flag
            try:
                f = float(value)
            except ValueError:
                raise _type_error(value, tp, where) from None
            if f.is_integer():
                return int(f)
        raise _type_error(value, tp, where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(value, tp, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(value, tp, where)
    raise TypeError(f"unsupported config annotation {tp!r} at {where}")


def _type_error(value: Any, tp: Any, where: str) -> ConfigError:
    return ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _closest(key: str, options: list[str]) -> str:
    match = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid keys: {', '.join(options)})"


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def build_section(cls: type, values: dict, where: str) -> Any:
    """Make a section dataclass from a mapping, strictly."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(values).__name__}")
    fields = {f.name: f for f in _public_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{where}.{key}'{_closest(str(key), list(fields))}")
        kwargs[key] = _check_choice(fields[key], _coerce(value, hints[key], f"{where}.{key}"), f"{where}.{key}")
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name} is required")
    return cls(**kwargs)


def _check_choice(f: dataclasses.Field, value: Any, where: str) -> Any:
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


# --- loading --------------------------------------------------------------------------------------


def resolve_path(path: str | Path) -> Path:
    """A user path: as given (relative to the working directory), else relative to the repository root."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def default_recipe_path(command: str) -> Path | None:
    name = ALGORITHMS[command].recipe if command in ALGORITHMS else None
    if name is None:
        return None
    for base in (Path("recipes"), REPO_ROOT / "recipes"):
        if (base / name).is_file():
            return base / name
    return None


def trained_here(init_from: str | None) -> bool:
    """Whether the start model is fresh or a checkpoint this toolkit wrote (it saves recipe.yaml beside it)."""
    return not init_from or (resolve_path(init_from) / "recipe.yaml").is_file()


def read_yaml(path: Path, what: str, shown: str | Path | None = None):
    """A YAML file's content (`yaml.safe_load`), or a one-line ConfigError naming the file (as `shown`) and
    what is wrong: unreadable, not UTF-8 (the first bad byte and its line), malformed YAML (line and column)."""
    shown = path if shown is None else shown
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{what} '{shown}' is not UTF-8: byte {e.start} (line {line}) is 0x{e.object[e.start]:02x}; "
            "save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"{what} '{shown}' cannot be read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{shown}: malformed YAML{at}: {problem}") from None


def load_recipe(path: str | Path | None, overrides: dict[str, Any] | None = None, command: str = "sft") -> Recipe:
    """Load a recipe file (or the built-in defaults when `path` is None) and apply `overrides`.

    `overrides` maps flag names (`lr` or `train.lr`) to values, as parsed by `parse_flags`.
    """
    raw: dict = {}
    source = "built-in defaults"
    if path is not None:
        p = resolve_path(path)
        source = str(path)
        if not p.is_file():
            raise ConfigError(f"recipe file '{path}' not found")
        raw = read_yaml(p, "recipe file", shown=path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    try:
        for section in raw:
            if section not in SECTIONS:
                raise ConfigError(f"unknown section '{section}'{_closest(str(section), list(SECTIONS))}")
        for section, values in raw.items():
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{section} must be a mapping of keys to values, got {type(values).__name__}")
        merged = {name: dict(raw.get(name) or {}) for name in SECTIONS}
        default = default_recipe_path(command)
        own_file = path is not None and not (default and resolve_path(path).resolve() == default.resolve())
        explicit = {f"{name}.{key}" for name in SECTIONS for key in merged[name]} if own_file else set()
        for flag, value in (overrides or {}).items():
            section, key = resolve_flag(flag, command)
            merged[section][key] = value
            explicit.add(f"{section}.{key}")
        recipe = Recipe(**{name: build_section(cls, merged[name], name) for name, cls in SECTIONS.items()})
        recipe.explicit = explicit
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    recipe.path = str(path) if path is not None else None
    recipe.train.resume = recipe.train.resume or recipe.train.resume_with_changes
    validate(recipe)
    return recipe


def resolve_flag(flag: str, command: str) -> tuple[str, str]:
    """`lr` -> ('train', 'lr'); `train.lr` -> ('train', 'lr'). Unknown or ambiguous flags raise."""
    if "." in flag:
        section, key = flag.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"unknown flag '--{flag}': no section '{section}'{_closest(section, list(SECTIONS))}")
        names = [f.name for f in _public_fields(SECTIONS[section])]
        if key not in names:
            raise ConfigError(f"unknown flag '--{flag}'{_closest(key, [f'{section}.{n}' for n in names])}")
        return section, key
    own = ALGORITHMS[command].section if command in ALGORITHMS else None
    if own and flag in {f.name for f in _public_fields(SECTIONS[own])}:
        return own, flag
    hits = [name for name, cls in SECTIONS.items() if flag in {f.name for f in _public_fields(cls)}]
    if len(hits) == 1:
        return hits[0], flag
    if len(hits) > 1:
        raise ConfigError(f"ambiguous flag '--{flag}': use one of {', '.join(f'--{s}.{flag}' for s in hits)}")
    every = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in _public_fields(cls)]
    bare = [f.name for cls in SECTIONS.values() for f in _public_fields(cls)]
    match = difflib.get_close_matches(flag, bare + every, n=1, cutoff=0.5)
    hint = f" (did you mean '--{match[0]}'?)" if match else ""
    raise ConfigError(f"unknown flag '--{flag}'{hint}")


def parse_flags(args: list[str], bool_flags: set[str] | None = None) -> dict[str, Any]:
    """Turn ['--lr', '3e-4', '--resume', '--train.name=x'] into {'lr': 3e-4, 'resume': True, 'train.name': 'x'}.

    A flag followed by another flag (or nothing) is a boolean switch set to true. Values are YAML
    scalars, so `--trackers [tensorboard]` is a list and `--init_from null` is None.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument '{arg}': flags look like --key value or --section.key value")
        name = arg[2:]
        if "=" in name:  # --key=value: only the key's hyphens become underscores, never the value's
            name, text = name.split("=", 1)
            name = name.replace("-", "_")
            i += 1
        elif i + 1 < len(args) and not (args[i + 1].startswith("--") and len(args[i + 1]) > 2):
            name, text = name.replace("-", "_"), args[i + 1]
            i += 2
        else:
            out[name.replace("-", "_")] = True
            i += 1
            continue
        try:
            out[name] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            out[name] = text
    return out


def validate(recipe: Recipe) -> None:
    """Cross-field checks that a single type annotation cannot express."""
    m, t, d = recipe.model, recipe.train, recipe.data
    where = recipe.path or "recipe"
    checks = [
        (m.num_heads > 0 and m.hidden_size % m.num_heads == 0, "model.hidden_size must be divisible by num_heads"),
        (m.num_kv_heads > 0 and m.num_heads % m.num_kv_heads == 0, "model.num_heads must divide by num_kv_heads"),
        (m.arch != "hf" or m.init_from, "model.arch hf needs model.init_from (a model dir or hub name)"),
        (t.lr > 0, "train.lr must be positive"),
        (0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio must be in [0, 1]"),
        (0 <= t.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (t.micro_batch_size > 0, "train.micro_batch_size must be positive"),
        (t.grad_accum > 0, "train.grad_accum must be positive"),
        (t.max_steps is None or t.max_steps > 0, "train.max_steps must be positive"),
        (t.epochs > 0, "train.epochs must be positive"),
        (d.seq_len > 1, "data.seq_len must be at least 2"),
        (d.seq_len <= m.max_seq_len or m.init_from, "data.seq_len must not exceed model.max_seq_len"),
        (0 <= d.eval_fraction < 1, "data.eval_fraction must be in [0, 1)"),
        (set(t.trackers) <= {"tensorboard", "wandb"}, "train.trackers may contain only tensorboard and wandb"),
        (t.name and "/" not in t.name and t.name not in (".", ".."), "train.name must be a plain directory name"),
        (not (t.resume and t.overwrite), "train.resume and train.overwrite cannot both be set"),
        (recipe.lora.r > 0 and recipe.lora.alpha > 0, "lora.r and lora.alpha must be positive"),
        (0 <= recipe.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (recipe.lora.quantize == "none" or recipe.lora.enabled, "lora.quantize nf4 (QLoRA) needs lora.enabled: true"),
    ]
    for name in SECTIONS:  # each section's own checks (the algorithms', the rollout's)
        own = getattr(getattr(recipe, name), "checks", None)
        if own is not None:
            checks += own(recipe)
    checks += _data_checks(d, "data.source" in recipe.explicit)
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")


def _data_checks(d: DataConfig, source_given: bool) -> list[tuple[bool, str]]:
    """The data section's sources: streaming needs a row count, data.mix replaces data.source (which the
    user must not also set; a default recipe's source gives way, and data.source then reads 'mix'), weights > 0."""
    default = DataConfig().source
    if d.mix and not (source_given and d.source not in (default, MIX_SOURCE)):
        d.source = MIX_SOURCE
    checks = [
        (not d.streaming or d.num_rows is not None, "data.streaming reads only the first data.num_rows rows; set it"),
        (
            not (d.streaming and d.eval_source and d.num_eval_rows is None),
            "data.streaming reads only the first data.num_eval_rows rows of data.eval_source; set it",
        ),
        (
            not d.mix or d.source == MIX_SOURCE,
            f"data.source '{d.source}' and data.mix are both set; data.mix lists every training source, so drop "
            "data.source",
        ),
    ]
    renames = [("data.columns", d.columns)] + [(f"data.mix[{i}].columns", m.columns) for i, m in enumerate(d.mix)]
    for name, columns in renames:
        twice = sorted({v for v in columns.values() if list(columns.values()).count(v) > 1})
        checks.append((not twice, f"{name} renames several columns to '{twice[0] if twice else ''}'"))
    for i, m in enumerate(d.mix):
        checks.append((m.source.strip() != "", f"data.mix[{i}].source is empty"))
        checks.append((m.weight > 0, f"data.mix[{i}].weight must be positive, got {m.weight}"))
    return checks


def check_writable(path: str | Path, what: str) -> None:
    """A directory that can be created and written, checked before any work starts: the nearest part of
    `path` that exists must be a writable directory. Raises ConfigError naming `what` otherwise."""
    import os

    for p in [Path(path), *Path(path).parents]:
        if p.exists():
            if not p.is_dir():
                raise ConfigError(f"{what}: '{p}' is a file, so '{path}' cannot be a directory; choose another path")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"{what}: '{p}' is not writable (a read-only mount, or not yours); choose another path"
                )
            return


def save_recipe(recipe: Recipe, directory: Path) -> None:
    (Path(directory) / "recipe.yaml").write_text(recipe.to_yaml())
