"""Eval specs (evals/*.yaml) and `aligner eval`: every metric on tiny checkpoints, with invariants that
can fail (KL to itself is 0, a win rate against itself is one half, pass@1 at T = 0 is greedy exact
match), and one-line errors for bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aligner.cli import main
from aligner.evaluate import (
    METRICS,
    exact_match,
    load_spec,
    paired_difference,
    pass_at_k,
    reward_accuracy,
    spec_rows,
    wilson_interval,
)
from aligner.model.heads import ScalarHeadModel, load_reward_model
from aligner.model.load import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reward_ckpt(bases, tmp_path_factory):
    from aligner.model.gpt import GPT

    out = tmp_path_factory.mktemp("rm") / "rm"
    ScalarHeadModel.from_causal_lm(GPT.from_pretrained(bases / "gpt")).save_pretrained(out)
    load_tokenizer(bases / "gpt").save_pretrained(out)
    return out


def test_committed_specs_load():
    names = sorted(p.stem for p in (REPO / "evals").glob("*.yaml"))
    assert {"task_world", "perplexity", "reward_accuracy", "win_rate", "kl"} <= set(names)
    for name in names:
        spec = load_spec(name)
        assert spec.metrics and all(m in METRICS for m in spec.metrics)
        assert (REPO / "evals" / f"{name}.yaml").read_text().startswith("#")  # a header says what it measures


def test_implicit_reward_accuracy_by_hand(bases, tmp_path, capsys):
    """implicit_reward_accuracy: sum over the reply of log p - log p_ref, chosen against rejected, from a
    plain forward of each whole conversation; against the checkpoint itself every difference is 0."""
    from aligner.data.chat import encode_reply
    from aligner.data.preferences import to_preference_records
    from aligner.data.world import world_rows

    spec = tmp_path / "irm.yaml"
    spec.write_text(
        "# implicit reward\ndata: {source: 'world:preference', split: val, items: 6}\n"
        f"metrics: [implicit_reward_accuracy]\nreference: {bases / 'llama'}\n"
    )
    out = tmp_path / "irm.json"
    assert main(["eval", str(bases / "gpt"), str(spec), "--out", str(out)]) == 0
    assert "implicit reward" in capsys.readouterr().out
    r = json.loads(out.read_text())["results"]["irm"]["implicit_reward_accuracy"]

    tok = load_tokenizer(bases / "gpt")
    policy, reference = load_model(bases / "gpt").eval(), load_model(bases / "llama").eval()

    def reply_logp(model, prompt, reply):
        ids, mask = encode_reply(tok, prompt, reply)
        with torch.no_grad():
            out = model(torch.tensor([ids]))
        logits = out if torch.is_tensor(out) else out.logits
        logps = logits[0, :-1].float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        return float((logps * torch.tensor(mask[1:])).sum())

    pairs = to_preference_records(world_rows("preference", "val", n=6), None, "test")[0]
    diffs = []
    for p in pairs:
        reward = {
            k: reply_logp(policy, p["prompt"], p[k]) - reply_logp(reference, p["prompt"], p[k])
            for k in ("chosen", "rejected")
        }
        diffs.append(reward["chosen"] - reward["rejected"])
    assert r["n"] == 6 and r["accuracy"] == sum(d > 0 for d in diffs) / 6
    assert r["margin"] == pytest.approx(sum(diffs) / 6, abs=1e-3)
    spec.write_text(spec.read_text().replace(str(bases / "llama"), str(bases / "gpt")))
    assert main(["eval", str(bases / "gpt"), str(spec), "--out", str(out)]) == 0
    same = json.loads(out.read_text())["results"]["irm"]["implicit_reward_accuracy"]
    assert same["accuracy"] == 0.0 and same["margin"] == pytest.approx(0.0, abs=1e-6)


def test_unique_counts_each_question_once():
    """data.unique / --unique: a large task-world sample repeats its smallest cells' questions; unique keeps
    each distinct prompt once, in order."""
    spec = load_spec("task_world")
    spec.data.items = 2000
    rows = spec_rows(spec, "rl")
    spec.data.unique = True
    kept = spec_rows(spec, "rl")
    distinct = list(dict.fromkeys(r["id"] for r in rows))
    assert len(rows) == 2000 and len(distinct) < 1950  # repeats are there to drop
    assert [r["id"] for r in kept] == distinct


def test_every_metric_through_the_command(bases, reward_ckpt, tmp_path, capsys):
    spec = tmp_path / "all.yaml"
    spec.write_text(
        "# all metrics\nname: all\ndata: {source: 'world:rl', split: test, items: 6}\nprompt: system.txt\n"
        "metrics: [exact_match, pass_at_k, samples, win_rate, kl]\nsampling: {k: 2, max_new_tokens: 8}\n"
        f"reference: {bases / 'gpt'}\nreward_model: {reward_ckpt}\nsamples: 3\n"
    )
    ppl = tmp_path / "ppl.yaml"
    ppl.write_text("# ppl\ndata: {source: 'world:sft', split: val, items: 4}\nmetrics: [perplexity]\n")
    out = tmp_path / "eval.json"
    assert main(["eval", str(bases / "gpt"), str(spec), str(ppl), "--out", str(out), "--unique"]) == 0
    printed = capsys.readouterr().out
    for label in ("exact match", "pass@2", "maj@2", "win rate", "KL to reference", "perplexity"):
        assert label in printed
    results = json.loads(out.read_text())["results"]
    r = results["all"]
    assert r["exact_match"]["n"] == 6 and len(r["samples"]) == 3
    replies = r["exact_match"]["completions"]  # every reply, judged, for paired comparisons
    assert len(replies) == 6 and sum(c["correct"] for c in replies) == r["exact_match"]["correct"]
    assert r["kl"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the reference is the checkpoint itself
    assert r["win_rate"]["win_rate"] == 0.5  # identical replies: every prompt a tie
    assert results["ppl"]["perplexity"]["perplexity"] > 1.0 and results["ppl"]["perplexity"]["tokens"] > 0


def test_pass_at_one_greedy_is_exact_match(bases):
    from aligner.data.world import world_rows

    model, tok = load_model(bases / "gpt"), load_tokenizer(bases / "gpt")
    rows = world_rows("rl", "test", n=5)
    greedy = exact_match(model, tok, rows, max_new_tokens=8)
    sampled = pass_at_k(model, tok, rows, k=1, temperature=0.0, max_new_tokens=8)
    assert sampled["pass_at_k"] == greedy["accuracy"] and sampled["n"] == 5


def test_reward_accuracy_counts_the_pairs_ranked_right(bases, reward_ckpt):
    from aligner.data.world import world_rows
    from aligner.rewards import score_conversations

    rm, tok = load_reward_model(reward_ckpt), load_tokenizer(reward_ckpt)
    pairs = world_rows("preference", "val", n=8)
    got = reward_accuracy(rm, tok, pairs)
    c = score_conversations(rm, tok, [p["prompt"] + p["chosen"] for p in pairs])
    r = score_conversations(rm, tok, [p["prompt"] + p["rejected"] for p in pairs])
    assert got["accuracy"] == sum(a > b for a, b in zip(c, r)) / 8


@pytest.mark.parametrize(
    "text, message",
    [
        ("metrics: [exact_match]\nbogus: 1\n", "bogus' (valid keys"),
        ("metrics: [exact]\n", "unknown metric 'exact'"),
        ("metrics: [exact_match]\ndata: {items: many}\n", "data.items must be int"),
        ("metrics: [exact_match\n", "malformed YAML"),
        ("data: {items: 5}\n", "needs at least 'metrics'"),
    ],
)
def test_bad_specs_are_one_line_errors(tmp_path, capsys, bases, text, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    assert main(["eval", str(bases / "gpt"), str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_metric_without_its_reference_is_an_error(tmp_path, capsys, bases):
    spec = tmp_path / "kl.yaml"
    spec.write_text("metrics: [kl]\ndata: {items: 2}\n")
    assert main(["eval", str(bases / "gpt"), str(spec)]) == 2
    assert "needs 'reference'" in capsys.readouterr().err


def test_intervals_by_hand():
    import doctest

    import aligner.evaluate.specs as ev
    import aligner.stats as stats

    assert doctest.testmod(ev).failed == 0 and doctest.testmod(stats).failed == 0
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.40383) < 1e-4 and abs(hi - 0.59617) < 1e-4
    # 6 items: gained 2 (items 2, 3), lost 1 (item 1), agreed on 3: diff 1/6, se sqrt(3 - 1/6) / 6
    diff, half = paired_difference([1, 1, 0, 0, 1, 0], [1, 0, 1, 1, 1, 0])
    assert diff == pytest.approx(1 / 6) and half == pytest.approx(1.96 * (3 - 1 / 6) ** 0.5 / 6)
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)  # the same replies: no uncertainty
    with pytest.raises(ValueError, match="3 items against 2"):
        paired_difference([1, 0, 1], [1, 0])


def test_eval_shows_its_progress_and_writes_under_runs(bases, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(bases / "gpt", tmp_path / "runs" / "sft" / "final")
    before = sorted(p.name for p in (tmp_path / "runs" / "sft" / "final").iterdir())
    assert main(["eval", "runs/sft/final", "--items", "6", "--metrics", "exact_match"]) == 0
    err = capsys.readouterr().err
    assert "greedy replies" in err and "6/6" in err, err  # a bar on stderr, also when it is not a terminal
    assert (tmp_path / "runs" / "eval" / "sft--final.json").is_file()
    assert sorted(p.name for p in (tmp_path / "runs" / "sft" / "final").iterdir()) == before
