"""Shared fixtures: tiny GPT-core models, variable-length examples, recipes for the loop."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aligner.config import Recipe, TrainConfig

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny models: a second thread costs more than it gives


class StubTokenizer:
    """Just what the loop needs from a tokenizer when the test builds token ids itself."""

    pad_token_id = 0
    eos_token_id = 1

    def save_pretrained(self, directory):
        pass


def tiny_gpt(vocab: int = 64, seed: int = 0, **kw):
    from aligner.model.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    cfg.update(kw)
    return GPT(GPTConfig(**cfg))


def tiny_hf(family: str = "llama", vocab: int = 64, seed: int = 0, **kw):
    """A tiny transformers causal LM (llama or qwen2) in eval mode (no special-token ids unless given)."""
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
    )
    cfg.update(kw)
    return model_cls(config_cls(**cfg)).eval()


def tiny_llama(vocab: int = 64, seed: int = 0, **kw):
    return tiny_hf("llama", vocab, seed, **kw)


def variable_examples(n: int, vocab: int = 64, seed: int = 0, min_len: int = 4, max_len: int = 24) -> list[dict]:
    """Examples of different lengths with a masked prompt part, so loss-token counts differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(2, vocab, (length + 1,), generator=g)
        labels = ids[1:].clone()
        prompt = int(torch.randint(0, length - 1, (1,), generator=g))
        labels[:prompt] = -100
        out.append({"input_ids": ids[:-1], "labels": labels})
    return out


def loop_recipe(out_dir: Path, **train) -> Recipe:
    base = dict(
        out_dir=str(out_dir),
        name="run",
        lr=1e-2,
        warmup_steps=1,
        precision="fp32",
        progress=False,
        eval_every=0,
        save_every=0,
        micro_batch_size=4,
        grad_accum=1,
        max_steps=4,
    )
    base.update(train)
    return Recipe(train=TrainConfig(**base))


TEXT = [
    "What is 12 + 30? 12 + 30 = 42. Final answer: 42. Which is larger: 9.9 or 9.11? The larger is 9.9.",
    "Count the letter r in strawberry. There are 3. Be brief. You are a helpful assistant.",
] * 20

# template -> (special tokens, bos, eos, end-of-turn token, post-processor adds BOS)
FAMILIES = {
    "chatml": (["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|im_end|>", False),
    "qwen": (["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"], None, "<|endoftext|>", "<|im_end|>", False),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        True,
    ),
    "mistral": (["<s>", "</s>", "<pad>"], "<s>", "</s>", "</s>", True),
    "gemma": (
        ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        True,
    ),
}


def chat_tokenizer(name: str):
    """A small byte-level BPE with the family's specials; some add BOS on encode, like their real tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from aligner.model.tokenizer import load_chat_template

    specials, bos, eos, _, adds_bos = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT, trainer=trainer)
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    pad = [s for s in specials if "pad" in s][0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos, pad)]})
    fast.chat_template = load_chat_template(name)
    return fast


@pytest.fixture(scope="session")
def bases(tmp_path_factory):
    """A tokenizer with the ChatML template, saved next to a tiny GPT core and a tiny transformers Llama."""
    root = tmp_path_factory.mktemp("bases")
    from aligner.config import ModelConfig
    from aligner.data.world import world_rows
    from aligner.model.load import build_model, vocab_padded
    from aligner.model.tokenizer import load_chat_template, train_tokenizer

    texts = [r["text"] for r in world_rows("pretrain", "train", n=300)]
    tok = train_tokenizer(texts, vocab_size=400, chat_template=load_chat_template("chatml"))
    torch.manual_seed(0)
    gpt = build_model(ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=512), tok)
    gpt.save_pretrained(root / "gpt")
    tok.save_pretrained(root / "gpt")
    llama = tiny_llama(vocab=vocab_padded(len(tok)), pad_token_id=tok.pad_token_id, max_position_embeddings=512)
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return root


def tiny_run_recipe(tmp_path: Path, recipe: dict, sections: dict, file: str) -> Path:
    """Write `recipe` with a tiny, quiet, fp32 train section (3 steps, no evals or checkpoints) and the
    test's `sections` overrides merged in; returns the file."""
    train = dict(out_dir=str(tmp_path / "runs"), max_steps=3, micro_batch_size=4, precision="fp32")
    train.update(eval_every=0, save_every=0, progress=False)
    recipe = {"lora": {}, **recipe, "train": {**train, **recipe.get("train", {})}}
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / file
    path.write_text("# test recipe\n" + yaml.safe_dump(recipe))
    return path


