"""The GPU tier (`make test-gpu`, `pytest -m gpu`): what only a CUDA device can show.

Skipped, with the reason, where there is no CUDA device; the main tier (`make test`) deselects it. On a GPU:
  - the whole command chain on the task world (pretrain -> sft -> rm -> dpo with on-policy sampling -> grpo ->
    ppo -> eval -> export) with a grouped-query-attention GPT core of ~190M parameters, in bf16, its samples
    decoded through the GPU branch of the decoding attention, plus LoRA and (with bitsandbytes) QLoRA runs;
  - the rollout engine's greedy tokens equal to transformers' `generate`, for the GPT core's decoding (a
    Llama checkpoint) and for transformers' own cache (Qwen2), on left-padded batches;
  - exact resume on CUDA (`train.deterministic`): a run resumed from its step-3 checkpoint repeats the
    uninterrupted run's losses and final weights bit for bit;
  - `train.compile`: the compiled loop's losses equal the eager loop's;
  - reward-model pairs sharing their prompt (`rm.share_prefix`: SDPA with the branch mask) give the loss and
    gradients of the pairs run apart, on the GPT core and a transformers Llama;
  - with vLLM installed, the colocated engine: greedy tokens equal to the torch engine's, sleep / wake, and
    generations that follow the policy's weights after a sync, full and LoRA.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from aligner.cli import main

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# a GQA core of ~190M parameters: 16 layers of width 1024, 16 query heads sharing 8 key/value heads
GQA = ["--model.hidden_size", "1024", "--model.num_layers", "16", "--model.num_heads", "16"]
GQA += ["--model.num_kv_heads", "8"]
QUIET = ["--train.progress", "false", "--train.eval_every", "0", "--train.save_every", "0"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def finite(run: Path) -> bool:
    return all(math.isfinite(m["train/loss"]) for m in metrics(run))


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The task world's chain on the GPU, in a scratch directory; each stage from the one before."""
    root = tmp_path_factory.mktemp("gpu_chain")
    import os

    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["pretrain", *GQA, *QUIET, "--max_steps", "30", "--data.num_rows", "4000"]) == 0
        assert main(["sft", *QUIET, "--max_steps", "30", "--data.num_rows", "2000", "--accuracy_items", "64"]) == 0
        yield root
    finally:
        os.chdir(cwd)


def test_pretrained_gqa_core_is_bf16_fast_path_and_decodes(chain):
    from aligner.model.load import load_model

    model = load_model(chain / "runs" / "sft" / "final")
    assert model.config.num_key_value_heads == 8 and sum(p.numel() for p in model.parameters()) > 150e6
    assert finite(chain / "runs" / "pretrain") and finite(chain / "runs" / "sft")
    acc = json.loads((chain / "runs" / "sft" / "accuracy.json").read_text())  # decoded on the GPU (GQA branch)
    assert acc["n"] == 64


def test_rm_dpo_grpo_ppo_eval_export(chain, monkeypatch, capsys):
    monkeypatch.chdir(chain)
    assert main(["rm", *QUIET, "--max_steps", "10", "--data.num_rows", "512", "--data.num_eval_rows", "64"]) == 0
    dpo = ["dpo", *QUIET, "--max_steps", "5", "--data.num_rows", "128", "--data.num_eval_rows", "32"]
    assert main([*dpo, "--sample_pairs", "2", "--accuracy_items", "32"]) == 0  # sampling: the GQA decode branch
    grpo = ["grpo", *QUIET, "--max_steps", "3", "--data.num_rows", "256", "--data.num_eval_rows", "16"]
    assert main([*grpo, "--train.micro_batch_size", "64", "--accuracy_items", "32"]) == 0  # 8 prompts x 8
    ppo = ["ppo", *QUIET, "--max_steps", "2", "--ppo.rollout_prompts", "32", "--train.micro_batch_size", "16"]
    assert main([*ppo, "--data.num_rows", "256", "--data.num_eval_rows", "16", "--accuracy_items", "32"]) == 0
    for stage in ("rm", "dpo", "grpo", "ppo"):
        assert finite(chain / "runs" / stage), stage
    assert main(["eval", "runs/grpo/final", "--items", "64", "--metrics", "exact_match"]) == 0
    assert (chain / "runs" / "eval" / "grpo--final.json").is_file()
    lora = ["sft", "recipes/sft_lora.yaml", *QUIET, "--max_steps", "5", "--data.num_rows", "512"]
    assert main([*lora, "--train.name", "sft_lora", "--accuracy_items", "16"]) == 0
    assert main(["export", "runs/sft_lora/final", "runs/sft_lora_merged"]) == 0
    import transformers

    merged = transformers.AutoModelForCausalLM.from_pretrained(chain / "runs" / "sft_lora_merged")
    assert merged.config.num_key_value_heads == 8


