"""`aligner grpo` end to end on a tiny GPT core: rollouts, rewards, metrics, several optimisation passes
per rollout, the KL reference (frozen copy or adapter disabled), exact resume, and bad inputs."""

import json
import math
import shutil

import pytest
import torch
from conftest import grpo_recipe, interrupted_copy
from safetensors.torch import load_file

from aligner.cli import main
from aligner.data.collate import share_prompts
from aligner.trainers.grpo import informative_first


def metrics(tmp_path, name="g"):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_logs_rollout_metrics_and_updates_weights(bases, tmp_path, capsys, id_reward):
    recipe = grpo_recipe(
        tmp_path,
        bases / "gpt",
        grpo={"rewards": [id_reward, "correct_answer"], "mask_truncated": False, "loss_type": "grpo"},
    )
    assert main(["grpo", str(recipe), "--train.eval_every", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 prompts x 4 per rollout" in out and "rewards id_reward:low_ids, correct_answer" in out
    rows = metrics(tmp_path)
    for key in ("rollout/reward_mean", "rollout/completion_len", "rollout/truncated", "rollout/zero_std_groups"):
        assert key in rows[0]
    assert "rollout/id_reward:low_ids" in rows[0] and "grpo/clip_ratio" in rows[0]
    # one pass per rollout: ratio 1, so the grpo loss is -mean(A) over sequences, 0 for group-centred A
    assert rows[0]["train/loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[0]["grpo/clip_ratio"] == 0.0
    assert "eval/reward_mean" in rows[-1] and "eval/correct_answer" in rows[-1]
    before = load_file(bases / "gpt" / "model.safetensors")
    after = load_file(tmp_path / "runs/g/final/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_several_passes_recompute_old_logps_and_first_pass_equals_one_pass(bases, tmp_path, id_reward):
    """The first step of a rollout has ratio 1 whether or not old log-probs were recomputed, so a run with
    two passes per rollout takes the same first step as a run with one; its second step reuses the rollout."""
    common = {"rewards": [id_reward], "mask_truncated": False}
    one = grpo_recipe(tmp_path, bases / "gpt", grpo=common, train={"name": "one", "max_steps": 1})
    assert main(["grpo", str(one)]) == 0
    two = grpo_recipe(tmp_path, bases / "gpt", grpo={**common, "num_iterations": 2}, train={"name": "two"})
    assert main(["grpo", str(two), "--max_steps", "2"]) == 0
    a, b = metrics(tmp_path, "one"), metrics(tmp_path, "two")
    assert b[0]["train/grad_norm"] == pytest.approx(a[0]["train/grad_norm"], rel=1e-4)
    assert b[1]["rollout/reward_mean"] == b[0]["rollout/reward_mean"]  # the same rollout, reused
    assert b[1]["train/loss"] != pytest.approx(0.0, abs=1e-9)  # the policy moved: ratio != 1


def test_skipping_zero_advantage_completions_leaves_the_steps_unchanged(bases, tmp_path, id_reward):
    """Completions of a group with equal rewards (advantage exactly 0) add nothing to the loss or its
    gradient: left out of the forward and backward, the run takes the same steps."""
    grpo = {"rewards": ["id_reward:some_flat"], "mask_truncated": False, "num_iterations": 2}
    for name, skip in (("skip", True), ("all", False)):
        recipe = grpo_recipe(tmp_path, bases / "gpt", grpo={**grpo, "skip_zero_advantage": skip}, train={"name": name})
        assert main(["grpo", str(recipe), "--max_steps", "6"]) == 0
    a, b = metrics(tmp_path, "skip"), metrics(tmp_path, "all")
    assert sum(r["rollout/skipped"] for r in a) > 0 and all(r["rollout/skipped"] == 0 for r in b)
    assert [r["rollout/zero_std_groups"] for r in a] == [r["rollout/zero_std_groups"] for r in b]
    assert [r["train/grad_norm"] for r in a] == pytest.approx([r["train/grad_norm"] for r in b], rel=1e-4)
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-7)
    wa, wb = (load_file(tmp_path / f"runs/{n}/final/model.safetensors") for n in ("skip", "all"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)  # batch shapes differ: rounding, via Adam


def test_compiled_rollouts_take_the_same_steps(bases, tmp_path, id_reward, monkeypatch):
    """rollout.compile: the torch engine's compiled decoding step samples the same completions from
    the same seeds (its logits differ from eager ones by rounding only), so the run takes the same steps."""
    import aligner.rollout.torch_engine as te

    calls, real = [], te.compiled_decode_step
    monkeypatch.setattr(te, "compiled_decode_step", lambda: (calls.append(1), real())[1])
    for name, compiled in (("eager", False), ("compiled", True)):
        calls.clear()
        grpo = {"rewards": [id_reward], "mask_truncated": False}
        recipe = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, rollout={"compile": compiled}, train={"name": name})
        assert main(["grpo", str(recipe), "--max_steps", "3"]) == 0
        assert bool(calls) == compiled  # the compiled step decoded only when asked
    a, b = metrics(tmp_path, "eager"), metrics(tmp_path, "compiled")
    assert [r["rollout/completion_len"] for r in a] == [r["rollout/completion_len"] for r in b]
    assert [r["rollout/reward_mean"] for r in a] == pytest.approx([r["rollout/reward_mean"] for r in b], abs=1e-6)
    assert [r["train/grad_norm"] for r in a] == pytest.approx([r["train/grad_norm"] for r in b], rel=1e-4)


def test_informative_first_by_hand():
    grouped = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.5, 0.5], [2.0, 0.0], [0.0, 0.0]])
    assert informative_first(grouped, 2) == [1, 3]  # the two whose rewards differ
    assert informative_first(grouped, 3) == [0, 1, 3]  # too few differ: the first equal-reward group fills in
    assert informative_first(grouped, 5) == [0, 1, 2, 3, 4]


