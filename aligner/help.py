"""`aligner <command> --help`: every recipe field a training command reads, with its value and meaning.

    aligner dpo --help                                # values of the default recipe (recipes/dpo.yaml)
    aligner sft recipes/sft_lora.yaml --lr 1e-4 -h    # that recipe's values, the flags applied

Fields are grouped by section as the registered `reads` of the command list them; each shows its flag (and
the bare form where that resolves to it), its type, its resolved value (with the built-in default when they
differ) and the one-line comment written beside it in `aligner/sections/`, read from the source.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import shutil
import textwrap
import tokenize
import typing
from typing import Any

from aligner import sections
from aligner.errors import ConfigError
from aligner.registry import ALGORITHMS

HELP_FLAGS = ("-h", "--help")


def command_help(command: str, args: list[str], description: str = "") -> str:
    """The help text of a training command; `args` are its other arguments ([RECIPE] [--flag value ...]),
    -h / --help among them anywhere. A bad recipe or flag raises ConfigError, as the command itself would."""
    from aligner.config import default_recipe_path, load_recipe, parse_flags, resolve_flag

    args = [a for a in args if a not in HELP_FLAGS]
    recipe_path = None
    if args and not args[0].startswith("--"):
        recipe_path, args = args[0], args[1:]
    flags = parse_flags(args)
    default_path = default_recipe_path(command)
    recipe = load_recipe(recipe_path or default_path, flags, command=command)
    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 100))
    algorithm = ALGORITHMS[command]
    own = algorithm.section
    shown = recipe_path or default_path or "the built-in defaults"
    applied = " with the flags given" if flags else ""
    intro = [
        f"default recipe: recipes/{algorithm.recipe}",
        f"values: {shown}{applied}; (default X) marks a value that differs from the built-in default",
        f"flags: --section.key VALUE; a bare --key looks in the {own} section first, then in the one section "
        "that has it (shown beside each field it reaches)",
    ]
    lines = [f"usage: aligner {command} [RECIPE] [--flag value ...]", ""]
    if description:
        lines += [*_wrap(description, width, ""), ""]
    for text in intro:
        lines += _wrap(text, width, "", "    ")
    for section, keys in _entries(command):
        cls = sections.SECTIONS[section]
        about = _section_summaries().get(section, "")
        head = section + (f" (only {', '.join(keys)})" if keys else "") + (f": {about}" if about else "")
        lines += ["", *_wrap(head, width, "", "    ")]
        for f in _public_fields(cls):
            if keys and f.name not in keys:
                continue
            names = [f"--{section}.{f.name}"]
            try:
                if resolve_flag(f.name, command) == (section, f.name):
                    names.append(f"--{f.name}")
            except ConfigError:  # ambiguous bare flag: only --section.key reaches this field
                pass
            lines += field_lines(cls, f, getattr(getattr(recipe, section), f.name), ", ".join(names), width)
            if (section, f.name) == ("train", "lr") and "train.lr" not in recipe.explicit:
                lines += _lr_by_size(recipe, algorithm.hub_lr, width)
    return "\n".join(lines)


def _lr_by_size(recipe, hub_lr: tuple[float, float], width: int) -> list[str]:
    """What replaces train.lr at the start when the model is not one this toolkit trained
    (`trainers.setup.resolve_lr`): nothing to say for its own checkpoints, written or still to come
    (runs/<command>/final)."""
    from aligner.config import resolve_path, trained_here
    from aligner.registry import final_of

    init = recipe.model.init_from
    if trained_here(init) or (final_of(init) and not resolve_path(init).exists()):
        return []
    full, lora = hub_lr
    text = (
        f"not used as it stands: {recipe.model.init_from} was not trained here, so the run takes the rate for its "
        f"size unless --lr is given: {full:g} ({lora:g} with LoRA) up to 1.5B parameters, half that up to 15B, "
        "a quarter beyond"
    )
    return _wrap(text, width, "      ")


# --- pieces ----------------------------------------------------------------------------------------------


def _entries(command: str) -> list[tuple[str, list[str]]]:
    """The command's `reads` as (section, keys) in order; keys [] = the whole section."""
    out: dict[str, list[str]] = {}
    for entry in ALGORITHMS[command].reads:
        section, _, key = entry.partition(".")
        keys = out.setdefault(section, [])
        if key:
            keys.append(key)
    return list(out.items())


