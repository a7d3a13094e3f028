"""`aligner pipeline`: a miniature run of every stage (tiny model, a few steps each), the comparison
table and report, reuse of finished stages, redo cascades, and bad pipeline files."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from aligner.cli import main
from aligner.data.world import world_rows
from aligner.evaluate import unique_rows
from aligner.pipeline import downstream, start_order, table

QUIET = {"train.precision": "fp32", "train.progress": False, "train.eval_every": 0, "train.save_every": 0}
SMALL = {**QUIET, "data.num_rows": 32, "data.num_eval_rows": 4, "train.micro_batch_size": 4, "train.max_steps": 2}


def mini_pipeline(tmp_path) -> str:
    stages = {
        "pretrain": {
            "recipe": "recipes/pretrain.yaml",
            "flags": {
                **SMALL, "data.num_rows": 200, "train.max_steps": 3, "model.hidden_size": 32, "model.num_layers": 1,
                "model.num_heads": 2, "model.num_kv_heads": 1,
                "tokenizer.vocab_size": 400, "tokenizer.train_rows": 200,
            },
        },
        "sft": {"recipe": "recipes/chat.yaml", "flags": {**SMALL, "sft.samples": 0}},
        "rm": {"recipe": "recipes/reward.yaml", "flags": SMALL},
        "dpo": {"recipe": "recipes/dpo.yaml", "flags": {**SMALL, "dpo.sample_pairs": 0}},
        "ppo": {
            "recipe": "recipes/ppo.yaml",
            "flags": {**SMALL, "ppo.rollout_prompts": 4, "rollout.max_new_tokens": 8, "ppo.ppo_epochs": 1},
        },
        "grpo": {
            "recipe": "recipes/grpo.yaml",
            "flags": {**SMALL, "grpo.num_generations": 2, "rollout.max_new_tokens": 8},
        },
        "rloo": {
            "recipe": "recipes/rloo.yaml",
            "flags": {**SMALL, "rloo.num_generations": 2, "rollout.max_new_tokens": 8},
        },
        "reinforce_pp": {"recipe": "recipes/reinforce_pp.yaml", "flags": {**SMALL, "rollout.max_new_tokens": 8}},
        "online_dpo": {"recipe": "recipes/online_dpo.yaml", "flags": {**SMALL, "rollout.max_new_tokens": 8}},
    }  # fmt: skip
    spec = {
        "out_dir": str(tmp_path / "runs"),
        "stages": stages,
        "eval": {"items": 6, "kl_items": 3, "max_new_tokens": 8},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text("# a miniature pipeline\n" + yaml.safe_dump(spec))
    return str(path)


def test_every_stage_then_the_table_and_report_then_reuse(tmp_path, capsys):
    path = mini_pipeline(tmp_path)
    assert main(["pipeline", path]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    for stage in ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "online_dpo"):
        assert (runs / stage / "final" / "config.json").is_file(), stage
    for stage in ("sft", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "online_dpo"):
        acc = json.loads((runs / stage / "accuracy.json").read_text())
        assert acc["n"] == 6 and 0 <= acc["accuracy"] <= 1
        assert f"| {stage} | {acc['accuracy']:.3f} |" in out
    assert "reward-model score" in out and "KL to SFT" in out
    report = (runs / "report" / "report.md").read_text()
    assert "| stage | held-out accuracy |" in report and (runs / "report" / "loss.png").is_file()

    assert main(["pipeline", path]) == 0  # everything exists: every stage reused, the eval rerun
    again = capsys.readouterr().out
    assert again.count("reused") == 9


def test_jobs_start_in_the_files_order_after_the_stages_they_need():
    listed = ["grpo", "pretrain", "sft", "ppo", "rm", "dpo"]
    assert start_order(listed) == ["pretrain", "sft", "grpo", "rm", "ppo", "dpo"]
    assert start_order(["dpo", "sft", "pretrain"]) == ["pretrain", "sft", "dpo"]
    assert start_order(["sft", "dpo"]) == ["sft", "dpo"]  # a stage left out (pretrain) is not waited for


def test_redo_cascades_to_the_stages_that_start_from_it():
    assert downstream({"sft"}) == {"sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "online_dpo"}
    assert downstream({"rm"}) == {"rm", "ppo"}
    assert downstream({"grpo"}) == {"grpo"}


@pytest.mark.parametrize(
    "stages, message",
    [
        ({"sft": {"recipe": "recipes/chat.yaml"}, "dpoo": {"recipe": "recipes/dpo.yaml"}}, "unknown stage 'dpoo'"),
        ({"dpo": {"recipe": "recipes/dpo.yaml"}}, "stage 'dpo' needs stage 'sft'"),
        ({"pretrain": {"recipe": "recipes/pretrain.yaml", "flagz": {}}}, "stages.pretrain.flagz'"),
        ({"pretrain": {"recipe": "recipes/pretrain.yaml", "flags": {"train.bogus": 1}}}, "stage pretrain"),
        ({"pretrain": {}}, "needs a 'recipe'"),
    ],
)
def test_bad_pipeline_files_are_one_line_errors(tmp_path, capsys, stages, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"out_dir": str(tmp_path / "runs"), "stages": stages}))
    assert main(["pipeline", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_parallel_jobs_run_in_processes_of_their_own(tmp_path, capsys):
    """`parallel: 2`: stages and evals in child processes (output in logs/), then a stage that fails in its
    process is a one-line error naming it and its log."""
    path = mini_pipeline(tmp_path)
    spec = yaml.safe_load(open(path))
    spec["parallel"] = 2
    spec["eval"].update(items=40, unique=True)  # each distinct question of the first 40 test items once
    for stage in ("rm", "ppo", "grpo"):
        del spec["stages"][stage]
    open(path, "w").write(yaml.safe_dump(spec))  # the stages listed in alphabetical order: dpo before sft
    assert main(["pipeline", path]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs"
    distinct = len(unique_rows(world_rows("rl", "test", n=40, seed=0)))
    assert "the distinct questions of 40 held-out items" in out
    assert json.loads((runs / "sft" / "accuracy.json").read_text())["n"] == distinct
    assert "2 jobs at a time" in out and "pipeline: dpo: done in" in out and "pipeline: eval dpo: done in" in out
    cores = torch.get_num_threads()  # a job that starts alone gets every core, side by side an equal share
    assert f"pipeline: pretrain: started ({cores} thread" in out and f"pipeline: sft: started ({cores} thread" in out
    assert f"pipeline: dpo: started ({max(1, cores // 2)} thread" in out
    for stage in ("sft", "dpo"):
        row = json.loads((runs / stage / "pipeline_eval.json").read_text())
        assert f"| {stage} | {row['accuracy']:.3f} |" in out
        assert (runs / "logs" / f"eval_{stage}.log").is_file()
    assert "dpo: loss sigmoid" in (runs / "logs" / "dpo.log").read_text()

    spec["stages"]["dpo"]["flags"]["data.source"] = str(tmp_path / "missing.jsonl")
    open(path, "w").write(yaml.safe_dump(spec))
    assert main(["pipeline", path, "--redo", "dpo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pipeline: dpo failed: error:" in err[0] and "missing.jsonl" in err[0], err
    assert str(runs / "logs" / "dpo.log") in err[0]


def test_table_sets_each_policy_against_sft_and_the_paired_interval():
    sft = {"stage": "sft", "accuracy": 0.5, "ci95": [0.4, 0.6], "kl": 0.0, "correct": [1, 0] * 50}
    better = [1, 1] * 40 + [1, 0] * 10  # 40 items gained, none lost: +0.4, paired +-1.96 * sqrt(40 - 16) / 100
    rows = [sft, {"stage": "grpo", "accuracy": 0.9, "ci95": [0.8, 0.95], "kl": 0.5, "correct": better},
            {"stage": "dpo", "accuracy": 0.52, "ci95": [0.42, 0.62], "kl": 0.1}]  # fmt: skip
    text = table(rows, {"sft": 60.0})
    assert "| sft | 0.500 | 0.400 - 0.600 | - | - | - | 0.000 | 1.0 min |" in text
    assert "| grpo | 0.900 | 0.800 - 0.950 | +0.400 (above +-0.100) | +0.400 (above +-0.096) |" in text
    assert "| dpo | 0.520 | 0.420 - 0.620 | +0.020 (within +-0.100) | - |" in text  # no per-item results