def test_oversampling_trains_on_groups_whose_rewards_differ(bases, tmp_path, capsys, id_reward):
    """grpo.oversample 3: each rollout samples 6 prompts and trains on 2 of them, those whose rewards
    differ, so no trained completion has advantage 0 whenever two such groups were sampled."""
    grpo = {"rewards": ["id_reward:some_flat"], "mask_truncated": False, "oversample": 3}
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo)
    assert main(["grpo", str(recipe), "--max_steps", "6"]) == 0
    assert "2 prompts (the most informative of 6) x 4 per rollout" in capsys.readouterr().out
    rows = metrics(tmp_path)
    informative = [round((1 - r["rollout/zero_std_groups"]) * 6) for r in rows]
    assert 0 < max(informative) < 6  # some sampled groups have equal rewards, some do not
    for n, r in zip(informative, rows):  # equal-reward groups fill in only when fewer than 2 differ
        assert r["rollout/skipped"] == {0: 7 / 8, 1: 4 / 8}.get(n, 0.0)  # (with none, 1 of the 8 stays)
    bad = grpo_recipe(tmp_path, bases / "gpt", grpo={**grpo, "oversample": 0}, train={"name": "bad"})
    assert main(["grpo", str(bad)]) == 2
    assert "grpo.oversample must be 1 or more" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_reference_starts_at_zero(bases, tmp_path, capsys, id_reward, lora):
    lora_cfg = {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0}
    recipe = grpo_recipe(
        tmp_path, bases / "gpt", grpo={"rewards": [id_reward], "beta": 0.1, "mask_truncated": False}, lora=lora_cfg
    )
    assert main(["grpo", str(recipe)]) == 0
    assert ("reference adapter disabled" if lora else "reference frozen copy") in capsys.readouterr().out
    rows = metrics(tmp_path)
    assert rows[0]["grpo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["grpo/kl"] > 0


def test_resume_is_exact(bases, tmp_path, id_reward):
    grpo = {"rewards": [id_reward], "num_iterations": 2, "mask_truncated": False}
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={"max_steps": 4, "save_every": 1})
    assert main(["grpo", str(recipe), "--train.name", "full"]) == 0
    # the run as it stood after step 3, in the middle of its second rollout
    part = interrupted_copy(tmp_path / "runs/full", tmp_path / "runs/part", 3)
    assert (part / "step_000003" / "rollout_0.pt").is_file()
    assert main(["grpo", str(recipe), "--train.name", "part", "--resume"]) == 0
    a, b = metrics(tmp_path, "full"), metrics(tmp_path, "part")
    assert [r["train/loss"] for r in a] == pytest.approx([r["train/loss"] for r in b], abs=1e-6)
    wa = load_file(tmp_path / "runs/full/final/model.safetensors")
    wb = load_file(tmp_path / "runs/part/final/model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_equal_rewards_give_zero_advantages_not_nan(bases, tmp_path):
    """An untrained model never answers right: every group's rewards are equal (0), so no signal and no NaN."""
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo={"rewards": ["correct_answer"], "mask_truncated": False})
    assert main(["grpo", str(recipe)]) == 0
    rows = metrics(tmp_path)
    assert rows[0]["rollout/zero_std_groups"] == 1.0 and rows[0]["train/loss"] == 0.0


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_bad_inputs_are_one_line_errors(bases, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad_reward.py").write_text("def short(prompts, completions, **row):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo={"rewards": ["bad_reward:short"]})
    assert main(["grpo", str(recipe)]) == 2
    assert "reward function 'bad_reward:short' returned 1 values for 8 completions" in one_line_error(capsys)

    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo={"rewards": ["nope"]})
    assert main(["grpo", str(recipe), "--train.name", "x"]) == 2
    assert "unknown reward function 'nope'" in one_line_error(capsys)

    recipe = grpo_recipe(tmp_path, bases / "gpt", data={"seq_len": 20})
    assert main(["grpo", str(recipe), "--train.name", "y"]) == 2
    assert "every prompt is longer than" in one_line_error(capsys)

    recipe = grpo_recipe(tmp_path, bases / "gpt", train={"micro_batch_size": 6})
    assert main(["grpo", str(recipe), "--train.name", "z"]) == 2
    assert "must be a multiple of grpo.num_generations" in one_line_error(capsys)
    assert not (tmp_path / "runs" / "z").exists()


