"""Two CPU processes (gloo) with DDP, FSDP2 (weights, gradients and optimizer state sharded) and DeepSpeed ZeRO-3
(partitioned by DeepSpeed's engine, through recipes/accelerate/zero3.yaml): sft, dpo and the reward model take
the steps of one process with the same global batch, checkpoint, resume exactly after a kill, and leave a final
checkpoint that transformers loads; GRPO and PPO take the steps of DDP under FSDP2 and ZeRO-3. FSDP2
is asked for as an FSDP config file asks for it (ACCELERATE_USE_FSDP, FSDP_VERSION=2); accelerate shards only on
accelerators, so on CPUs the loop does."""

import json

import pytest
import torch
from conftest import grpo_recipe, interrupted_copy, launch_two_processes, tiny_run_recipe
from safetensors.torch import load_file

from aligner.cli import main

FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


def recipe_of(tmp_path, base, command, lora=False):
    data = {"sft": "world:sft", "dpo": "world:preference", "rm": "world:preference"}[command]
    section = {"chat_template": "chatml"}
    section.update({"sft": {"samples": 0, "accuracy_items": 0}, "rm": {}}.get(command, {}))
    section.update({"sample_pairs": 0, "sft_weight": 0.0, "accuracy_items": 0} if command == "dpo" else {})
    recipe = {
        "model": {"init_from": str(base)},
        command: section,
        "data": {"source": data, "num_rows": 32, "num_eval_rows": 4, "seq_len": 256},
        "train": {"name": "one", "lr": 1e-2, "max_steps": 3, "micro_batch_size": 4, "save_every": 1},
    }
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0}} if lora else {}
    return tiny_run_recipe(tmp_path, recipe, lora, f"{command}.yaml")


def steps(run):
    return [(r["train/loss"], r["train/grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").open())]


@pytest.mark.parametrize(
    ("command", "mode"),
    [
        ("sft", "ddp"),
        ("sft", "fsdp2"),
        ("sft-lora", "fsdp2"),
        ("dpo", "ddp"),
        ("dpo", "fsdp2"),
        ("rm", "fsdp2"),
        ("sft", "zero3"),
        ("sft-lora", "zero3"),
        ("dpo", "zero3"),
        ("rm", "zero3"),
    ],
)
def test_two_processes_take_one_process_steps_and_resume_exactly(bases, tmp_path, command, mode):
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    env = FSDP2 if mode == "fsdp2" else {}
    config = "recipes/accelerate/zero3.yaml" if mode == "zero3" else None
    command, lora = command.removesuffix("-lora"), command.endswith("-lora")  # LoRA: its adapters sharded
    recipe = recipe_of(tmp_path, bases / "gpt", command, lora)
    runs = tmp_path / "runs"
    assert main([command, str(recipe)]) == 0  # one process, micro-batch 4
    # under DeepSpeed also with accumulation: micro-batches of 1, two per step (the engine's boundary)
    batch = ["--micro_batch_size", "1", "--grad_accum", "2"] if mode == "zero3" else ["--micro_batch_size", "2"]
    if mode == "zero3" and command == "dpo":  # the reference's log-probs from its partitions, cached before step 1
        batch.append("--precompute_ref")
    proc = launch_two_processes([command, str(recipe), *batch, "--train.name", "two"], env, config)
    if command == "dpo" and not lora:
        assert ("reference precomputed" if mode == "zero3" else "reference frozen copy") in proc.stdout
    (a, ga), *later_one = steps(runs / "one")
    (b, gb), *later_two = steps(runs / "two")
    assert b == pytest.approx(a, abs=1e-6) and gb == pytest.approx(ga, rel=1e-5)  # the first step: equal
    for (a, ga), (b, gb) in zip(later_one, later_two, strict=True):  # then to the rounding of the reductions
        assert b == pytest.approx(a, abs=1e-4) and gb == pytest.approx(ga, rel=1e-3)
    if mode == "fsdp2":  # every process's shards of the weights and of AdamW's moments
        assert sorted(p.name for p in (runs / "two/step_000003/sharded").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    if mode == "zero3":  # DeepSpeed's partitions of the weights and of AdamW's moments, one file per process
        files = sorted(p.name for p in (runs / "two/step_000003/sharded/zero").glob("*optim_states.pt"))
        assert len(files) == 2 and "rank_0" in files[0] and "rank_1" in files[1]

    part = interrupted_copy(runs / "two", runs / "part", 2)  # killed after step 2
    args = [command, str(recipe), *batch, "--train.name", "part", "--resume"]
    proc = launch_two_processes(args, env, config)
    assert "resumed from" in proc.stdout and "step_000002" in proc.stdout
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(runs / "two/final" / weights), load_file(part / "final" / weights)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    if lora:  # the adapter on its base, as every command loads it
        from aligner.model.load import load_model

        assert load_model(str(part / "final")) is not None
        return
    import transformers

    auto = transformers.AutoModelForSequenceClassification if command == "rm" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(part / "final")
    assert torch.equal(model.model.embed_tokens.weight, b["model.embed_tokens.weight"])


# the online trainers' two-process runs: 3 steps of 4 completions per process, checkpoints every step, an eval at 2
TWO_PROCESS_RUN = {"name": "ddp", "max_steps": 3, "micro_batch_size": 4, "save_every": 1, "eval_every": 2}


def same_logged_steps(runs, *keys, other="fsdp2"):
    """The `other` (sharded) run's logged `keys` are the DDP run's at each of its 3 steps (to float rounding),
    and the last key (an eval) was logged at step 2."""
    ddp, sharded = ([{k: r.get(k) for k in keys} for r in map(json.loads, (runs / n / "metrics.jsonl").open())]
                    for n in ("ddp", other))  # fmt: skip
    assert len(ddp) == len(sharded) == 3 and ddp[1][keys[-1]] is not None
    for a, b in zip(ddp, sharded):
        assert a.keys() == b.keys() and all(
            b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6) for k in a if a[k] is not None
        )


