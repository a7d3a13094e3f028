"""`aligner dpo` end to end on a tiny GPT core: the reference (frozen copy, adapter disabled, precomputed
and cached), the first step's loss, eval metrics, and bad preference data."""

import json
import math

import pytest
import torch
from conftest import launch_two_processes, tiny_run_recipe

from aligner.cli import main
from aligner.errors import DataError


def dpo_recipe(tmp_path, base, **sections):
    recipe = {
        "model": {"init_from": str(base)},
        "dpo": {"accuracy_items": 0, "ref_cache_dir": str(tmp_path / "cache")},
        "data": {"source": "world:preference", "num_rows": 32, "num_eval_rows": 8, "seq_len": 256},
        "train": {"name": "d", "lr": 1e-3, "warmup_steps": 1},
        "sft": {"chat_template": "chatml"},
    }
    return tiny_run_recipe(tmp_path, recipe, sections, "dpo.yaml")


def metrics(tmp_path, name="d"):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
def test_first_step_is_log2_and_eval_reports_reward_accuracy(bases, tmp_path, capsys, lora):
    """At step 1 the policy equals its reference (a copy, or LoRA with B = 0), so h = 0 and the loss is ln 2."""
    recipe = dpo_recipe(tmp_path, bases / "gpt", lora={"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0})
    assert main(["dpo", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert ("reference adapter disabled" if lora else "reference frozen copy") in out
    rows = metrics(tmp_path)
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["dpo/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["train/loss"] != pytest.approx(math.log(2), abs=1e-4)  # it learned something
    assert "eval/rewards/accuracy" in rows[-1] and "eval/loss" in rows[-1]


def test_precomputed_reference_matches_and_is_reused(bases, tmp_path, capsys):
    recipe = dpo_recipe(tmp_path, bases / "gpt")
    assert main(["dpo", str(recipe), "--train.name", "live"]) == 0
    assert main(["dpo", str(recipe), "--train.name", "pre", "--precompute_ref"]) == 0
    assert "computed and saved to" in capsys.readouterr().out
    live, pre = metrics(tmp_path, "live"), metrics(tmp_path, "pre")
    for a, b in zip(live, pre):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5)
    assert main(["dpo", str(recipe), "--train.name", "again", "--precompute_ref"]) == 0
    assert "read from" in capsys.readouterr().out
    assert [r["train/loss"] for r in metrics(tmp_path, "again")] == [r["train/loss"] for r in pre]


@pytest.mark.parametrize("lora", [False, True])
def test_precomputed_reference_under_bf16_is_the_live_one_in_the_first_epoch(bases, tmp_path, lora):
    """bf16 autocast: the cache is computed in the micro-batches the first epoch trains in, so step 1 (policy
    = reference) is exactly ln 2 and every step of that epoch equals the live reference's run. A later
    epoch batches pairs differently: its losses stay within bf16 rounding of the live run's (bounded here)."""
    lora = {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0}
    train = {"precision": "bf16", "max_steps": 12, "micro_batch_size": 2, "grad_accum": 2}
    recipe = dpo_recipe(tmp_path, bases / "gpt", train=train, lora=lora, data={"num_rows": 20, "num_eval_rows": 4})
    assert main(["dpo", str(recipe), "--train.name", "live"]) == 0
    assert main(["dpo", str(recipe), "--train.name", "pre", "--precompute_ref"]) == 0
    live, pre = metrics(tmp_path, "live"), metrics(tmp_path, "pre")
    assert pre[0]["train/loss"] == math.log(2) or abs(pre[0]["train/loss"] - math.log(2)) < 1e-7
    per_epoch = math.ceil(20 / 4)  # 20 pairs (less the held-out eval ones) in steps of 4
    for a, b in zip(live[: per_epoch - 1], pre[: per_epoch - 1]):  # the first epoch, but its last (wrapping) step
        assert a["train/loss"] == b["train/loss"], a["step"]
    for a, b in zip(live, pre):
        assert abs(a["train/loss"] - b["train/loss"]) < 2e-2, a["step"]


def test_reference_free_variants_run(bases, tmp_path):
    for loss in ("simpo", "orpo"):
        recipe = dpo_recipe(tmp_path, bases / "gpt", dpo={"loss": loss, "beta": 2.0})
        assert main(["dpo", str(recipe), "--train.name", loss]) == 0
        assert math.isfinite(metrics(tmp_path, loss)[-1]["train/loss"])


def test_bad_preference_data(bases, tmp_path, capsys):
    rows = [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}, {"prompt": "2+2?", "chosen": "4"}]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = dpo_recipe(tmp_path, bases / "gpt", data={"source": str(data), "num_eval_rows": None})
    assert main(["dpo", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "row 2: missing rejected" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_kto_first_step_is_one_half_and_precomputed_reference_matches(bases, tmp_path, capsys, lora):
    """At step 1 policy == reference, so r = 0 and z = 0: every row's loss is 1 - sigmoid(0) = 0.5."""
    lora = {"enabled": lora, "r": 4, "alpha": 8, "dropout": 0.0}
    recipe = dpo_recipe(tmp_path, bases / "gpt", dpo={"loss": "kto"}, lora=lora)
    assert main(["dpo", str(recipe), "--train.name", "live"]) == 0
    out = capsys.readouterr().out
    assert "64 rows -> 64 examples" in out and "32 desirable and 32 undesirable" in out  # pairs split in two
    live = metrics(tmp_path, "live")
    assert live[0]["train/loss"] == pytest.approx(0.5, abs=1e-6)
    assert live[0]["dpo/kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"eval/rewards/desirable", "eval/rewards/undesirable"} <= set(live[-1])
    assert main(["dpo", str(recipe), "--train.name", "pre", "--precompute_ref"]) == 0
    for a, b in zip(live, metrics(tmp_path, "pre")):
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-5)


def test_kto_on_unpaired_rows_and_unpaired_rows_need_kto(bases, tmp_path, capsys):
    rows = [
        {"prompt": f"What is {i} + 1?", "completion": f"Final answer: {i + 1 + i % 2}", "label": i % 2 == 0}
        for i in range(12)
    ]
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = dpo_recipe(tmp_path, bases / "gpt", data={"source": str(data), "num_eval_rows": None})
    assert main(["dpo", str(recipe)]) == 2
    assert "train on them with --loss kto" in capsys.readouterr().err
    assert main(["dpo", str(recipe), "--loss", "kto"]) == 0
    assert math.isfinite(metrics(tmp_path)[-1]["train/loss"])


def record_sampled_pairs(monkeypatch) -> tuple[list, list]:
    """(row, sampled pair) for every row that dpo.sample_pairs judges from here on (with the default
    one pair per prompt), and one entry per call that samples replies from a model (not the cache)."""
    import aligner.trainers.dpo_data as dpo_mod

    seen, sampled, build, sample = [], [], dpo_mod.build_pairs, dpo_mod.sample_replies

    def spy(rows, replies, o, seed):
        out, report = build(rows, replies, o, seed)
        seen.extend(zip(rows, out, strict=True))
        return out, report

    def count(*args):
        sampled.append(1)
        return sample(*args)

    monkeypatch.setattr(dpo_mod, "build_pairs", spy)
    monkeypatch.setattr(dpo_mod, "sample_replies", count)
    return seen, sampled


def test_on_policy_pairs_are_sampled_from_the_start_model_and_judged(bases, tmp_path, capsys, monkeypatch):
    from aligner.data import world

    seen, sampled = record_sampled_pairs(monkeypatch)
    # a checker that accepts replies of even length: both kinds occur among a tiny model's samples
    monkeypatch.setattr(world, "is_correct", lambda text, answer: len(text) % 2 == 0)
    recipe = dpo_recipe(tmp_path, bases / "gpt", dpo={"sample_pairs": 4, "sample_tokens": 8})
    assert main(["dpo", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "32 prompts x 4 samples" in out and "prompts with a sampled pair" in out
    assert len(seen) == 32
    for row, pair in seen:
        assert pair["prompt"] == row["prompt"]
        for side, even in (("chosen", True), ("rejected", False)):
            if pair[side] != row[side]:  # a sample, judged by the checker
                assert (len(pair[side][0]["content"]) % 2 == 0) == even
    assert any(pair["chosen"] != row["chosen"] for row, pair in seen)
    assert any(pair["rejected"] != row["rejected"] for row, pair in seen)
    assert main(["dpo", str(recipe), "--train.name", "again"]) == 0  # same model, prompts, settings: cached
    assert "(samples read from" in capsys.readouterr().out and len(seen) == 64 and len(sampled) == 1
    assert seen[32:] == seen[:32]
    assert [r["train/loss"] for r in metrics(tmp_path, "again")] == [r["train/loss"] for r in metrics(tmp_path)]


def test_sample_greedy_makes_a_wrong_greedy_reply_the_rejected_one(bases, tmp_path, capsys, monkeypatch):
    from aligner.data import world
    from aligner.data.chat import encode_prompt, reply_stop_ids
    from aligner.model.load import load_model, load_tokenizer
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine

    seen, _ = record_sampled_pairs(monkeypatch)
    # right when the lengths of reply and answer have the same parity: varies with the row even where
    # the tiny model's greedy replies are all alike
    monkeypatch.setattr(world, "is_correct", lambda text, answer: (len(text) + len(answer)) % 2 == 0)
    recipe = dpo_recipe(tmp_path, bases / "gpt", dpo={"sample_pairs": 2, "sample_tokens": 8, "sample_greedy": True})
    assert main(["dpo", str(recipe), "--max_steps", "1"]) == 0
    assert "greedy reply wrong for" in capsys.readouterr().out
    model, tok = load_model(bases / "gpt").eval(), load_tokenizer(bases / "gpt")
    params = SamplingParams(max_new_tokens=8, temperature=0.0, stop_ids=tuple(reply_stop_ids(tok)))
    prompts = [encode_prompt(tok, row["prompt"]) for row, _ in seen]
    outs = TorchEngine(model, pad_id=tok.pad_token_id).generate(prompts, params)
    wrong = 0
    for (row, pair), out in zip(seen, outs):
        greedy = tok.decode(out.token_ids, skip_special_tokens=True)
        if (len(greedy) + len(row["answer"])) % 2:
            wrong += 1
            assert pair["rejected"][0]["content"] == greedy
        else:
            assert pair["rejected"][0]["content"] != greedy
    assert 0 < wrong < len(seen)


def test_several_pairs_per_prompt_and_prompts_without_a_sampled_pair_dropped():
    from types import SimpleNamespace

    from aligner.trainers.dpo_data import build_pairs

    def reply(text, answer):
        return f"{text}\nFinal answer: {answer}"

    rows = [
        {"prompt": "p0", "answer": "1", "chosen": "c0", "rejected": "r0"},  # 2 right, 2 wrong: 4 pairings, 3 kept
        {"prompt": "p1", "answer": "2", "chosen": "c1", "rejected": "r1"},  # all right: data's rejected
        {"prompt": "p2", "answer": "3", "chosen": "c2", "rejected": "r2"},  # 1 right, 1 wrong (twice)
    ]
    replies = [
        {"samples": [reply("a", 1), reply("b", 5), reply("c", 1), reply("d", 6)], "greedy": None},
        {"samples": [reply("a", 2)] * 4, "greedy": None},
        {"samples": [reply("a", 3), reply("b", 4), reply("b", 4), reply("a", 3)], "greedy": None},
    ]
    o = SimpleNamespace(sample_pairs=4, sample_greedy=False, pairs_per_prompt=3, sample_fill=True)
    out, report = build_pairs(rows, replies, o, seed=0)

    def text(side):
        return side if isinstance(side, str) else side[0]["content"]

    pairs = [(r["prompt"], text(r["chosen"]), text(r["rejected"])) for r in out]
    assert [p for p, _, _ in pairs] == ["p0", "p0", "p0", "p1", "p2"]
    assert len(set(pairs[:3])) == 3  # distinct combinations of the same prompt's samples
    for _, chosen, rejected in pairs[:3]:
        assert chosen.endswith(": 1") and rejected.split(": ")[1] in ("5", "6")
    assert pairs[3] == ("p1", reply("a", 2), "r1") and pairs[4] == ("p2", reply("a", 3), reply("b", 4))
    assert "3 prompts with a sampled pair" not in report and "2 prompts with a sampled pair (+2 more" in report
    o.sample_fill, o.pairs_per_prompt = False, 1
    out, report = build_pairs(rows, replies, o, seed=0)
    assert [r["prompt"] for r in out] == ["p0", "p2"] and "1 prompts without one dropped" in report
    with pytest.raises(DataError, match="none of 1 prompts gave both"):
        build_pairs(rows[1:2], replies[1:2], o, seed=0)


def test_iterative_rounds_each_sample_from_and_refer_to_the_last_round(bases, tmp_path, capsys, monkeypatch):
    from aligner.data import world
    from aligner.model.load import load_model

    seen, _ = record_sampled_pairs(monkeypatch)
    monkeypatch.setattr(world, "is_correct", lambda text, answer: len(text) % 2 == 0)
    recipe = dpo_recipe(tmp_path, bases / "gpt", dpo={"sample_pairs": 4, "sample_tokens": 8, "rounds": 2})
    assert main(["dpo", str(recipe), "--max_steps", "3"]) == 0
    out = capsys.readouterr().out
    runs = tmp_path / "runs" / "d"
    assert f"round 2 of 2 from {runs / 'round_1' / 'final'}" in out
    # each round judged its own half of the 32 prompts
    assert len(seen) == 32 and len({row["prompt"][-1]["content"] for row, _ in seen}) == 32
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["dpo/round"] for r in rows] == [1, 1, 1, 2, 2, 2]
    # round 2's reference is round 1's model: its first step sees h = 0 again
    assert rows[3]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    final = load_model(runs / "final").state_dict()
    for name, value in load_model(runs / "round_2" / "final").state_dict().items():
        assert torch.equal(final[name], value)
    assert (runs / "metrics.png").is_file()
    # --resume keeps the finished rounds
    assert main(["dpo", str(recipe), "--max_steps", "3", "--resume"]) == 0
    assert "round 2 of 2: " in capsys.readouterr().out and len(seen) == 32
    assert main(["dpo", str(recipe), "--rounds", "2", "--sample_pairs", "0"]) == 2
    assert "dpo.rounds > 1 needs on-policy pairs" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_dpo_on_an_hf_model_with_uneven_eval_shards(bases, tmp_path):
    """accelerate launch, 2 CPU processes, a transformers Llama (it has buffers, so DDP synchronises in
    every forward): 5 eval pairs in micro-batches of 2 give one process 2 batches and the other 1."""
    recipe = dpo_recipe(
        tmp_path, bases / "llama", model={"arch": "hf"}, data={"num_eval_rows": 5}, train={"eval_every": 2}
    )
    launch_two_processes(["dpo", str(recipe), "--micro_batch_size", "2", "--max_steps", "2", "--train.name", "two"])
    assert main(["dpo", str(recipe), "--micro_batch_size", "4", "--max_steps", "2", "--train.name", "one"]) == 0
    one, two = metrics(tmp_path, "one")[-1], metrics(tmp_path, "two")[-1]
    for key in ("eval/loss", "eval/rewards/accuracy", "eval/rewards/margin"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_packed_pairs_give_the_padded_dpo_loss_and_gradients(bases, arch, monkeypatch):
    import torch

    import aligner.trainers.dpo as dpo_mod
    from aligner.config import DPOConfig, Recipe, TrainConfig
    from aligner.model.gpt import GPT
    from aligner.model.load import load_hf_model

    load = (
        (lambda: GPT.from_pretrained(bases / "gpt")) if arch == "gpt" else lambda: load_hf_model(str(bases / "llama"))
    )
    model, ref = load(), load().eval()
    g = torch.Generator().manual_seed(0)

    def seq(prompt, n):  # a prompt (no loss) and a reply of n tokens
        ids = torch.randint(5, 300, (prompt + n,), generator=g).tolist()
        return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}

    pairs = [{"chosen": seq(5, a), "rejected": seq(5, b)} for a, b in [(4, 9), (13, 2), (6, 6)]]
    recipe = Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32"), dpo=DPOConfig(sft_weight=0.3))
    trainer = dpo_mod.DPOTrainer(recipe, model, None, [], ref_model=ref)
    monkeypatch.setattr(dpo_mod, "pad_token_id", lambda tok: 0)
    results = []
    for packing in (False, True):  # 6 sequences of 7-18 tokens packed into rows of 24
        trainer.packing, trainer.row_len = packing, 24
        batch = trainer.collate(pairs)
        model.zero_grad()
        loss, stats = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), stats, grads))
    assert "doc_ids" in trainer.collate(pairs) and results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for k, v in results[0][1].items():
        assert float(results[1][1][k]) == pytest.approx(float(v), abs=1e-4), k
    for name, grad in results[0][2].items():
        assert torch.allclose(results[1][2][name], grad, atol=1e-5), name