def test_a_step_whose_completions_are_all_truncated_skips_its_update(bases, tmp_path, id_reward):
    """mask_truncated: completions that never stop carry no loss; a step with only those changes nothing."""
    grpo = {"rewards": [id_reward]}
    rollout = {"max_new_tokens": 1}  # one token: a reply that ends needs <|im_end|> first
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, rollout=rollout, train={"max_steps": 1})
    assert main(["grpo", str(recipe)]) == 0
    row = metrics(tmp_path)[0]
    assert row["rollout/truncated"] == 1.0 and row["train/loss"] == 0.0 and row["train/grad_norm"] == 0.0
    before = load_file(bases / "gpt" / "model.safetensors")
    after = load_file(tmp_path / "runs/g/final/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_two_processes_split_each_rollout(bases, tmp_path, id_reward):
    """accelerate launch, 2 CPU processes: each samples half of the rollout's prompts; metrics are averaged."""
    from conftest import launch_two_processes

    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo={"rewards": [id_reward], "mask_truncated": False})
    proc = launch_two_processes(["grpo", str(recipe)])
    assert "4 prompts x 4 per rollout" in proc.stdout and proc.stdout.count("checkpoint:") == 1
    rows = metrics(tmp_path)
    assert len(rows) == 3 and all(r["train/tokens"] > 0 and "rollout/reward_mean" in r for r in rows)


def test_grpo_on_a_transformers_model(bases, tmp_path, id_reward):
    """model.arch hf: rollouts decode the Llama through the GPT core over its own parameters, the loss
    runs the transformers model; both see every update."""
    recipe = grpo_recipe(
        tmp_path, bases / "llama", grpo={"rewards": [id_reward], "mask_truncated": False, "num_iterations": 2}
    )
    recipe.write_text(recipe.read_text().replace("init_from:", "arch: hf\n  init_from:"))
    assert main(["grpo", str(recipe)]) == 0
    rows = metrics(tmp_path)
    assert len(rows) == 3 and rows[1]["train/loss"] != 0.0
    assert (tmp_path / "runs/g/final/model.safetensors").is_file()


