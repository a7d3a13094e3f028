"""`aligner rloo`, `aligner reinforce_pp` and `aligner online_dpo` end to end on a tiny GPT core: the first
step's loss where it is known exactly, their metrics, the reference (frozen copy or adapter disabled), a
transformers model, exact resume and bad input."""

import json
import math

import pytest
import torch
from conftest import interrupted_copy, tiny_run_recipe
from safetensors.torch import load_file

from aligner.cli import main
from aligner.data.collate import share_prompts

# an untrained model gets no reward from the answer checker; a reward that varies within groups gives signal
ID_REWARD = (
    "def low_ids(prompts, completions, completion_ids, **row):\n    return [-sum(c) / 1000 for c in completion_ids]\n"
    "def flat(prompts, completions, **row):\n    return [0.5] * len(completions)\n"
)


@pytest.fixture
def id_reward(tmp_path, monkeypatch):
    (tmp_path / "variant_reward.py").write_text(ID_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "variant_reward:low_ids"


def recipe_of(tmp_path, base, name, **sections):
    recipe = {
        "model": {"init_from": str(base)},
        name: {"accuracy_items": 0},
        "rollout": {"max_new_tokens": 12},
        "data": {"source": "world:rl", "num_rows": 32, "num_eval_rows": 4, "seq_len": 256},
        "train": {"name": name, "lr": 1e-2, "warmup_steps": 1, "micro_batch_size": 8, "max_steps": 2},
        "sft": {"chat_template": "chatml"},
    }
    for key, value in sections.pop(name, {}).items():
        recipe[name][key] = value
    return tiny_run_recipe(tmp_path, recipe, sections, f"{name}.yaml")


def metrics(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def moved(base, run):
    before, after = load_file(base / "model.safetensors"), load_file(run / "final/model.safetensors")
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_rloo_runs_and_its_first_loss_is_minus_the_mean_advantage(bases, tmp_path, capsys, id_reward):
    recipe = recipe_of(tmp_path, bases / "gpt", "rloo", rloo={"rewards": [id_reward], "mask_truncated": False})
    assert main(["rloo", str(recipe), "--num_generations", "4"]) == 0
    assert "2 prompts x 4 per rollout" in capsys.readouterr().out
    rows = metrics(tmp_path, "rloo")
    # ratio 1 at one pass per rollout: the loss is -mean(A), and leave-one-out advantages sum to 0 per group
    assert rows[0]["train/loss"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["rloo/clip_ratio"] == 0.0 and "rollout/zero_std_groups" in rows[0]
    assert "eval/reward_mean" in rows[-1]
    assert moved(bases / "gpt", tmp_path / "runs/rloo")


@pytest.mark.parametrize("lora", [False, True])
def test_rloo_kl_to_the_reference_starts_at_zero(bases, tmp_path, capsys, id_reward, lora):
    recipe = recipe_of(
        tmp_path, bases / "gpt", "rloo", rloo={"rewards": [id_reward], "beta": 0.1}, lora={"enabled": lora}
    )
    assert main(["rloo", str(recipe), "--max_steps", "1"]) == 0
    assert ("adapter disabled" if lora else "frozen copy") in capsys.readouterr().out
    assert metrics(tmp_path, "rloo")[0]["kl/mean"] == pytest.approx(0.0, abs=1e-4)


def test_reinforce_pp_runs_with_its_token_kl_and_normalised_advantages(bases, tmp_path, capsys, id_reward):
    recipe = recipe_of(
        tmp_path, bases / "gpt", "reinforce_pp", reinforce_pp={"rewards": [id_reward], "mask_truncated": False}
    )
    assert main(["reinforce_pp", str(recipe)]) == 0
    assert "8 prompts x 1 per rollout" in capsys.readouterr().out
    rows = metrics(tmp_path, "reinforce_pp")
    # ratio 1: the loss is -(token mean of A), and A is normalised to mean 0 over the rollout's tokens
    assert rows[0]["train/loss"] == pytest.approx(0.0, abs=1e-5)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-4)  # policy = reference at the first rollout
    assert rows[1]["kl/mean"] != 0.0 and "reinforce_pp/clipfrac" in rows[0]
    assert moved(bases / "gpt", tmp_path / "runs/reinforce_pp")


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp"])
def test_completions_sharing_their_prompt_take_the_padded_steps(bases, tmp_path, id_reward, monkeypatch, name):
    """`rollout.share_prompts` (each group's prompt once per document of its completions) gives the padded
    batch's log-probs: the same steps, with its KL to a frozen reference."""
    import aligner.trainers.groups as groups

    calls = []
    monkeypatch.setattr(groups, "share_prompts", lambda *a: calls.append(a[2]) or share_prompts(*a))
    kl = {"rloo": "beta", "reinforce_pp": "kl_coef"}[name]
    section = {"rewards": [id_reward], "mask_truncated": False, "num_iterations": 2, kl: 0.1}
    for run, share in (("shared", True), ("padded", False)):
        recipe = recipe_of(
            tmp_path, bases / "gpt", name, **{name: section}, rollout={"share_prompts": share}, train={"name": run}
        )
        assert main([name, str(recipe), "--num_generations", "4", "--max_steps", "4"]) == 0
        assert bool(calls) == share
        calls.clear()
    a, b = metrics(tmp_path, "shared"), metrics(tmp_path, "padded")
    for key in ("train/loss", "train/grad_norm", "kl/mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=2e-6), key  # loss ~0: rounding


@pytest.mark.parametrize("name,tied", [("rloo", "2 of 2 groups"), ("reinforce_pp", "the 8 completions")])
def test_a_rollout_whose_rewards_all_tie_is_named_with_its_counts(bases, tmp_path, capsys, id_reward, name, tied):
    section = {"rewards": ["variant_reward:flat"], "mask_truncated": False}
    recipe = recipe_of(tmp_path, bases / "gpt", name, **{name: section})
    assert main([name, str(recipe), "--num_generations", "4", "--max_steps", "1"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{name}: step 1 had no gradient from its rewards: {tied} had equal rewards and " in err, err
    assert "of 8 completions hit max_new_tokens (12); reward means: variant_reward:flat 0.50" in err
    assert metrics(tmp_path, name)[0]["rollout/learning"] == 0


def test_reinforce_pp_resume_is_exact(bases, tmp_path, id_reward):
    common = {"rewards": [id_reward], "num_iterations": 2, "mask_truncated": False}
    recipe = recipe_of(
        tmp_path, bases / "gpt", "reinforce_pp", reinforce_pp=common, train={"max_steps": 4, "save_every": 1}
    )
    assert main(["reinforce_pp", str(recipe), "--train.name", "full"]) == 0
    # the run as it stood after step 3, in the middle of its second rollout
    part = interrupted_copy(tmp_path / "runs/full", tmp_path / "runs/part", 3)
    assert (part / "step_000003" / "rollout_0.pt").is_file()
    assert main(["reinforce_pp", str(recipe), "--train.name", "part", "--resume"]) == 0
    a, b = metrics(tmp_path, "full"), metrics(tmp_path, "part")
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-6)
    wa = load_file(tmp_path / "runs/full/final/model.safetensors")
    wb = load_file(tmp_path / "runs/part/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_online_dpo_starts_at_log_2_and_pairs_best_with_worst(bases, tmp_path, capsys, id_reward):
    recipe = recipe_of(tmp_path, bases / "gpt", "online_dpo", online_dpo={"rewards": [id_reward]})
    assert main(["online_dpo", str(recipe), "--beta", "0.5", "--train.grad_accum", "2"]) == 0
    out = capsys.readouterr().out
    assert "16 prompts x 2 samples per step" in out and "beta 0.5 (reference frozen copy)" in out
    rows = metrics(tmp_path, "online_dpo")
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference
    assert rows[0]["rollout/pairs"] > 0 and rows[0]["rollout/reward_gap"] > 0
    assert moved(bases / "gpt", tmp_path / "runs/online_dpo")


def test_online_dpo_with_lora_and_tied_groups_only(bases, tmp_path, capsys):
    # an untrained model never answers right: every group ties, no pair, no update, and no crash
    recipe = recipe_of(
        tmp_path, bases / "gpt", "online_dpo", online_dpo={"rewards": ["correct_answer"]}, lora={"enabled": True}
    )
    assert main(["online_dpo", str(recipe), "--max_steps", "1"]) == 0
    assert "adapter disabled" in capsys.readouterr().out
    assert metrics(tmp_path, "online_dpo")[0]["rollout/pairs"] == 0.0


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp", "online_dpo"])
def test_on_a_transformers_model(bases, tmp_path, id_reward, name):
    recipe = recipe_of(tmp_path, bases / "llama", name, **{name: {"rewards": [id_reward]}})
    recipe.write_text(recipe.read_text().replace("init_from:", "arch: hf\n  init_from:"))
    assert main([name, str(recipe), "--max_steps", "1"]) == 0
    assert (tmp_path / "runs" / name / "final" / "config.json").is_file()


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("rloo", ["--num_generations", "3"], "multiple of rloo.num_generations"),
        ("rloo", ["--num_generations", "1"], "rloo.num_generations must be at least 2"),
        ("reinforce_pp", ["--gamma", "0"], "reinforce_pp.gamma must be in (0, 1]"),
        ("online_dpo", ["--loss", "simpo"], "online_dpo.loss"),
    ],
)
def test_bad_settings_are_one_line_errors(bases, tmp_path, capsys, name, flags, message):
    recipe = recipe_of(tmp_path, bases / "gpt", name)
    assert main([name, str(recipe), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
