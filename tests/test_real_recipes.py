"""The recipes for real models (recipes/real/) run as written with only their model and data pointed at local
copies: tiny random Qwen2 models (the architecture they name) and files shaped exactly like the Hub datasets
they read (ultrachat_200k, ultrafeedback_binarized, gsm8k), a few steps each."""

from __future__ import annotations

import json
import math

import pytest
from hub_fixtures import write_gsm8k, write_ultrachat, write_ultrafeedback
from tiny_archs import write_tiny_model

from aligner.cli import main
from aligner.config import REPO_ROOT, load_recipe

REAL = REPO_ROOT / "recipes" / "real"
SMALL = ["--train.progress", "false", "--train.precision", "fp32", "--max_steps", "2", "--data.seq_len", "160"]
SMALL += ["--train.eval_every", "2", "--train.save_every", "0"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    return {
        "qwen": write_tiny_model("qwen2", root / "Qwen2.5-0.5B-Instruct"),
        "ultrachat": write_ultrachat(root / "ultrachat_200k", n_train=12, n_test=4),
        "ultrafeedback": write_ultrafeedback(root / "ultrafeedback_binarized", n_train=12, n_test=4),
        "gsm8k": write_gsm8k(root / "gsm8k", n_train=12, n_test=4),
        "runs": root / "runs",
    }


def first_metrics(run) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])


def test_the_recipes_name_the_hub_sources_they_are_written_for():
    sft = load_recipe(REAL / "sft_qwen.yaml", command="sft")
    assert sft.model.init_from == "Qwen/Qwen2.5-0.5B-Instruct" and sft.data.source == "HuggingFaceH4/ultrachat_200k"
    assert (sft.data.split, sft.data.eval_split, sft.data.streaming) == ("train_sft", "test_sft", True)
    dpo = load_recipe(REAL / "dpo_ultrafeedback.yaml", command="dpo")
    assert dpo.data.source == "HuggingFaceH4/ultrafeedback_binarized" and dpo.data.split == "train_prefs"
    grpo = load_recipe(REAL / "grpo_gsm8k.yaml", command="grpo")
    assert (grpo.data.source, grpo.data.subset, grpo.data.columns) == ("openai/gsm8k", "main", {"question": "prompt"})
    assert grpo.grpo.rewards[0] == "math_answer"
    for recipe in (sft, dpo, grpo):  # learning rates follow the model: none is fixed in these recipes
        assert "train.lr" not in recipe.explicit


@pytest.mark.parametrize("lora", [False, True])
def test_sft_qwen_then_dpo_ultrafeedback(local, lora, capsys):
    runs, name = local["runs"], "lora" if lora else "full"
    data = ["--data.source", str(local["ultrachat"]), "--data.eval_source", str(local["ultrachat"])]
    args = [*data, "--model.init_from", str(local["qwen"]), "--train.out_dir", str(runs)]
    args += ["--train.name", f"sft_{name}"]
    args += ["--lora.enabled", str(lora).lower(), "--data.num_rows", "12", "--data.num_eval_rows", "4"]
    assert main(["sft", str(REAL / "sft_qwen.yaml"), *SMALL, *args, "--train.micro_batch_size", "2"]) == 0
    out = capsys.readouterr().out
    assert f"train.lr {2e-4 if lora else 2e-5:g}" in out and "12 conversations" in out
    recipe = load_recipe(runs / f"sft_{name}" / "final" / "recipe.yaml", command="sft")
    assert recipe.train.lr == (2e-4 if lora else 2e-5) and recipe.data.split == "train_sft"
    assert "eval/loss" in json.loads((runs / f"sft_{name}" / "metrics.jsonl").read_text().splitlines()[-1])

    data = ["--data.source", str(local["ultrafeedback"]), "--data.eval_source", str(local["ultrafeedback"])]
    args = [*data, "--model.init_from", str(runs / f"sft_{name}" / "final"), "--train.out_dir", str(runs)]
    args += ["--train.name", f"dpo_{name}", "--lora.enabled", str(lora).lower(), "--data.num_eval_rows", "4"]
    assert main(["dpo", str(REAL / "dpo_ultrafeedback.yaml"), *SMALL, *args, "--train.grad_accum", "1"]) == 0
    assert f"train.lr {5e-6 if lora else 5e-7:g}" in capsys.readouterr().out
    first = first_metrics(runs / f"dpo_{name}")
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 1


def test_grpo_gsm8k(local, capsys):
    runs = local["runs"]
    data = ["--data.source", str(local["gsm8k"]), "--data.eval_source", str(local["gsm8k"])]
    args = [*data, "--model.init_from", str(local["qwen"]), "--train.out_dir", str(runs), "--train.name", "grpo"]
    args += ["--train.micro_batch_size", "8", "--train.grad_accum", "1", "--rollout.max_new_tokens", "12"]
    args += ["--train.gradient_checkpointing", "false", "--data.num_eval_rows", "2", "--data.seq_len", "512"]
    assert main(["grpo", str(REAL / "grpo_gsm8k.yaml"), *SMALL, *args]) == 0
    out = capsys.readouterr().out
    assert "rewards math_answer, boxed_format" in out and "train.lr 1e-06" in out
    rows = [json.loads(line) for line in (runs / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"rollout/math_answer", "rollout/boxed_format", "eval/math_answer"} <= set(rows[-1])
    saved = load_recipe(runs / "grpo" / "final" / "recipe.yaml", command="grpo")
    assert saved.data.system_prompt == "gsm8k_system.txt"
