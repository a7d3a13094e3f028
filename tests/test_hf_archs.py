"""Bring your own model and data: tiny random Llama-3, Qwen2, Gemma-2 and Mistral models (tests/tiny_archs.py)
through sft, dpo, grpo, rm, ppo, eval, generate and chat from the command line, on local copies of Hub datasets
(tests/hub_fixtures.py), with their outputs loaded back by transformers; and which checkpoints the GPT
core runs (only those it implements field by field)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from hub_fixtures import write_gsm8k, write_ultrachat, write_ultrafeedback
from tiny_archs import ARCHS, MODEL_CLASS, write_tiny_model

from aligner.cli import main
from aligner.model.gpt import GPTConfig
from aligner.model.load import core_mismatch, is_gpt_checkpoint, load_model

REPO = Path(__file__).resolve().parents[1]

QUIET = ["--train.progress", "false", "--train.precision", "fp32", "--train.eval_every", "0"]
QUIET += ["--train.save_every", "0", "--data.seq_len", "128"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {
        "ultrachat": write_ultrachat(root / "ultrachat_200k"),
        "ultrafeedback": write_ultrafeedback(root / "ultrafeedback_binarized"),
        "gsm8k": write_gsm8k(root / "gsm8k"),
    }


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    family = request.param
    return family, write_tiny_model(family, tmp_path_factory.mktemp(family) / "model")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def loads_in_transformers(path: Path, family: str) -> None:
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == MODEL_CLASS[family]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(3, 300, (1, 12))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_the_core_takes_only_checkpoints_it_implements_exactly(arch, bases):
    family, path = arch
    assert not is_gpt_checkpoint(path) and core_mismatch(path)
    assert type(load_model(path)).__name__ == MODEL_CLASS[family]
    assert is_gpt_checkpoint(bases / "gpt") and is_gpt_checkpoint(bases / "llama")  # plain Llama: exact
    d = GPTConfig().to_hf_dict()
    for change, named in [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial"),
        ({"sliding_window": 16}, "sliding_window"),
        ({"attention_dropout": 0.1}, "attention_dropout"),
        ({"quantization_config": {"load_in_4bit": True}}, "quantization_config"),
        ({"auto_map": {"AutoModelForCausalLM": "x.Y"}}, "auto_map"),
        ({"architectures": ["LlamaForTokenClassification"]}, "architectures"),
    ]:
        with pytest.raises(ValueError, match=named):
            GPTConfig.from_hf_dict(d | change)
    assert GPTConfig.from_hf_dict(d | {"sliding_window": None, "pretraining_tp": 1}) == GPTConfig.from_hf_dict(d)


def test_sft_dpo_grpo_rm_ppo_eval_generate_chat(arch, hub, tmp_path, capsys, monkeypatch):
    family, model = arch
    runs = tmp_path / "runs"
    common = [*QUIET, "--train.out_dir", str(runs), "--train.max_steps", "2", "--train.micro_batch_size", "4"]

    # SFT on ultrachat_200k's layout (splits train_sft / test_sft), the model's own chat template kept
    sft = ["sft", "--model.init_from", str(model), "--data.source", str(hub["ultrachat"]), "--data.split", "train_sft"]
    sft += ["--data.eval_source", str(hub["ultrachat"]), "--data.eval_split", "test_sft", "--data.num_eval_rows", "2"]
    assert main([*sft, *common, "--train.name", "sft"]) == 0
    out = capsys.readouterr().out
    assert "keeping the chat template" in out and "train.lr 2e-05" in out  # not recipes/chat.yaml's ChatML / 3e-3
    loads_in_transformers(runs / "sft" / "final", family)
    assert json.loads((runs / "sft" / "final" / "config.json").read_text())["architectures"] == [MODEL_CLASS[family]]

    # plain offline DPO on ultrafeedback_binarized's layout: the card's command, first-step loss ln 2
    dpo = ["dpo", "--beta", "0.1", "--model.init_from", str(runs / "sft" / "final")]
    dpo += ["--data.source", str(hub["ultrafeedback"]), "--data.split", "train_prefs", "--data.num_eval_rows", "0"]
    assert main([*dpo, *common, "--train.name", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "plain offline DPO" in out and "dpo.sample_pairs and dpo.sft_weight" in out
    first = metrics(runs / "dpo")[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
    loads_in_transformers(runs / "dpo" / "final", family)

    # GRPO on gsm8k's layout (config main), `question` mapped to `prompt`, the general answer checker
    grpo = ["grpo", "--model.init_from", str(runs / "sft" / "final"), "--data.source", str(hub["gsm8k"])]
    grpo += ["--data.subset", "main", "--data.columns", "{question: prompt}", "--grpo.rewards", "[math_answer]"]
    grpo += ["--grpo.num_generations", "2", "--rollout.max_new_tokens", "8", "--rollout.engine", "torch"]
    grpo += ["--data.num_eval_rows", "0", "--grpo.accuracy_items", "0"]
    assert main([*grpo, *common, "--train.name", "grpo"]) == 0
    rows = metrics(runs / "grpo")
    assert len(rows) == 2 and "rollout/math_answer" in rows[0]
    # 8 tokens are too few for any answer: every completion truncated and masked, and the run says so
    assert rows[0]["rollout/learning"] == 0 and "step 1 had no gradient from its rewards" in capsys.readouterr().err
    loads_in_transformers(runs / "grpo" / "final", family)

    # a reward model on the same pairs, then PPO scored by it (and by the answer checker)
    rm = ["rm", "--model.init_from", str(runs / "sft" / "final"), "--data.source", str(hub["ultrafeedback"])]
    rm += ["--data.split", "train_prefs", "--data.num_eval_rows", "0"]
    assert main([*rm, *common, "--train.name", "rm"]) == 0
    assert "train.lr 1e-05" in capsys.readouterr().out
    ppo = ["ppo", "--model.init_from", str(runs / "sft" / "final"), "--ppo.reward_model", str(runs / "rm" / "final")]
    ppo += ["--data.source", str(hub["gsm8k"]), "--data.subset", "main", "--data.columns", "{question: prompt}"]
    ppo += ["--ppo.rewards", "[math_answer]", "--ppo.rollout_prompts", "4", "--rollout.max_new_tokens", "8"]
    ppo += ["--data.num_eval_rows", "0", "--ppo.accuracy_items", "0", "--ppo.ppo_epochs", "1"]
    assert main([*ppo, *common, "--train.name", "ppo"]) == 0
    assert {"rollout/reward_model", "rollout/math_answer"} <= set(metrics(runs / "ppo")[0])
    loads_in_transformers(runs / "ppo" / "final", family)

    # eval (a spec on the local gsm8k copy), generate, chat
    spec = tmp_path / "gsm8k_local.yaml"
    spec.write_text(
        f"name: gsm8k_local\ndata: {{source: '{hub['gsm8k']}', subset: main, split: test, items: 3, "
        "columns: {question: prompt}}\nchecker: math_answer\nmetrics: [exact_match, samples]\n"
        "sampling: {max_new_tokens: 6}\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(runs / "grpo" / "final"), str(spec)]) == 0
    written = tmp_path / "runs" / "eval" / "grpo--final.json"  # under runs/, not inside the model
    assert json.loads(written.read_text())["results"]["gsm8k_local"]["exact_match"]["n"] == 3
    assert not (runs / "grpo" / "final" / "eval.json").exists()
    gen = ["generate", str(runs / "sft" / "final"), "--chat", "--prompt", "What is 2 + 2?", "--max-new-tokens", "5"]
    assert main(gen) == 0
    assert "--- [0] What is 2 + 2?" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", str(runs / "dpo" / "final"), "--max-new-tokens", "4", "--system", ""]) == 0
    assert "chatting with" in capsys.readouterr().out


def test_dpo_card_command_runs_plain_dpo_on_user_pairs(bases, tmp_path, monkeypatch, capsys):
    """`aligner dpo --beta 0.1 --data.source pairs.jsonl` on ordinary pairs (no `answer` column): the default
    recipe's on-policy sampling and RPO term switch off with a notice, and step 1 is plain DPO's ln 2."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(bases / "gpt", tmp_path / "runs" / "sft" / "final")
    pairs = [
        {"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.", "rejected": f"It is {a + b + 1}."}
        for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 9), (4, 4), (6, 1), (8, 3)]
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    args = ["dpo", "--beta", "0.1", "--data.source", "pairs.jsonl", *QUIET, "--max_steps", "2"]
    assert main(args + ["--train.micro_batch_size", "4", "--dpo.accuracy_items", "0"]) == 0
    out = capsys.readouterr().out
    assert "no 'answer' column" in out and "plain offline DPO" in out
    first = metrics(tmp_path / "runs" / "dpo")[0]
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-6) and "dpo/nll" not in first
    # set explicitly, sampling without answers to judge is an error, and RPO stays on
    assert main(args + ["--train.name", "x", "--sample_pairs", "2"]) == 2
    assert "needs rows with an 'answer' column" in capsys.readouterr().err
    assert main(args + ["--train.name", "rpo", "--sft_weight", "1.0", "--dpo.accuracy_items", "0"]) == 0
    first = metrics(tmp_path / "runs" / "rpo")[0]
    assert first["dpo/loss"] == pytest.approx(math.log(2), abs=1e-6) and first["train/loss"] > first["dpo/loss"]
    assert first["train/loss"] == pytest.approx(first["dpo/loss"] + first["dpo/nll"], abs=1e-5)


