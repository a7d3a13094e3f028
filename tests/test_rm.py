"""Reward models: the scalar head on the GPT core and HF models, `aligner rm` end to end (full, LoRA,
QLoRA), the one loading function (and transformers' own loader) giving the trained scores back."""

import json

import pytest
import torch
from conftest import tiny_run_recipe

from aligner.cli import main
from aligner.data.world import world_rows
from aligner.model.gpt import GPT
from aligner.model.heads import ScalarHeadModel, last_token_values, load_reward_model
from aligner.model.load import load_hf_model, load_tokenizer
from aligner.rewards import score_conversations


def rm_recipe(tmp_path, base, arch="gpt", **sections):
    recipe = {
        "model": {"init_from": str(base), "arch": arch},
        "data": {"source": "world:preference", "num_rows": 32, "num_eval_rows": 8, "seq_len": 256},
        "train": {"name": "r", "lr": 1e-3, "warmup_steps": 1, "save_every": 3},
        "sft": {"chat_template": "chatml"},
    }
    return tiny_run_recipe(tmp_path, recipe, sections, "rm.yaml")


def conversations(n=6):
    rows = world_rows("preference", "val", n=n)
    return [r["prompt"] + r["chosen"] for r in rows] + [r["prompt"] + r["rejected"] for r in rows]


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_head_reads_the_last_real_token_whatever_the_padding(bases, arch):
    lm = GPT.from_pretrained(bases / "gpt") if arch == "gpt" else load_hf_model(str(bases / "llama"))
    model = ScalarHeadModel.from_causal_lm(lm).eval().requires_grad_(False)
    ids = torch.randint(5, 300, (1, 9))
    alone = model(ids)[0]  # (T,)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    batch = torch.cat([padded, torch.randint(5, 300, (1, 13))])
    got = last_token_values(model(batch), torch.tensor([9, 13]))
    assert float(got[0]) == pytest.approx(float(alone[-1]), abs=1e-5)
    assert list(model.state_dict()) == [k for k in model.state_dict() if k.startswith("model.")] + ["score.weight"]


def test_full_rm_trains_saves_and_loads_for_scoring_and_in_transformers(bases, tmp_path, capsys):
    assert main(["rm", str(rm_recipe(tmp_path, bases / "gpt"))]) == 0
    out = capsys.readouterr().out
    assert "rm: full" in out and "eval/accuracy" in out
    rows = [json.loads(x) for x in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()]
    assert {"rm/accuracy", "rm/margin", "rm/reward_mean", "rm/reward_std"} <= set(rows[0])
    final = tmp_path / "runs/r/final"
    model, tok = load_reward_model(final), load_tokenizer(final)
    convs = conversations()
    ours = score_conversations(model, tok, convs)
    assert len(ours) == len(convs) and len(set(ours)) > 1
    # batched by length, returned in the given order: each as scored alone
    assert ours == pytest.approx([score_conversations(model, tok, [c])[0] for c in convs], abs=1e-5)

    # scoring reads the same token as training did: the trainer's batch gives the same rewards
    from aligner.data.collate import pad_pairs
    from aligner.trainers.rm import encode_reward_pairs

    pairs = encode_reward_pairs(world_rows("preference", "val", n=6), tok, 256)[0]  # what rm() trains on
    batch = pad_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        trained = last_token_values(model(batch["input_ids"]), batch["lengths"])
    assert trained.tolist() == pytest.approx(ours, abs=1e-5)

    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    assert hf.config.num_labels == 1
    from aligner.data.chat import encode_conversation

    for conv, score in zip(convs[:3], ours):
        ids = torch.tensor([encode_conversation(tok, conv)[0]])
        with torch.no_grad():
            assert float(hf(ids).logits[0, 0]) == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("arch,quantize,lm_coef", [("gpt", "none", 0), ("hf", "none", 0.5), ("hf", "nf4", 0)])