def test_a_tokenizer_without_any_stop_token_is_an_error(bases, tmp_path, capsys):
    """A template that closes turns with plain text and a tokenizer without EOS: completions could never stop."""
    from aligner.model.load import load_tokenizer

    base = tmp_path / "base"
    shutil.copytree(bases / "gpt", base)
    tok = load_tokenizer(base)
    tok.eos_token = None
    tok.save_pretrained(base)
    template = tmp_path / "plain.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    recipe = grpo_recipe(tmp_path, base, sft={"chat_template": str(template)})
    assert main(["grpo", str(recipe)]) == 2
    assert "no end-of-turn or EOS token" in one_line_error(capsys)
    assert not (tmp_path / "runs" / "g").exists()


def test_sampler_mismatch_is_logged_and_truncated_importance_sampling_runs(bases, tmp_path, id_reward):
    """The torch engine samples from the policy itself: its log-probs match the trainer's to rounding, so
    the mismatch is ~0 and every importance weight ~1 (none capped); with the cap the step is the same."""
    grpo = {"rewards": [id_reward], "mask_truncated": False}
    plain = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={"name": "plain", "max_steps": 1})
    assert main(["grpo", str(plain)]) == 0
    tis = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={"name": "tis", "max_steps": 1})
    assert main(["grpo", str(tis), "--rollout.tis_cap", "2"]) == 0
    a, b = metrics(tmp_path, "plain")[0], metrics(tmp_path, "tis")[0]
    assert 0 <= a["grpo/mismatch_kl"] < 1e-4 and a["grpo/mismatch_max"] < 1e-2
    assert b["grpo/tis_capped"] == 0.0
    assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)


def test_rollouts_sample_in_bf16_when_training_runs_under_bf16(bases, tmp_path, id_reward):
    """rollout.dtype auto: the torch engine samples in bf16 under bf16 autocast (a bf16 copy of the weights),
    else in the weights' own precision; a bf16 run's sampler stays close to its trainer (mismatch logged)."""
    from types import SimpleNamespace

    from aligner.trainers.online import OnlineTrainer

    def dtype(setting, precision):
        return OnlineTrainer.sampling_dtype(SimpleNamespace(r=SimpleNamespace(dtype=setting), precision=precision))

    assert dtype("auto", "bf16") == torch.bfloat16 and dtype("bf16", "fp32") == torch.bfloat16
    assert dtype("auto", "fp32") is None and dtype("fp32", "bf16") is None
    grpo = {"rewards": [id_reward], "mask_truncated": False}
    recipe = grpo_recipe(tmp_path, bases / "gpt", grpo=grpo, train={"name": "b", "max_steps": 1, "precision": "bf16"})
    assert main(["grpo", str(recipe)]) == 0
    m = metrics(tmp_path, "b")[0]
    assert 0 <= m["grpo/mismatch_kl"] < 0.05 and math.isfinite(m["train/grad_norm"])


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_completions_sharing_their_prompt_take_the_padded_steps(bases, tmp_path, id_reward, monkeypatch, arch):
    """`rollout.share_prompts`: a group's completions as branches after one copy of their prompt give the
    padded batch's log-probs, so the run takes the same steps (the GPT core, and a transformers Llama)."""
    import aligner.trainers.groups as groups

    calls = []
    monkeypatch.setattr(groups, "share_prompts", lambda *a: calls.append(a[2]) or share_prompts(*a))
    grpo = {"rewards": [id_reward], "mask_truncated": False, "num_iterations": 2, "beta": 0.05}
    for name, share in (("shared", True), ("padded", False)):
        recipe = grpo_recipe(
            tmp_path, bases / ("gpt" if arch == "gpt" else "llama"), grpo=grpo, rollout={"share_prompts": share},
            train={"name": name}, model={"arch": arch},
        )  # fmt: skip
        assert main(["grpo", str(recipe), "--max_steps", "4"]) == 0
        if share:
            assert calls and all(c >= 2 for c in calls)  # documents of 2 or more completions each
            calls.clear()
    assert not calls
    a, b = metrics(tmp_path, "shared"), metrics(tmp_path, "padded")
    for key in ("train/loss", "train/grad_norm", "grpo/kl", "rollout/reward_mean"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-4, abs=1e-7), key
    wa, wb = (load_file(tmp_path / f"runs/{n}/final/model.safetensors") for n in ("shared", "padded"))
    assert all(torch.allclose(wa[k], wb[k], atol=5e-5) for k in wa)  # other shapes: rounding, through Adam