def test_missing_start_checkpoint_names_the_command_that_makes_it(tmp_path, monkeypatch, capsys):
    import aligner.config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(aligner.config.REPO_ROOT / "recipes")
    monkeypatch.setattr(aligner.config, "REPO_ROOT", tmp_path)  # no runs/ of the checkout is found either
    for command, stage in [("sft", "pretrain"), ("dpo", "sft"), ("grpo", "sft"), ("rm", "sft")]:
        assert main([command, "--max_steps", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"runs/{stage}/final' does not exist" in err, err
        assert f"run `aligner {stage}` first" in err
    assert main(["eval", "runs/sft/final"]) == 2 and "run `aligner sft` first" in capsys.readouterr().err
    assert main(["eval", "runs/rloo/final"]) == 2 and "run `aligner rloo` first" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_a_bf16_loaded_model_trains(bases, tmp_path, lora, capsys):
    from conftest import sft_recipe
    from safetensors.torch import load_file

    from aligner.config import ModelConfig
    from aligner.model.load import build_model

    assert next(build_model(ModelConfig(init_from=str(bases / "llama"), dtype="bf16"), None).parameters()).dtype == (
        torch.bfloat16
    )
    assert next(build_model(ModelConfig(init_from=str(bases / "gpt"), dtype="bf16"), None).parameters()).dtype == (
        torch.bfloat16
    )
    recipe = sft_recipe(
        tmp_path, bases / "llama", "hf", model={"dtype": "bf16"}, train={"precision": "bf16", "lr": 1e-2},
        lora={"enabled": lora, "r": 4, "alpha": 8}, sft={"accuracy_items": 0},
    )  # fmt: skip
    assert main(["sft", str(recipe)]) == 0
    final = tmp_path / "runs" / "s" / "final"
    if lora:
        adapter = load_file(final / "adapter_model.safetensors")
        assert all(float(v.float().abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    else:
        weights, base = load_file(final / "model.safetensors"), load_file(bases / "llama" / "model.safetensors")
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
        moved = [k for k in base if not torch.equal(weights[k].float(), base[k].to(torch.bfloat16).float())]
        assert len(moved) > len(base) // 2


def test_attn_implementation_reaches_transformers(arch):
    from aligner.errors import ConfigError
    from aligner.model.load import load_hf_model

    family, path = arch
    assert load_hf_model(str(path), attn_implementation="eager").config._attn_implementation == "eager"
    if family == "gemma2":  # transformers refuses sdpa for Gemma-2 (no soft caps in sdpa): one line, not a traceback
        with pytest.raises(ConfigError, match="cannot load"):
            load_hf_model(str(path), attn_implementation="sdpa")


def test_learning_rate_follows_the_model(bases, tmp_path, capsys):
    """A pretrained model gets a rate for its size unless the user chose one; the task world's core (a core
    checkpoint this toolkit wrote, with its recipe.yaml) keeps the recipe's."""
    import doctest
    import shutil

    from aligner.config import load_recipe
    from aligner.model.load import build_model
    from aligner.trainers import sft
    from aligner.trainers.setup import default_lr, resolve_lr

    assert doctest.testmod(sft).failed == 0
    assert default_lr("grpo", False, 7e9) == 5e-7 and default_lr("sft", True, 70e9) == 5e-5
    chat = REPO / "recipes" / "chat.yaml"
    ours = tmp_path / "ours"
    shutil.copytree(bases / "gpt", ours)
    (ours / "recipe.yaml").write_text("# written by a run\n")
    for init, flags, lr in [
        (bases / "llama", {}, 2e-5),  # a Hub-style model: recipes/chat.yaml's 3e-3 would wreck it
        (bases / "gpt", {}, 2e-5),  # the core runs it, but this toolkit did not train it
        (ours, {}, 3e-3),  # the task world's chain: the recipe's rate
        (bases / "llama", {"lr": 1e-4}, 1e-4),  # chosen by a flag
        (bases / "llama", {"lora.enabled": True}, 2e-4),
    ]:
        recipe = load_recipe(chat, {"model.init_from": str(init), **flags}, command="sft")
        resolve_lr(recipe, build_model(recipe.model, None), "sft")
        assert recipe.train.lr == pytest.approx(lr), (init, flags)
    own = tmp_path / "own.yaml"
    own.write_text(f"model: {{init_from: '{bases / 'llama'}'}}\ntrain: {{lr: 0.001}}\n")
    recipe = load_recipe(own, command="sft")  # a recipe of the user's own: its rate stands
    resolve_lr(recipe, build_model(recipe.model, None), "sft")
    assert recipe.train.lr == 1e-3


def test_eval_output_and_hub_names(tmp_path, monkeypatch):
    from aligner.cli import check_checkpoint
    from aligner.evaluate import default_output
    from aligner.model.load import locate

    monkeypatch.chdir(tmp_path)
    assert default_output("runs/sft/final") == Path("runs/eval/sft--final.json")
    assert default_output(str(tmp_path / "runs" / "grpo" / "final")) == Path("runs/eval/grpo--final.json")
    assert default_output("Qwen/Qwen2.5-0.5B-Instruct") == Path("runs/eval/Qwen--Qwen2.5-0.5B-Instruct.json")
    assert locate("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # a Hub name passes through
    check_checkpoint("meta-llama/Llama-3.2-1B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="not a checkpoint directory"):
        check_checkpoint("empty")


def test_system_prompt_reaches_every_prompt(bases):
    from aligner.data.formats import add_system_prompt
    from aligner.model.load import load_tokenizer
    from aligner.model.tokenizer import system_prompt
    from aligner.trainers.setup import encode_prompts

    text = system_prompt("gsm8k_system.txt")
    assert "\\boxed{}" in text and system_prompt("Be brief.") == "Be brief." and system_prompt(None) is None
    rows = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": [{"role": "system", "content": "x"}]}]
    records, _ = encode_prompts(rows[:1], load_tokenizer(bases / "gpt"), 512, "rows", text)
    assert records[0]["prompt"][0] == {"role": "system", "content": text} and records[0]["answer"] == "4"
    kept = add_system_prompt([{"prompt": rows[1]["prompt"]}, {"messages": []}], text)
    assert kept[0]["prompt"] == rows[1]["prompt"] and kept[1]["messages"] == []  # a system turn of its own stays