def _public_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def field_lines(
    cls: type, f: dataclasses.Field, value: Any, flag: str, width: int = 100, indent: str = "  "
) -> list[str]:
    """The field's line (flag, type, value; the default where the value differs; the choices) and its comment
    below it. A field that holds dataclasses (`list[Source]`) lists their keys under it, with their defaults."""
    if value is dataclasses.MISSING:
        head = f"{flag}  {type_name(cls, f.name)} (required)"
    else:
        head = f"{flag}  {type_name(cls, f.name)} = {format_value(value)}"
    default = _default(f)
    if default is not dataclasses.MISSING and value is not dataclasses.MISSING and value != default:
        head += f"  (default {format_value(default)})"
    choices = f.metadata.get("choices")
    if choices:
        head += f"  (one of {', '.join(format_value(c) for c in choices)})"
    lines = _wrap(head, width, indent, indent + "        ")
    comment = field_comments(cls).get(f.name, "")
    if comment:
        lines += _wrap(comment, width, indent + "    ")
    inner = _dataclass_inside(_hints(cls).get(f.name))
    if inner is not None and inner is not cls:  # the keys of each item, as YAML would give them
        for sub in _public_fields(inner):
            lines += field_lines(inner, sub, _default(sub), sub.name, width, indent + "    ")
    return lines


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _wrap(text: str, width: int, indent: str, subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(
        text,
        width,
        initial_indent=indent,
        subsequent_indent=indent if subsequent is None else subsequent,
        break_long_words=False,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


# --- types, values, comments ---------------------------------------------------------------------------


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: type_name falls back to its text
        return {}


def type_name(cls: type, name: str) -> str:
    """The field's type as config errors name it ("int or null", "list of str"); its annotation text otherwise."""
    from aligner.config import _type_name

    raw = next(f.type for f in dataclasses.fields(cls) if f.name == name)
    try:
        return _type_name(_hints(cls)[name])
    except Exception:  # unresolved, or a type _type_name does not know
        return raw if isinstance(raw, str) else getattr(raw, "__name__", repr(raw))


def _dataclass_inside(tp: Any) -> type | None:
    """The dataclass a field holds (itself, or inside list / dict values / Optional), or None."""
    if tp is None:
        return None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_inside(arg)
        if found is not None:
            return found
    return None


def format_value(value: Any) -> str:
    """A value as it would be written in YAML flow style: null, true, 0.003, [a, b], {k: v}."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return value if value.strip() == value and value else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{format_value(k)}: {format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: its comment} from the class source: comment lines directly above the field, then the comment
    at the end of its line(s), joined with spaces. Base dataclasses first, so a subclass's own comment wins."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (built in a REPL, frozen): fields are listed without comments
            continue
        comments: dict[int, tuple[str, bool]] = {}  # line -> (text, alone on its line)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                alone = not tok.line[: tok.start[1]].strip()
                comments[tok.start[0]] = (tok.string.lstrip("#").strip(), alone)
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in comments and comments[line][1]:
                above.insert(0, comments[line][0])
                line -= 1
            within = [comments[n][0] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            out[node.target.id] = " ".join(text for text in above + within if text)
    return out


def _section_summaries() -> dict[str, str]:
    """The one-line description of each section from the table in aligner.sections' docstring."""
    out = {}
    for line in (sections.__doc__ or "").splitlines():
        name, sep, text = line.strip().partition(":")
        if sep and name in sections.SECTIONS and text.strip():
            out[name] = text.strip()
    for name, cls in sections.SECTIONS.items():  # a section registered elsewhere: its class's docstring
        doc = (cls.__doc__ or "").strip()
        if name not in out and doc and not doc.startswith(f"{cls.__name__}("):
            out[name] = doc.splitlines()[0].rstrip(".")
    return out