def test_lora_and_qlora_rm_train_the_head_and_load_back(bases, tmp_path, capsys, arch, quantize, lm_coef):
    base = bases / ("gpt" if arch == "gpt" else "llama")
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "quantize": quantize, "compute_dtype": "fp32"}
    recipe = rm_recipe(tmp_path, base, arch=arch, lora=lora, rm={"lm_coef": lm_coef})
    assert main(["rm", str(recipe)]) == 0
    assert ("rm: QLoRA" if quantize == "nf4" else "rm: LoRA") in capsys.readouterr().out
    final = tmp_path / "runs/r/final"
    saved = json.loads((final / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["score"] and "score" not in saved["target_modules"]
    model, tok = load_reward_model(final), load_tokenizer(final)
    fresh = ScalarHeadModel.from_causal_lm(
        GPT.from_pretrained(bases / "gpt") if arch == "gpt" else load_hf_model(str(base))
    )
    assert not torch.equal(model.score.weight, fresh.score.weight)  # the trained head came back
    scores = score_conversations(model, tok, conversations(2))
    assert all(torch.isfinite(torch.tensor(scores)))


def test_rm_resume_continues_exactly(bases, tmp_path):
    recipe = rm_recipe(tmp_path, bases / "gpt", train={"max_steps": 4, "save_every": 2})
    assert main(["rm", str(recipe), "--train.name", "a"]) == 0
    import shutil

    run_b = tmp_path / "runs/b"
    shutil.copytree(tmp_path / "runs/a", run_b)
    for p in ["step_000004", "final"]:
        shutil.rmtree(run_b / p)
    lines = (run_b / "metrics.jsonl").read_text().splitlines()
    (run_b / "metrics.jsonl").write_text("\n".join(x for x in lines if json.loads(x)["step"] <= 2) + "\n")
    assert main(["rm", str(recipe), "--train.name", "b", "--resume"]) == 0
    a = load_reward_model(tmp_path / "runs/a/final").state_dict()
    b = load_reward_model(run_b / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rm_rejects_unpaired_rows_and_a_non_reward_checkpoint(bases, tmp_path, capsys):
    rows = [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": "2+3?", "completion": "6", "label": False},
    ]
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = rm_recipe(tmp_path, bases / "gpt", data={"source": str(data), "num_eval_rows": None})
    assert main(["rm", str(recipe)]) == 2
    assert "needs chosen/rejected pairs" in capsys.readouterr().err and not (tmp_path / "runs").exists()
    from aligner.errors import ConfigError

    with pytest.raises(ConfigError, match="not a reward model checkpoint"):
        load_reward_model(bases / "gpt")


@pytest.mark.parametrize("arch,lm_coef", [("gpt", 0.0), ("hf", 0.0), ("gpt", 0.5), ("hf", 0.5)])
def test_packed_pairs_give_the_padded_loss_and_gradients(bases, arch, lm_coef, monkeypatch):
    import aligner.trainers.rm as rm_mod
    from aligner.config import Recipe, TrainConfig
    from aligner.sections import RMConfig
    from aligner.trainers.rm import RewardTrainer

    lm = GPT.from_pretrained(bases / "gpt") if arch == "gpt" else load_hf_model(str(bases / "llama"))
    model = ScalarHeadModel.from_causal_lm(lm, keep_lm_head=lm_coef > 0)
    g = torch.Generator().manual_seed(0)

    def seq(n):
        ids = torch.randint(5, 300, (n,), generator=g).tolist()
        return {"input_ids": ids, "labels": ids}

    pairs = [{"chosen": seq(a), "rejected": seq(b), "margin": 0.5} for a, b in [(9, 4), (13, 13), (6, 11)]]
    recipe = Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32"), rm=RMConfig(lm_coef=lm_coef))
    trainer = RewardTrainer(recipe, model, None, [])
    monkeypatch.setattr(rm_mod, "pad_token_id", lambda tok: 0)
    results = []
    for packing in (False, True):  # 3 pairs of 4-13 tokens: packed into rows of 24, margins kept
        trainer.packing, trainer.row_len = packing, 24
        batch = trainer.collate(pairs)
        model.zero_grad()
        loss, _ = trainer.compute_loss(model, batch)
        loss.backward()
        results.append(
            (float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    assert "ends" in trainer.collate(pairs) and results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(results[1][1][name], grad, atol=1e-5), name


def lm_loader_and_pairs(bases, arch):
    """A loader of the base LM (wrapped, it gets the same scalar head every time), and two pairs of
    random sequences whose labels are their shifted ids on the last 4 positions (the reply)."""

    def load():
        torch.manual_seed(0)
        lm = GPT.from_pretrained(bases / "gpt") if arch == "gpt" else load_hf_model(str(bases / "llama"))
        return lm.eval()

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (7, 10, 5, 9)]
    # IGNORE on the prompt and on the final token (which a reward model reads, no label after it)
    examples = [{"input_ids": s, "labels": [-100] * (len(s) - 5) + s[len(s) - 4 :] + [-100]} for s in seqs]
    pairs = [{"chosen": examples[0], "rejected": examples[1]}, {"chosen": examples[2], "rejected": examples[3]}]
    return load, examples, pairs


@torch.no_grad()
def label_nll(lm, example) -> tuple[float, int]:
    """The summed NLL of an example's labelled tokens under a causal LM (GPT core or HF), and their number."""
    import torch.nn.functional as F

    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor(example["labels"])
    logits = lm(ids) if isinstance(lm, GPT) else lm(input_ids=ids).logits
    keep = labels != -100
    return float(F.cross_entropy(logits[0][keep], labels[keep], reduction="sum")), int(keep.sum())


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_lm_term_is_the_chosen_replies_mean_token_nll(bases, arch, monkeypatch):
    """rm.lm_coef adds lm_coef x B x the mean NLL of the chosen replies' label tokens (rejected ones
    ignored) under the starting LM, computed here from the LM itself; the head's loss is unchanged."""
    import aligner.trainers.rm as rm_mod
    from aligner.config import Recipe, TrainConfig
    from aligner.sections import RMConfig
    from aligner.trainers.rm import RewardTrainer

    load, examples, pairs = lm_loader_and_pairs(bases, arch)
    reference = load()
    monkeypatch.setattr(rm_mod, "pad_token_id", lambda tok: 0)
    losses = {}
    for coef in (0.0, 0.7):
        model = ScalarHeadModel.from_causal_lm(load(), keep_lm_head=coef > 0).eval()
        recipe = Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32"), rm=RMConfig(lm_coef=coef))
        trainer = RewardTrainer(recipe, model, None, [])
        trainer.packing, trainer.row_len = arch == "gpt", 32  # packed on the GPT core, padded on HF
        with torch.no_grad():
            losses[coef] = trainer.compute_loss(model, trainer.collate(pairs))
    (nll_0, count_0), (nll_2, count_2) = label_nll(reference, examples[0]), label_nll(reference, examples[2])
    nll_sum, count = nll_0 + nll_2, count_0 + count_2  # the chosen replies
    (plain, plain_stats), (with_lm, stats) = losses[0.0], losses[0.7]
    assert stats["nll"] == pytest.approx(nll_sum / count, abs=1e-5) and "nll" not in plain_stats
    assert float(with_lm) == pytest.approx(float(plain) + 0.7 * 2 * nll_sum / count, abs=1e-5)
    assert stats["accuracy"] == plain_stats["accuracy"]


def test_rm_with_lm_term_trains_and_saves_no_lm_head(bases, tmp_path, capsys):
    recipe = rm_recipe(tmp_path, bases / "gpt", rm={"lm_coef": 0.5})
    assert main(["rm", str(recipe)]) == 0
    assert "lm_coef 0.5" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "runs/r/metrics.jsonl").read_text().splitlines()]
    assert "rm/nll" in rows[0] and rows[0]["rm/nll"] > 0
    model = load_reward_model(tmp_path / "runs/r/final")  # the usual checkpoint: decoder and score only
    assert list(model.state_dict())[-1] == "score.weight" and model._lm_head is None
    # continuing a reward model has no LM head to keep
    again = rm_recipe(tmp_path, tmp_path / "runs/r/final", rm={"lm_coef": 0.5}, train={"name": "again"})
    assert main(["rm", str(again)]) == 2
    assert "rm.lm_coef and rm.likelihood_coef need a causal LM" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gpt", "hf"])
def test_likelihood_term_adds_the_replies_summed_logprob_to_the_reward(bases, arch, monkeypatch):
    """rm.likelihood_coef c: reward = head at the last token + c x the reply tokens' summed log-probs
    under the model's own LM head, computed here from the LM itself; the loss is Bradley-Terry on
    those rewards, packed (GPT core) as padded (HF), and scoring gives the same rewards."""
    import torch.nn.functional as F

    import aligner.trainers.rm as rm_mod
    from aligner.config import Recipe, TrainConfig
    from aligner.data.collate import pad_pairs
    from aligner.sections import RMConfig
    from aligner.trainers.rm import RewardTrainer

    load, examples, pairs = lm_loader_and_pairs(bases, arch)
    reference = load()
    monkeypatch.setattr(rm_mod, "pad_token_id", lambda tok: 0)
    head_only = ScalarHeadModel.from_causal_lm(load()).eval()
    model = ScalarHeadModel.from_causal_lm(load(), likelihood_coef=0.3).eval()
    expected = []
    with torch.no_grad():
        for ex in (examples[0], examples[2], examples[1], examples[3]):  # chosen first, as batches hold them
            head = float(head_only(torch.tensor([ex["input_ids"]]))[0, -1])
            expected.append(head - 0.3 * label_nll(reference, ex)[0])
        batch = pad_pairs(pairs, 0)
        got = model.sequence_scores(batch["input_ids"], batch["labels"], batch["lengths"])
    assert got.tolist() == pytest.approx(expected, abs=1e-4)

    recipe = Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32"), rm=RMConfig(likelihood_coef=0.3))
    trainer = RewardTrainer(recipe, model, None, [])
    trainer.packing, trainer.row_len = arch == "gpt", 32
    with torch.no_grad():
        loss, stats = trainer.compute_loss(model, trainer.collate(pairs))
    rewards = torch.tensor(expected)
    by_hand = -F.logsigmoid(rewards[:2] - rewards[2:]).sum()  # summed over pairs: the loop divides by their number
    assert float(loss) == pytest.approx(float(by_hand), abs=1e-4)
    assert stats["accuracy"] == pytest.approx(float((rewards[:2] > rewards[2:]).float().mean()))


def test_likelihood_term_survives_saving_for_tied_and_untied_heads(bases, tmp_path):
    from transformers import AutoModelForSequenceClassification

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 300, (3, 12), generator=g)
    labels = torch.where(torch.arange(12) >= 6, torch.roll(ids, -1, 1), -100)
    labels[:, -1] = -100
    lengths = torch.tensor([12, 12, 12])
    for name, lm in [("gpt", GPT.from_pretrained(bases / "gpt")), ("hf", load_hf_model(str(bases / "llama")))]:
        model = ScalarHeadModel.from_causal_lm(lm, likelihood_coef=0.25).eval()
        with torch.no_grad():
            model.score.weight.normal_()
            before = model.sequence_scores(ids, labels, lengths)
        model.save_pretrained(tmp_path / name)
        saved = json.loads((tmp_path / name / "config.json").read_text())
        assert saved["reward_likelihood_coef"] == 0.25
        loaded = load_reward_model(tmp_path / name)
        assert loaded.likelihood_coef == 0.25
        assert loaded._tied_lm_head() == (name == "gpt")  # the untied head was saved and read back
        with torch.no_grad():
            assert loaded.sequence_scores(ids, labels, lengths).tolist() == pytest.approx(before.tolist(), abs=1e-5)
            # transformers still loads the head alone
            hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / name)).eval()
            head = last_token_values(loaded(ids), lengths)
            assert hf(ids).logits[:, 0].tolist() == pytest.approx(head.tolist(), abs=1e-4)
            assert not torch.allclose(head, before)
            # a PPO critic starting from it keeps the head alone
            assert loaded.head_only().sequence_scores(ids, labels, lengths).tolist() == pytest.approx(head.tolist())


