"""`aligner ppo` end to end on a tiny GPT core: reward model + reward functions, separate critic or a value
head on the policy, the KL reference (frozen copy or adapter disabled), the adaptive KL controller, and
exact resume in the middle of a rollout."""

import json

import pytest
import torch
from conftest import interrupted_copy, tiny_run_recipe
from safetensors.torch import load_file

from aligner.cli import main


def ppo_recipe(tmp_path, base, rm, **sections):
    recipe = {
        "model": {"init_from": str(base)},
        "ppo": {"reward_model": str(rm), "rollout_prompts": 8, "ppo_epochs": 2},
        "rollout": {"max_new_tokens": 10},
        "data": {"source": "world:rl", "num_rows": 32, "num_eval_rows": 4, "seq_len": 256},
        "train": {"name": "p", "lr": 1e-3, "warmup_steps": 1, "micro_batch_size": 4, "max_steps": 4},
        "sft": {"chat_template": "chatml"},
    }
    recipe["ppo"]["accuracy_items"] = 0
    return tiny_run_recipe(tmp_path, recipe, sections, "ppo.yaml")


def metrics(tmp_path, name="p"):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_ppo_trains_policy_and_value_and_saves_both(bases, reward_model, tmp_path, capsys, value_model):
    recipe = ppo_recipe(
        tmp_path,
        bases / "gpt",
        reward_model,
        ppo={"value_model": value_model, "rewards": ["format_reward"], "ppo_epochs": 1},
    )
    assert main(["ppo", str(recipe), "--train.eval_every", "4"]) == 0
    out = capsys.readouterr().out
    assert "8 prompts per rollout x 1 epochs (2 steps each)" in out and f"value model {value_model}" in out
    rows = metrics(tmp_path)
    for key in ("rollout/score_mean", "kl/mean", "kl/coef", "rollout/explained_variance", "rollout/no_eos",
                "ppo/clipfrac", "ppo/value_loss", "ppo/policy_loss", "rollout/reward_model"):  # fmt: skip
        assert key in rows[0], key
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5)  # the policy starts as its reference
    assert rows[0]["ppo/clipfrac"] == 0.0  # the first minibatch is on-policy: ratio 1
    assert rows[0]["rollout/no_eos"] == 1.0  # 10 tokens are too few for the untrained model to end a reply
    assert rows[-1]["kl/mean"] != 0  # the second rollout comes from a changed policy (k1 may be negative)
    assert "eval/score" in rows[-1] and "eval/reward_model" in rows[-1]
    final = tmp_path / "runs/p/final"
    before = load_file(bases / "gpt" / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (
        (final / "critic" / "model.safetensors").is_file()
        if value_model == "separate"
        else (final / "value_head.safetensors").is_file()
    )
    from aligner.model.load import load_model

    assert load_model(final) is not None  # the policy loads like any checkpoint


def test_lora_ppo_uses_the_adapter_disabled_reference(bases, reward_model, tmp_path, capsys):
    recipe = ppo_recipe(
        tmp_path,
        bases / "gpt",
        reward_model,
        ppo={"ppo_epochs": 1},
        lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0},
    )
    assert main(["ppo", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "ppo: LoRA" in out and "reference adapter disabled" in out
    rows = metrics(tmp_path)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl/mean"] != 0
    assert (tmp_path / "runs/p/final/adapter_model.safetensors").is_file()


def test_adaptive_kl_controller_moves_the_coefficient(bases, reward_model, tmp_path):
    """Each rollout uses the coefficient left by the one before: KL 0 < target lowers it, then KL > target
    (k3 is never negative) raises it."""
    ppo = {"kl_target": 0.001, "kl_horizon": 10, "kl_estimator": "k3"}
    recipe = ppo_recipe(tmp_path, bases / "gpt", reward_model, ppo=ppo)
    assert main(["ppo", str(recipe), "--max_steps", "12"]) == 0
    rows = metrics(tmp_path)
    coefs, kls = [r["kl/coef"] for r in rows], [r["kl/mean"] for r in rows]
    assert coefs[0] == 0.05 and kls[0] == pytest.approx(0.0, abs=1e-6)
    assert coefs[4] == pytest.approx(0.05 * (1 - 0.2 * 8 / 10))  # error clipped at -0.2, 8 prompts, horizon 10
    assert kls[4] > 0.001 and coefs[8] > coefs[4]


def test_resume_mid_rollout_is_exact(bases, reward_model, tmp_path):
    recipe = ppo_recipe(
        tmp_path, bases / "gpt", reward_model, train={"max_steps": 6, "save_every": 1, "keep_checkpoints": 10}
    )
    assert main(["ppo", str(recipe), "--train.name", "full"]) == 0
    # as after step 3: the second step of the second rollout is next
    part = interrupted_copy(tmp_path / "runs/full", tmp_path / "runs/part", 3)
    assert (part / "step_000003" / "rollout_0.pt").is_file()
    assert main(["ppo", str(recipe), "--train.name", "part", "--resume"]) == 0
    a, b = metrics(tmp_path, "full"), metrics(tmp_path, "part")
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-6)
    wa = load_file(tmp_path / "runs/full/final/model.safetensors")
    wb = load_file(tmp_path / "runs/part/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_two_processes_split_each_rollout(bases, reward_model, tmp_path):
    from conftest import launch_two_processes

    recipe = ppo_recipe(tmp_path, bases / "gpt", reward_model, ppo={"value_model": "shared"})
    proc = launch_two_processes(["ppo", str(recipe)])
    assert "(2 steps each)" in proc.stdout and proc.stdout.count("checkpoint:") == 1  # global minibatch of 8
    rows = metrics(tmp_path)
    assert len(rows) == 4 and rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5)
    assert (tmp_path / "runs/p/final/value_head.safetensors").is_file()


def test_ppo_on_a_transformers_model_with_lora(bases, reward_model, tmp_path):
    recipe = ppo_recipe(
        tmp_path, bases / "llama", reward_model, ppo={"ppo_epochs": 1}, lora={"enabled": True, "r": 4, "alpha": 8}
    )
    recipe.write_text(recipe.read_text().replace("init_from:", "arch: hf\n  init_from:", 1))
    assert main(["ppo", str(recipe)]) == 0
    rows = metrics(tmp_path)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5) and rows[-1]["kl/mean"] != 0
