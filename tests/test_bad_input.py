"""Bad input never ends in a traceback and changes nothing on disk: each case is exit code 2 with one line on
stderr naming the thing and what is wrong. A bug of aligner's own is the other kind: its traceback, exit
code 1 and a line asking to report it. Damaged run directories are survived: `--resume` falls back from a
damaged newest checkpoint to the intact one before it, exactly, and drops a torn last metrics line; a
resume whose recipe changed in what shapes the optimisation is refused unless --resume-with-changes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import sft_recipe
from safetensors.torch import load_file

from aligner.cli import main


def one_line(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def files(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def scratch(tmp_path, monkeypatch, bases):
    """A working directory with a start model at runs/sft/final (as the default recipes expect)."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(bases / "gpt", tmp_path / "runs" / "sft" / "final")
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PAIRS = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}.", "rejected": f"{i + 2}."} for i in range(8)]
QUICK = ["--max_steps", "1", "--train.progress", "false", "--accuracy_items", "0", "--data.num_rows", "8"]
QUICK += ["--data.num_eval_rows", "4"]


@pytest.mark.parametrize("name,content", [("bad.parquet", b"this is not parquet"), ("bad.csv", b'a,b\n"1,2\n')])
def test_malformed_parquet_and_csv_files(scratch, capsys, name, content):
    """One line: the datasets library's own log line about the file is not shown as well."""
    (scratch / name).write_bytes(content)
    line = one_line(capsys, main(["sft", "--model.init_from", "runs/sft/final", "--data.source", name]))
    assert f"{name}' could not be read as {name.split('.')[1]}" in line


def test_a_reward_function_that_raises_leaves_no_run_behind(scratch, capsys, monkeypatch):
    """The error comes from the first rollout, after the run directory was made: it is removed again."""
    (scratch / "broken_reward.py").write_text("def reward(prompts, completions, **row):\n    return 1 / 0\n")
    monkeypatch.syspath_prepend(str(scratch))
    before = files(scratch)
    args = ["grpo", "--rewards", "[broken_reward:reward]", "--rollout.max_new_tokens", "4", *QUICK]
    line = one_line(capsys, main([*args, "--train.out_dir", "new/runs"]))
    assert "reward function 'broken_reward:reward' raised ZeroDivisionError" in line
    assert files(scratch) == before and not (scratch / "new").exists() and not (scratch / "runs/grpo").exists()


def test_recipe_pipeline_and_eval_spec_files_that_are_not_utf8(scratch, capsys):
    (scratch / "bad.yaml").write_bytes(b"train:\n  lr: 0.001\n  name: caf\xe9\n")
    before = files(scratch)
    at = "is not UTF-8: byte 30 (line 3) is 0xe9; save it as UTF-8"
    assert f"recipe file 'bad.yaml' {at}" in one_line(capsys, main(["sft", "bad.yaml"]))
    assert f"pipeline file 'bad.yaml' {at}" in one_line(capsys, main(["pipeline", "bad.yaml"]))
    assert f"bad.yaml' {at}" in one_line(capsys, main(["eval", "runs/sft/final", "bad.yaml"])).split("eval spec '")[1]
    assert files(scratch) == before


def test_data_file_that_is_not_utf8(scratch, capsys):
    (scratch / "chat.jsonl").write_bytes(b'{"prompt": "caf\xe9?", "completion": "yes"}\n')
    before = files(scratch)
    line = one_line(capsys, main(["sft", "--model.init_from", "runs/sft/final", "--data.source", "chat.jsonl"]))
    assert "chat.jsonl' is not UTF-8: byte 15 (line 1) is 0xe9" in line
    assert files(scratch) == before


def test_damaged_weights_given_to_init_from_and_eval(scratch, capsys):
    shutil.copytree(scratch / "runs" / "sft" / "final", scratch / "cut")
    with open(scratch / "cut" / "model.safetensors", "r+b") as f:
        f.truncate(5000)
    before = files(scratch)
    line = one_line(capsys, main(["sft", "--model.init_from", "cut", *QUICK]))
    assert "model.init_from: cannot load 'cut'" in line and "damaged or incomplete" in line
    assert "damaged or incomplete" in one_line(capsys, main(["eval", "cut", "--items", "2"]))
    assert "damaged or incomplete" in one_line(capsys, main(["generate", "cut", "--prompt", "hi"]))
    assert files(scratch) == before


def test_a_model_directory_without_tokenizer(scratch, capsys):
    (scratch / "bare").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(scratch / "runs" / "sft" / "final" / name, scratch / "bare" / name)
    line = one_line(capsys, main(["eval", "bare", "--items", "2"]))
    assert "'bare' holds no tokenizer (tokenizer.json or tokenizer_config.json)" in line