def test_rm_with_likelihood_term_trains_scores_and_rejects_lora(bases, tmp_path, capsys):
    recipe = rm_recipe(tmp_path, bases / "gpt", rm={"likelihood_coef": 0.2, "lm_coef": 0.5})
    assert main(["rm", str(recipe)]) == 0
    assert "likelihood_coef 0.2" in capsys.readouterr().out
    final = tmp_path / "runs/r/final"
    model, tok = load_reward_model(final), load_tokenizer(final)
    assert model.likelihood_coef == 0.2
    from aligner.data.collate import pad_pairs
    from aligner.trainers.rm import encode_reward_pairs

    convs = conversations(4)
    ours = score_conversations(model, tok, convs)
    pairs = encode_reward_pairs(world_rows("preference", "val", n=4), tok, 256)[0]  # what rm() trains on
    batch = pad_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        trained = model.sequence_scores(batch["input_ids"], batch["labels"], batch["lengths"])
    assert trained.tolist() == pytest.approx(ours, abs=1e-4)

    lora = rm_recipe(tmp_path, bases / "gpt", rm={"likelihood_coef": 0.2}, lora={"enabled": True}, train={"name": "l"})
    assert main(["rm", str(lora)]) == 2
    assert "rm.likelihood_coef needs full fine-tuning" in capsys.readouterr().err
    assert not (tmp_path / "runs/l").exists()


