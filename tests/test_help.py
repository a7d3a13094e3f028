"""`aligner <command> --help`: every field a command reads, with its flag, type, resolved value and the comment
beside it in aligner/sections/; recipe values and flag overrides; bad input still a one-line error."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field

import pytest

from aligner import sections
from aligner.cli import main
from aligner.config import _type_name
from aligner.help import field_comments, field_lines, format_value
from aligner.registry import ALGORITHMS


def help_text(capsys, *args: str) -> str:
    assert main(list(args)) == 0
    captured = capsys.readouterr()
    assert not captured.err
    return captured.out


def field_blocks(out: str) -> dict[str, str]:
    """{"--section.key": the field's line and the comment lines under it, whitespace collapsed}."""
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"  (--[\w.]+)", line)
        if m:
            current = blocks.setdefault(m.group(1), [])
        elif not line.startswith("   "):
            current = None
        if current is not None:
            current.append(line)
    return {flag: " ".join(" ".join(lines).split()) for flag, lines in blocks.items()}


def read_fields(command: str) -> list[tuple[str, dataclasses.Field]]:
    out = []
    for entry in ALGORITHMS[command].reads:
        section, _, key = entry.partition(".")
        for f in dataclasses.fields(sections.SECTIONS[section]):
            if not f.metadata.get("internal") and key in ("", f.name):
                out.append((section, f))
    return out


@pytest.mark.parametrize("command", list(ALGORITHMS))
def test_every_field_the_command_reads_with_type_and_comment(capsys, command):
    out = help_text(capsys, command, "--help")
    assert out.startswith(f"usage: aligner {command} ") and ALGORITHMS[command].help in out
    assert f"recipes/{ALGORITHMS[command].recipe}" in out
    assert all(line == line.rstrip() and len(line) <= 100 for line in out.splitlines())
    blocks = field_blocks(out)
    for section, f in read_fields(command):
        flag = f"--{section}.{f.name}"
        assert flag in blocks, f"{command} --help misses {flag}"
        cls = sections.SECTIONS[section]
        tp = _type_name(typing.get_type_hints(cls)[f.name])
        assert blocks[flag].startswith(flag) and f" {tp} " in blocks[flag]
        comment = field_comments(cls)[f.name]
        assert comment, f"{section}.{f.name} has no comment in aligner/sections/"
        assert " ".join(comment.split()) in blocks[flag]
        for value in f.metadata.get("choices", ()):
            assert str(value) in blocks[flag]
    shown = {flag.split(".")[0] for flag in blocks}
    assert shown == {"--" + entry.split(".")[0] for entry in ALGORITHMS[command].reads}


def test_command_sections_name_real_sections_and_keys():
    for algorithm in ALGORITHMS.values():
        assert algorithm.section in {e.split(".")[0] for e in algorithm.reads}
        for entry in algorithm.reads:
            section, _, key = entry.partition(".")
            assert section in sections.SECTIONS
            assert not key or key in {f.name for f in dataclasses.fields(sections.SECTIONS[section])}


def test_comments_are_read_from_the_source():
    """End-of-line comments exactly as written; comment lines above a field join into one text."""
    for cls in sections.SECTIONS.values():
        source = inspect.getsource(cls)
        for name, text in re.findall(r"^    (\w+): [^\n#]*\S  # ([^\n]*)$", source, flags=re.M):
            assert field_comments(cls)[name] == text.strip()
    likelihood = field_comments(sections.RMConfig)["likelihood_coef"]
    assert likelihood.startswith("reward = head + likelihood_coef * the reply's summed token log-prob")
    assert likelihood.endswith("(trained so, saved with the checkpoint, used in every score); 0 = the head alone")


def test_recipe_values_flags_and_defaults(capsys):
    blocks = field_blocks(help_text(capsys, "sft", "recipes/chat.yaml", "--help"))
    assert blocks["--train.lr"].startswith("--train.lr, --lr float = 0.003 ")
    assert "(default" not in blocks["--train.lr"]  # 3e-3 is also the built-in default
    assert blocks["--train.name"].startswith("--train.name, --name str = sft (default pretrain)")
    assert blocks["--sft.train_on"].startswith("--sft.train_on, --train_on str = all (one of all, last)")
    assert "--chat_template" in blocks["--sft.chat_template"]  # sft's own section takes the bare flag

    blocks = field_blocks(help_text(capsys, "sft", "recipes/chat.yaml", "--lr", "1e-4", "--help"))
    assert blocks["--train.lr"].startswith("--train.lr, --lr float = 0.0001 (default 0.003)")
    # -h anywhere, before the recipe too; no recipe = the command's default recipe
    blocks = field_blocks(help_text(capsys, "sft", "-h", "recipes/chat.yaml", "--train.name=x"))
    assert blocks["--train.name"].startswith("--train.name, --name str = x ")
    blocks = field_blocks(help_text(capsys, "dpo", "--beta", "0.3", "--help"))
    assert blocks["--dpo.beta"].startswith("--dpo.beta, --beta float = 0.3 (default 0.1)")
    assert "--chat_template" not in blocks["--sft.chat_template"]  # for dpo it means dpo.chat_template
    assert "(only chat_template)" in help_text(capsys, "dpo", "--help")


def test_a_hub_models_rate_comes_from_its_size_unless_given(capsys):
    text = " ".join(
        field_blocks(help_text(capsys, "sft", "recipes/real/sft_qwen.yaml", "--help"))["--train.lr"].split()
    )
    assert "Qwen/Qwen2.5-0.5B-Instruct was not trained here" in text
    assert "the rate for its size unless --lr is given: 2e-05 (0.0002 with LoRA) up to 1.5B parameters" in text
    given = field_blocks(help_text(capsys, "sft", "recipes/real/sft_qwen.yaml", "--lr", "1e-5", "--help"))
    assert "not used" not in given["--train.lr"]


def test_bad_input_is_still_one_line_exit_2(capsys):
    for args in (["sft", "--lrr", "1", "--help"], ["sft", "missing.yaml", "--help"], ["dpo", "--beta", "x", "-h"]):
        assert main(args) == 2
        captured = capsys.readouterr()
        assert not captured.out and captured.err.startswith("error: ") and captured.err.count("\n") == 1


def test_global_usage_mentions_command_help(capsys):
    assert main(["--help"]) == 0
    assert "aligner <command> --help" in capsys.readouterr().out


# --- types the sections do not use yet -------------------------------------------------------------------


@dataclass
class Source:
    path: str  # a file or hub name
    # relative share of the mixture
    weight: float = 1.0


@dataclass
class Mixed:
    renames: dict[str, str] = field(default_factory=dict)  # column renames: old -> new
    mix: list[Source] = field(default_factory=list)  # sources sampled together


def test_dict_and_dataclass_fields_print(capsys):
    renames, mix = dataclasses.fields(Mixed)
    lines = field_lines(Mixed, renames, {"q": "prompt"}, "--data.renames")
    assert lines == ["  --data.renames  dict = {q: prompt}  (default {})", "      column renames: old -> new"]
    text = "\n".join(field_lines(Mixed, mix, [Source("a.jsonl", 2.0)], "--data.mix"))
    assert "--data.mix  list of Source = [{path: a.jsonl, weight: 2.0}]  (default [])" in text
    assert "      path  str (required)\n          a file or hub name" in text
    assert "      weight  float = 1.0\n          relative share of the mixture" in text
    assert format_value(None) == "null" and format_value([True, ""]) == "[true, '']"