def test_qlora_on_cuda(chain, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(chain)
    qlora = ["sft", "recipes/sft_qlora.yaml", *QUIET, "--max_steps", "5", "--data.num_rows", "512"]
    assert main([*qlora, "--train.name", "sft_qlora", "--accuracy_items", "16"]) == 0
    assert finite(chain / "runs" / "sft_qlora")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rollout_greedy_equals_transformers_generate(family):
    """Left-padded prompts of different lengths, fp32 without TF32: the same greedy tokens as `generate`."""
    import transformers

    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    model = model_cls(cfg).cuda().eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 512, (n,), generator=g).tolist() for n in (5, 17, 9, 12)]
    outs = TorchEngine(model, pad_id=0).generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts]).cuda()
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long().cuda()
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for out, row in zip(outs, ref[:, width:].tolist()):
        assert out.token_ids == row


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_reward_pairs_sharing_their_prompt_on_cuda(family):
    """rm.share_prefix on CUDA (SDPA with the branch mask, fp32 without TF32): the rewards, loss and gradients
    of the pairs run apart."""
    import transformers

    from aligner.config import Recipe, TrainConfig
    from aligner.data.collate import pack_shared_pairs, pad_pairs
    from aligner.model.gpt import GPT, GPTConfig
    from aligner.model.heads import ScalarHeadModel
    from aligner.trainers.rm import RewardTrainer

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, attn_implementation="sdpa",
        )  # fmt: skip
        lm = transformers.LlamaForCausalLM(cfg)
    else:
        lm = GPT(GPTConfig(vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2))  # fmt: skip
    model = ScalarHeadModel.from_causal_lm(lm).cuda()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 512, (40,), generator=g).tolist()
    pairs = [
        {"chosen": {"input_ids": (x := prompt + torch.randint(1, 512, (a,), generator=g).tolist()), "labels": x},
         "rejected": {"input_ids": (y := prompt + torch.randint(1, 512, (b,), generator=g).tolist()), "labels": y}}
        for a, b in [(20, 9), (5, 31), (12, 12)]
    ]  # fmt: skip
    trainer = RewardTrainer(Recipe(train=TrainConfig(out_dir="/nonexistent", precision="fp32")), model, None, [])
    results = []
    for batch in (pad_pairs(pairs, 0), pack_shared_pairs(pairs, 0, 256)):
        batch = trainer.to_device(batch)
        model.zero_grad()
        loss, _ = trainer.compute_loss(model, batch)
        loss.backward()
        results.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(results[1][1][name], grad, atol=1e-4), name


def test_exact_resume_on_cuda(chain, monkeypatch):
    """train.deterministic: a run resumed from its step-3 checkpoint equals the uninterrupted run bit for bit."""
    from safetensors.torch import load_file

    monkeypatch.chdir(chain)
    run = ["sft", *QUIET, "--max_steps", "6", "--data.num_rows", "512", "--accuracy_items", "0", "--samples", "0"]
    run += ["--train.deterministic", "true", "--train.save_every", "3", "--train.keep_checkpoints", "3"]
    assert main([*run, "--train.name", "whole"]) == 0
    whole, cut = chain / "runs" / "whole", chain / "runs" / "cut"
    cut.mkdir()
    shutil.copytree(whole / "step_000003", cut / "step_000003")
    (cut / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics(whole)[:3]))
    assert main([*run, "--train.name", "cut", "--resume"]) == 0
    assert [m["train/loss"] for m in metrics(cut)] == [m["train/loss"] for m in metrics(whole)]
    a, b = load_file(whole / "final" / "model.safetensors"), load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_training_equals_eager(chain, monkeypatch):
    monkeypatch.chdir(chain)
    run = ["sft", *QUIET, "--max_steps", "4", "--data.num_rows", "256", "--accuracy_items", "0", "--samples", "0"]
    assert main([*run, "--train.name", "eager", "--train.precision", "fp32"]) == 0
    assert main([*run, "--train.name", "compiled", "--train.precision", "fp32", "--train.compile", "true"]) == 0
    eager, compiled = metrics(chain / "runs" / "eager"), metrics(chain / "runs" / "compiled")
    for a, b in zip(eager, compiled):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-3)


def test_vllm_engine_on_cuda(chain):
    pytest.importorskip("vllm")
    from aligner.config import LoRAConfig
    from aligner.data.chat import encode_prompt, pad_token_id
    from aligner.data.world import world_rows
    from aligner.model.load import apply_lora, load_model, load_tokenizer
    from aligner.rollout.engine import SamplingParams
    from aligner.rollout.torch_engine import TorchEngine
    from aligner.rollout.vllm_engine import VLLMEngine

    path = chain / "runs" / "sft" / "final"
    tok = load_tokenizer(path)
    prompts = [encode_prompt(tok, r["prompt"]) for r in world_rows("rl", "val", n=8)]
    params = SamplingParams(max_new_tokens=32, temperature=0.0)
    engine = VLLMEngine(path, dtype="float32", max_model_len=512, enable_sleep_mode=True, gpu_memory_utilization=0.3)
    model = load_model(path, dtype="fp32").cuda().eval()
    ours = [o.token_ids for o in TorchEngine(model, pad_id=pad_token_id(tok)).generate(prompts, params)]
    assert [o.token_ids for o in engine.generate(prompts, params)] == ours
    engine.sleep()
    engine.wake_up()
    with torch.no_grad():  # a full policy that has moved: the engine follows it after a sync
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    engine.sync_weights(model)
    moved = [o.token_ids for o in TorchEngine(model, pad_id=pad_token_id(tok)).generate(prompts, params)]
    assert [o.token_ids for o in engine.generate(prompts, params)] == moved
    lora = apply_lora(load_model(path, dtype="fp32").cuda(), LoRAConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    engine.sync_weights(lora)  # merged into the base weights it sends
    expected = [o.token_ids for o in TorchEngine(lora.eval(), pad_id=pad_token_id(tok)).generate(prompts, params)]
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
