"""Gradient accumulation is invisible: for every trainer at its default recipe, and for every DPO loss with
and without RPO's NLL term, micro-batch B x accumulation 1 and micro-batch B/k x accumulation k take the
same steps (fp32): the same per-step losses and the same final weights, within float rounding. Every
per-token term is normalised over the whole accumulated batch (the loop's units), never per micro-batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aligner.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--train.precision", "fp32", "--train.progress", "false", "--train.eval_every", "0"]
SMALL += ["--train.save_every", "0", "--max_steps", "2", "--train.warmup_steps", "0"]


@pytest.fixture(scope="module")
def chain(bases, tmp_path_factory):
    """The default recipes' starting points: runs/{pretrain,sft,rm}/final (tiny GPT cores)."""
    import os

    root = tmp_path_factory.mktemp("chain")
    for stage in ("pretrain", "sft"):
        shutil.copytree(bases / "gpt", root / "runs" / stage / "final")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["rm", *SMALL, "--data.num_rows", "16", "--data.num_eval_rows", "0", "--max_steps", "1"]) == 0
    finally:
        os.chdir(cwd)
    return root


def losses_and_weights(run: Path) -> tuple[list[float], dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows], load_file(run / "final" / "model.safetensors")


def same_steps(chain: Path, command: str, split: list[tuple[int, int]], args: list[str]) -> None:
    runs = []
    for mb, accum in split:
        name = f"{command}_{mb}x{accum}_{abs(hash(tuple(args))) % 10**8}"
        flags = ["--train.micro_batch_size", str(mb), "--train.grad_accum", str(accum), "--train.name", name]
        assert main([command, *SMALL, *args, *flags, "--train.out_dir", str(chain / "runs")]) == 0
        runs.append(losses_and_weights(chain / "runs" / name))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == pytest.approx(losses_b, rel=1e-6, abs=1e-6), (losses_a, losses_b)
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], atol=1e-5, rtol=0, msg=key)


@pytest.fixture
def at_chain(chain, monkeypatch):
    monkeypatch.chdir(chain)  # the default recipes start from runs/sft/final and runs/rm/final
    return chain


def test_sft_default_recipe(at_chain):
    same_steps(at_chain, "sft", [(8, 1), (2, 4)], ["--data.num_rows", "32", "--accuracy_items", "0", "--samples", "0"])


def test_rm_default_recipe(at_chain):  # center_coef, likelihood_coef 0.2 and the LM term (lm_coef 1.0)
    same_steps(at_chain, "rm", [(8, 1), (2, 4)], ["--data.num_rows", "32", "--data.num_eval_rows", "0"])


def test_dpo_default_recipe(at_chain):  # on-policy pairs (4 samples per prompt) and RPO's NLL term
    args = ["--data.num_rows", "16", "--data.num_eval_rows", "0", "--accuracy_items", "0", "--sample_tokens", "16"]
    same_steps(at_chain, "dpo", [(8, 1), (2, 4)], args)


@pytest.mark.parametrize("loss", ["sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto"])
@pytest.mark.parametrize("sft_weight", [0.0, 1.0])
def test_every_dpo_loss_with_and_without_rpo(at_chain, loss, sft_weight):
    args = ["--loss", loss, "--sft_weight", str(sft_weight), "--sample_pairs", "0", "--label_smoothing"]
    args += ["0.1" if loss in ("cdpo", "robust") else "0.0", "--beta", "2.0" if loss == "simpo" else "0.1"]
    args += ["--data.num_rows", "16", "--data.num_eval_rows", "0", "--accuracy_items", "0"]
    same_steps(at_chain, "dpo", [(8, 1), (2, 4)], args)


def test_grpo_default_recipe(at_chain):  # dapo: a token sum over the whole batch's completion tokens
    args = ["--data.num_rows", "32", "--data.num_eval_rows", "0", "--accuracy_items", "0", "--max_new_tokens", "16"]
    same_steps(at_chain, "grpo", [(16, 1), (8, 2)], args)


@pytest.mark.parametrize("flags", [["--loss_type", "grpo"], ["--loss_type", "dr_grpo"], ["--importance", "sequence"]])
def test_grpo_aggregations(at_chain, flags):  # bnpo is the micro-batch's token mean by definition: not here
    args = ["--data.num_rows", "32", "--data.num_eval_rows", "0", "--accuracy_items", "0", "--max_new_tokens", "16"]
    same_steps(at_chain, "grpo", [(16, 1), (8, 2)], [*args, *flags, "--num_iterations", "2", "--max_steps", "3"])


@pytest.mark.parametrize("command", ["rloo", "reinforce_pp", "online_dpo"])
def test_rloo_reinforce_pp_and_online_dpo_default_recipes(at_chain, command):
    args = ["--data.num_rows", "32", "--data.num_eval_rows", "0", "--accuracy_items", "0", "--max_new_tokens", "16"]
    same_steps(at_chain, command, [(16, 1), (4, 4)], args)


def test_pretrain_default_recipe(at_chain):
    args = ["--data.num_rows", "200", "--data.num_eval_rows", "0", "--tokenizer.train_rows", "200"]
    same_steps(at_chain, "pretrain", [(8, 1), (2, 4)], [*args, "--accuracy_items", "0", "--samples", "0"])


def test_ppo_default_recipe(at_chain):
    args = ["--data.num_rows", "32", "--data.num_eval_rows", "0", "--accuracy_items", "0", "--max_new_tokens", "16"]
    same_steps(at_chain, "ppo", [(8, 1), (4, 2)], [*args, "--rollout_prompts", "16"])


def test_rpo_term_of_a_one_micro_batch_step_is_trls_to_the_bit():
    """With the whole step in one micro-batch, the batch-normalised NLL term is rpo_nll's (TRL's) exactly."""
    from aligner.losses import batch_token_nll, rpo_nll

    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        lengths = torch.randint(1, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g)
        logps = -torch.rand(len(lengths), generator=g) * lengths * 3
        ours = batch_token_nll(logps, lengths, float(len(lengths)), float(lengths.sum()))[0]
        assert torch.equal(ours, rpo_nll(logps, lengths)[0])