def test_output_directory_that_is_a_file_or_read_only(scratch, capsys, monkeypatch):
    (scratch / "taken").write_text("a file")
    before = files(scratch)
    line = one_line(capsys, main(["dpo", "--train.out_dir", "taken", *QUICK]))
    assert "train.out_dir: 'taken' is a file" in line
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as on a read-only mount (root ignores modes)
    line = one_line(capsys, main(["dpo", "--train.out_dir", "elsewhere", *QUICK]))
    assert "is not writable" in line
    assert "--out" in one_line(capsys, main(["eval", "runs/sft/final", "--out", "x/eval.json"]))
    assert files(scratch) == before


@pytest.mark.parametrize(
    "args,named",
    [(["-n", "0"], "-n: must be >= 1"), (["--max-new-tokens", "-1"], "--max-new-tokens: must be >= 1"),
     (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
     (["--temperature", "nan"], "--temperature: must be a finite number >= 0 (0 = greedy), got nan"),
     (["--temperature", "inf"], "--temperature: must be a finite number >= 0 (0 = greedy), got inf"),
     (["--top-p", "1.5"], "--top-p: must be in (0, 1]"), (["--top-p", "nan"], "--top-p: must be in (0, 1]"),
     (["-n", "two"], "argument -n: invalid int value: 'two'")],
)  # fmt: skip
def test_generation_arguments(scratch, capsys, args, named):
    line = one_line(capsys, main(["generate", "runs/sft/final", "--prompt", "hi", *args]))
    assert named in line


def test_chat_arguments(scratch, capsys):
    assert "--max-new-tokens" in one_line(capsys, main(["chat", "runs/sft/final", "--max-new-tokens", "0"]))


@pytest.mark.parametrize(
    "bad,named",
    [({"chosen": ""}, "row 3: empty chosen reply"), ({"rejected": "  "}, "row 3: empty rejected reply"),
     ({"margin": float("nan")}, "row 3: 'margin' is nan"), ({"margin": "wide"}, "row 3: 'margin' must be a number")],
)  # fmt: skip
def test_preference_rows_with_empty_replies_or_bad_margins(scratch, capsys, bad, named):
    rows = [dict(r) for r in PAIRS]
    rows[2].update(bad)
    write_jsonl(scratch / "pairs.jsonl", rows)
    before = files(scratch)
    for command in ("dpo", "rm"):
        line = one_line(capsys, main([command, "--data.source", "pairs.jsonl", *QUICK[:4]]))
        assert "pairs.jsonl' " + named in line, line
    assert files(scratch) == before


def test_dpo_says_it_does_not_use_a_margin_column(scratch, capsys):
    write_jsonl(scratch / "pairs.jsonl", [dict(r, margin=1.0) for r in PAIRS])
    assert main(["dpo", "--data.source", "pairs.jsonl", *QUICK]) == 0
    assert "the rows' margin column is not used by DPO" in capsys.readouterr().out


def test_flag_values_keep_their_hyphens(scratch, capsys):
    (scratch / "my-data").mkdir()
    write_jsonl(scratch / "my-data" / "my-pairs.jsonl", PAIRS)
    args = ["dpo", "--data.source=my-data/my-pairs.jsonl", "--train.out-dir=out-dir", "--train.name", "x-y", *QUICK]
    assert main([*args, "--data.num-eval-rows", "0"]) == 0
    assert (scratch / "out-dir" / "x-y" / "final").is_dir() and not (scratch / "out_dir").exists()


def test_own_bugs_show_their_traceback_and_debug_shows_every_traceback(scratch, capsys, monkeypatch):
    import aligner.trainers.dpo

    def broken(recipe):
        raise KeyError("an internal slip")

    monkeypatch.setattr(aligner.trainers.dpo, "dpo", broken)
    assert main(["dpo", *QUICK]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError: 'an internal slip'" in err and "bug in aligner" in err.splitlines()[-1]
    monkeypatch.setenv("ALIGNER_DEBUG", "1")
    assert main(["sft", "--model.init_from", "runs/sft/final", "--data.source", "missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: data source: file 'missing.jsonl'")


# --- resume that survives damage ----------------------------------------------------------------------


def resumable(tmp_path, bases, **train):
    train = {"name": "r", "max_steps": 6, "save_every": 2, "keep_checkpoints": 3, "lr": 1e-2, **train}
    return sft_recipe(tmp_path, bases / "gpt", train=train, sft={"accuracy_items": 0, "samples": 0})


def run_losses(run: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def cut_after(run: Path, step: int) -> None:
    """The run as if killed after its step-`step` checkpoint: later checkpoints, final and metrics gone."""
    shutil.rmtree(run / "final")
    for path in run.glob("step_*"):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in rows[:step]))


@pytest.mark.parametrize("damage", ["model.safetensors", "trainer_state.pt", "manifest"])
def test_resume_skips_a_damaged_newest_checkpoint_for_the_intact_one_before(bases, tmp_path, capsys, damage):
    recipe = resumable(tmp_path, bases)
    assert main(["sft", str(recipe), "--train.name", "whole"]) == 0
    assert main(["sft", str(recipe)]) == 0
    run = tmp_path / "runs" / "r"
    cut_after(run, 4)
    newest = run / "step_000004"
    if damage == "manifest":  # a file changed after it was written, same size: only the checksum tells
        data = bytearray((newest / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (newest / "model.safetensors").write_bytes(bytes(data))
    else:
        with open(newest / damage, "r+b") as f:
            f.truncate(100)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # a line torn by the kill
    capsys.readouterr()
    assert main(["sft", str(recipe), "--resume"]) == 0
    captured = capsys.readouterr()
    assert f"--resume skips {newest}" in captured.out and "resumed from" in captured.out
    assert "step_000002 at step 2" in captured.out and "last line was cut off" in captured.err
    whole = tmp_path / "runs" / "whole"
    assert run_losses(run) == run_losses(whole)
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_changed_learning_rate_is_refused_unless_asked(bases, tmp_path, capsys):
    recipe = resumable(tmp_path, bases)
    assert main(["sft", str(recipe)]) == 0
    run = tmp_path / "runs" / "r"
    cut_after(run, 2)
    before = files(tmp_path)
    capsys.readouterr()
    line = one_line(capsys, main(["sft", str(recipe), "--resume", "--lr", "1e-3"]))
    assert "train.lr 0.01 -> 0.001" in line and "--resume-with-changes" in line
    line = one_line(capsys, main(["sft", str(recipe), "--resume", "--micro_batch_size", "2"]))
    assert "train.micro_batch_size 4 -> 2" in line
    assert files(tmp_path) == before  # refused before anything was written
    assert main(["sft", str(recipe), "--resume-with-changes", "--lr", "1e-3"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    from aligner.trainers.base import warmup_cosine

    for r in rows[2:]:  # from step 3 on, the new peak rate under the same schedule
        assert r["train/lr"] == pytest.approx(1e-3 * warmup_cosine(r["step"] - 1, 6, 1, 0.1), rel=1e-6)
    assert rows[1]["train/lr"] == pytest.approx(1e-2 * warmup_cosine(1, 6, 1, 0.1), rel=1e-6)
    change = json.loads((run / "resume_changes.jsonl").read_text())
    assert change["step"] == 2 and change["changes"] == {"train.lr": [0.01, 0.001]}
    assert "lr: 0.001" in (run / "recipe.yaml").read_text()
    assert math.isfinite(rows[-1]["train/loss"])


@pytest.mark.parametrize(
    "command,rows,named",
    [("sft", [{"prompt": "Hi?", "completion": "Hello."}, {"prompt": "Hi?", "completion": " "}],
      "row 2: message 1 is an empty assistant reply"),
     ("sft", [{"instruction": "Add 1 and 2.", "output": float("nan")}], "row 1: message 1 content must be a string"),
     ("grpo", [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "", "answer": "3"}], "row 2: empty prompt"),
     ("dpo", [{"prompt": "Hi?", "completion": "Hello.", "label": float("nan")}], "row 1: 'label' must be true")],
)  # fmt: skip
def test_empty_or_nan_fields(scratch, capsys, command, rows, named):
    write_jsonl(scratch / "rows.jsonl", rows)
    before = files(scratch)
    extra = ["--loss", "kto"] if command == "dpo" else []
    line = one_line(
        capsys, main([command, "--model.init_from", "runs/sft/final", "--data.source", "rows.jsonl", *QUICK, *extra])
    )
    assert named in line, line
    assert files(scratch) == before


@pytest.mark.parametrize(
    "argv,named",
    [(["eval", "runs/sft/final", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
     (["eval", "runs/sft/final", "--items", "-3"], "--items must be at least 1"),
     (["grpo", "--rollout.top_p", "0"], "rollout.top_p must be in (0, 1]"),
     (["dpo", "--dpo.sample_tokens", "0"], "dpo.sample_tokens must be positive")],
)  # fmt: skip
def test_sampling_settings_out_of_range(scratch, capsys, argv, named):
    before = files(scratch)
    assert named in one_line(capsys, main(argv))
    assert files(scratch) == before