@pytest.mark.parametrize("arch", ["gpt", "hf", "llama3", "qwen2", "mistral", "gemma2"])
def test_pairs_sharing_their_prompt_give_the_padded_loss_and_gradients(bases, arch, monkeypatch, tmp_path):
    """rm.share_prefix: each pair's common prefix is computed once, the rejected reply attending to it and to
    itself only, so every reward, the loss and the gradients are those of the pairs padded one per row. A
    model whose attention would not take the mask as given (Gemma-2: eager attention, a 16-token window)
    is not offered the shared batch."""
    import aligner.trainers.rm as rm_mod
    from aligner.config import Recipe, TrainConfig
    from aligner.data.collate import shared_prefix_len
    from aligner.trainers.rm import RewardTrainer

    if arch in ("gpt", "hf"):
        lm = GPT.from_pretrained(bases / "gpt") if arch == "gpt" else load_hf_model(str(bases / "llama"))
    else:
        from tiny_archs import write_tiny_model

        lm = load_hf_model(str(write_tiny_model(arch, tmp_path / arch)))
    model = ScalarHeadModel.from_causal_lm(lm)
    assert model.shares_prefixes(24) == (arch != "gemma2")
    if arch == "gemma2":
        return
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(5, 300, (n,), generator=g).tolist()

    def ex(x):
        return {"input_ids": x, "labels": x}

    prompt, other = ids(7), ids(3)
    pairs = [
        {"chosen": ex(prompt + ids(5)), "rejected": ex(prompt + ids(3)), "margin": 0.5},  # a shared prompt
        {"chosen": ex(prompt + other), "rejected": ex(prompt + other + ids(4)), "margin": 0.0},  # a prefix of it
        {"chosen": ex(ids(6)), "rejected": ex(ids(9)), "margin": 1.0},  # nothing shared
    ]
    assert [shared_prefix_len(p["chosen"]["input_ids"], p["rejected"]["input_ids"]) for p in pairs] == [7, 9, 0]
    recipe = Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32"))
    trainer = RewardTrainer(recipe, model, None, [])
    monkeypatch.setattr(rm_mod, "pad_token_id", lambda tok: 0)
    results = []
    for packing, share in ((False, False), (True, True)):
        trainer.packing, trainer.share_prefix, trainer.row_len = packing, share, 24
        batch = trainer.collate(pairs)
        model.zero_grad()
        loss, stats = trainer.compute_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), {k: float(v) for k, v in stats.items()}, grads, batch))
    shared = results[1][3]
    assert "branch_ids" in shared and shared["input_ids"].numel() < 2 * sum(
        len(p["chosen"]["input_ids"]) for p in pairs
    )
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-5)  # rewards' statistics: accuracy, margins
    for name, grad in results[0][2].items():
        assert torch.allclose(results[1][2][name], grad, atol=1e-5), name