def test_grpo_under_fsdp2_takes_the_steps_of_ddp_and_resumes_exactly(bases, tmp_path, id_reward):
    """The online trainers generate on a full copy of the policy, refreshed from the shards after every step;
    the frozen reference is sharded. Two processes sample what they sample under DDP (the same seeds), so
    the FSDP2 run's steps are the DDP run's, evals included."""
    grpo = {"rewards": [id_reward], "mask_truncated": False, "num_iterations": 2, "beta": 0.05}
    path = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={**TWO_PROCESS_RUN, "warmup_steps": None})
    runs = tmp_path / "runs"
    launch_two_processes(["grpo", str(path)])
    launch_two_processes(["grpo", str(path), "--train.name", "fsdp2"], FSDP2)
    same_logged_steps(runs, "train/loss", "train/grad_norm", "grpo/kl", "rollout/reward_mean", "eval/reward_mean")
    part = interrupted_copy(runs / "fsdp2", runs / "part", 2)  # killed after step 2: in its second rollout
    launch_two_processes(["grpo", str(path), "--train.name", "part", "--resume"], FSDP2)
    a, b = load_file(runs / "fsdp2/final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("value_model", "mode"), [("separate", "fsdp2"), ("shared-lora", "fsdp2"), ("separate", "zero3")]
)
def test_ppo_sharded_takes_the_steps_of_ddp_and_resumes_exactly(
    bases, tmp_path, id_reward, reward_model, value_model, mode
):
    """PPO shards its policy and its value model (a critic of its own, or a head on a LoRA policy whose
    reference is the policy with its adapter disabled) as units of their own under FSDP2, DeepSpeed
    partitions both, and its reward model like them; rollouts come from a full copy of the policy. The
    sharded run's steps are the DDP run's, evals of 5 prompts included (3 and 2 per process, the reward
    model in step on both), and a run killed in the middle of a rollout resumes to the same final weights."""
    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    launch = {"config": "recipes/accelerate/zero3.yaml"} if mode == "zero3" else {"env": FSDP2}
    lora = value_model == "shared-lora"
    ppo = {"reward_model": str(reward_model), "rewards": [id_reward], "rollout_prompts": 8, "ppo_epochs": 2,
           "accuracy_items": 0, "value_model": "shared" if lora else "separate"}  # fmt: skip
    recipe = {
        "model": {"init_from": str(bases / "gpt")},
        "ppo": ppo,
        "rollout": {"max_new_tokens": 12},
        "sft": {"chat_template": "chatml"},
        "data": {"source": "world:rl", "num_rows": 32, "num_eval_rows": 5, "seq_len": 256},
        "train": {"lr": 1e-2, **TWO_PROCESS_RUN},
    }
    extra = {"lora": {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0}} if lora else {}
    path = tiny_run_recipe(tmp_path, recipe, extra, "ppo.yaml")
    runs = tmp_path / "runs"
    launch_two_processes(["ppo", str(path)])
    launch_two_processes(["ppo", str(path), "--train.name", mode], **launch)
    same_logged_steps(
        runs, "train/loss", "train/grad_norm", "ppo/value_loss", "kl/mean", "rollout/reward_model", "eval/score",
        other=mode,
    )  # fmt: skip
    if mode == "fsdp2":
        shards = sorted(p.name for p in (runs / "fsdp2/step_000003/sharded").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"]  # policy and value model sharded
    else:  # DeepSpeed's partitions, one file of AdamW's moments per process
        assert len(list((runs / "zero3/step_000003/sharded/zero").glob("*optim_states.pt"))) == 2
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    value = "value_head.safetensors" if lora else "critic/model.safetensors"
    for name in (weights, value):  # the gathered final checkpoint: the DDP run's weights
        a, b = load_file(runs / "ddp/final" / name), load_file(runs / mode / "final" / name)
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    if lora:
        return
    part = interrupted_copy(runs / mode, runs / "part", 1)  # killed after step 1: inside its first rollout
    launch_two_processes(["ppo", str(path), "--train.name", "part", "--resume"], **launch)
    for name in (weights, value):
        a, b = load_file(runs / mode / "final" / name), load_file(part / "final" / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_grpo_under_deepspeed_takes_the_steps_of_ddp_and_resumes_exactly(bases, tmp_path, id_reward):
    """Under ZeRO-3 each process samples from a full copy of the policy, gathered from DeepSpeed's partitions
    one module at a time after every step: the steps are the DDP run's (same seeds, same samples), and a run
    killed in the middle of a rollout resumes to the same final weights."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    grpo = {"rewards": [id_reward], "mask_truncated": False, "num_iterations": 2, "beta": 0.05}
    path = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={**TWO_PROCESS_RUN, "warmup_steps": None})
    runs = tmp_path / "runs"
    launch_two_processes(["grpo", str(path)])
    proc = launch_two_processes(["grpo", str(path), "--train.name", "zero3"], config="recipes/accelerate/zero3.yaml")
    assert "reference frozen copy, partitioned by ZeRO-3" in proc.stdout
    same_logged_steps(
        runs, "train/loss", "train/grad_norm", "grpo/kl", "rollout/reward_mean", "eval/reward_mean", other="zero3"
    )
    assert len(list((runs / "zero3/step_000003/sharded/zero").glob("*optim_states.pt"))) == 2  # partitioned
    part = interrupted_copy(runs / "zero3", runs / "part", 2)  # killed after step 2: in its second rollout
    argv = ["grpo", str(path), "--train.name", "part", "--resume"]
    launch_two_processes(argv, config="recipes/accelerate/zero3.yaml")
    a, b = load_file(runs / "zero3/final/model.safetensors"), load_file(part / "final/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["fsdp2", "zero3"])
def test_sharded_pretrain_and_sft_end_with_samples_of_the_gathered_weights(bases, tmp_path, mode):
    """What the main process runs alone after training (pretrain's samples, SFT's held-out accuracy) runs on
    the gathered final weights where the model is sharded, whose forward needs every process."""
    from test_pretrain_cli import tiny_recipe

    if mode == "zero3":
        pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    launch = {"config": "recipes/accelerate/zero3.yaml"} if mode == "zero3" else {"env": FSDP2}
    recipe = tiny_recipe(tmp_path, train={"max_steps": 2, "save_every": 0, "eval_every": 0})
    proc = launch_two_processes(["pretrain", str(recipe)], **launch)
    assert proc.stdout.count("--- sample") == 1
    sft = recipe_of(tmp_path, bases / "gpt", "sft")
    proc = launch_two_processes(["sft", str(sft), "--sft.accuracy_items", "4", "--max_steps", "1"], **launch)
    assert "held-out accuracy" in proc.stdout and "4 items" in proc.stdout