def grpo_recipe(tmp_path: Path, base: Path, **sections) -> Path:
    """A short GRPO run from `base` on the task world's prompts (`sections`: overrides, merged per key)."""
    recipe = {
        "model": {"init_from": str(base)},
        "grpo": {"num_generations": 4, "accuracy_items": 0},
        "rollout": {"max_new_tokens": 12},
        "data": {"source": "world:rl", "num_rows": 32, "num_eval_rows": 4, "seq_len": 256},
        "train": {"name": "g", "lr": 1e-2, "warmup_steps": 1, "micro_batch_size": 8},
        "sft": {"chat_template": "chatml"},
    }
    return tiny_run_recipe(tmp_path, recipe, sections, "grpo.yaml")


# an untrained model gets no reward from the answer checker; a reward that varies within groups gives signal
ID_REWARD = (
    "def low_ids(prompts, completions, completion_ids, **row):\n    return [-sum(c) / 1000 for c in completion_ids]\n"
    "def some_flat(prompts, completions, completion_ids, **row):  # no signal for some prompts\n"
    "    return [0.1 if len(str(p)) % 3 else -sum(c) / 1000 for p, c in zip(prompts, completion_ids)]\n"
)


@pytest.fixture
def id_reward(tmp_path, monkeypatch):
    (tmp_path / "id_reward.py").write_text(ID_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for processes the test launches
    return "id_reward:low_ids"


def sft_recipe(tmp_path: Path, base: Path, arch: str = "gpt", **sections) -> Path:
    recipe = {
        "model": {"init_from": str(base), "arch": arch},
        "sft": {"chat_template": "chatml", "accuracy_items": 8, "accuracy_tokens": 12, "samples": 1},
        "data": {"source": "world:sft", "num_rows": 48, "num_eval_rows": 8, "seq_len": 256},
        "train": {"name": "s", "lr": 1e-2},
    }
    return tiny_run_recipe(tmp_path, recipe, sections, "sft.yaml")


@pytest.fixture
def python() -> str:
    return sys.executable


def launch_two_processes(argv: list[str], env: dict | None = None, config: str | None = None):
    """`accelerate launch` 2 CPU processes (gloo) running `python -m aligner ARGV`; asserts success. `env`:
    more environment (ACCELERATE_USE_FSDP and FSDP_VERSION, as an FSDP2 config file sets them); `config`: a
    launch config file of the repository's (recipes/accelerate/zero3.yaml)."""
    launcher = str(Path(sys.executable).parent / "accelerate")
    if config:
        cmd = [launcher, "launch", "--config_file", str(REPO / config), "--num_processes", "2"]
    else:
        cmd = [launcher, "launch", "--num_processes", "2", "--num_machines", "1", "--multi_gpu"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "aligner", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def interrupted_copy(run: Path, dest: Path, step: int) -> Path:
    """`run` as it stood after `step`, as if killed then: a copy without its later checkpoints and final, and
    with its metrics cut at `step` (what `--resume` finds after a kill)."""
    shutil.copytree(run, dest)
    for later in [dest / "final", *(d for d in dest.glob("step_*") if int(d.name.split("_")[1]) > step)]:
        shutil.rmtree(later, ignore_errors=True)
    kept = [x for x in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= step]
    (dest / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return dest


@pytest.fixture(scope="session")
def reward_model(bases, tmp_path_factory):
    """A reward model on the tiny GPT core's backbone, its head random (scores that differ between completions)."""
    from aligner.model.gpt import GPT
    from aligner.model.heads import ScalarHeadModel
    from aligner.model.load import load_tokenizer

    path = tmp_path_factory.mktemp("rm") / "rm"
    torch.manual_seed(1)
    rm = ScalarHeadModel.from_causal_lm(GPT.from_pretrained(bases / "gpt"))
    torch.nn.init.normal_(rm.score.weight, 0, 1.0)  # scores that differ between completions
    rm.save_pretrained(path)
    load_tokenizer(bases / "gpt").save_pretrained(path)
    return path
