"""The shared training loop: accumulation invariance, exact resume, NaN stop, checkpoints."""

import json

import pytest
import torch
from conftest import StubTokenizer, loop_recipe, tiny_gpt, variable_examples

from aligner import checkpoint as ckpt
from aligner.trainers.base import Trainer, TrainingError, param_groups, warmup_cosine
from aligner.trainers.sft import SFTTrainer


def one_step(tmp_path, mb, accum, examples, keep_grads=False, lr=3e-4):
    recipe = loop_recipe(tmp_path, micro_batch_size=mb, grad_accum=accum, max_steps=1, weight_decay=0.1, lr=lr)
    model = tiny_gpt(seed=0)
    trainer = SFTTrainer(recipe, model, StubTokenizer(), examples)
    if keep_grads:
        trainer.optimizer.zero_grad = lambda **kw: None
    metrics = trainer.train_step(0)
    return model, metrics


def test_accumulation_invariance(tmp_path):
    """micro-batch 8 x accumulation 1 == micro-batch 2 x accumulation 4 (fp32, within 1e-6),
    with micro-batches holding different numbers of loss tokens.

    Gradients agree to fp32 rounding (different padding widths sum in different orders). AdamW's
    first step is ~lr * g / (|g| + eps), which amplifies that rounding for gradient entries near
    eps = 1e-8 by up to lr * 2e-3 here; at lr 3e-4 the parameters agree within 1e-6.
    """
    examples = variable_examples(8)
    counts = [int((e["labels"] != -100).sum()) for e in examples]
    assert len(set(counts)) > 3  # the micro-batches really differ in loss tokens
    a, ma = one_step(tmp_path, 8, 1, examples, keep_grads=True)
    b, mb = one_step(tmp_path, 2, 4, examples, keep_grads=True)
    assert ma["train/loss"] == pytest.approx(mb["train/loss"], abs=1e-6)
    assert ma["train/tokens"] == mb["train/tokens"]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-7, rtol=1e-5), name
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_loss_is_token_mean_over_the_whole_batch(tmp_path):
    """The logged loss is total NLL / total loss tokens, not a mean of micro-batch means."""
    examples = variable_examples(4)
    model = tiny_gpt(seed=0)
    with torch.no_grad():
        nll, n = 0.0, 0
        for e in examples:
            logits = model(e["input_ids"][None])
            mask = e["labels"] != -100
            nll += torch.nn.functional.cross_entropy(logits[0][mask], e["labels"][mask], reduction="sum").item()
            n += int(mask.sum())
    _, metrics = one_step(tmp_path, 1, 4, examples)
    assert metrics["train/loss"] == pytest.approx(nll / n, rel=1e-5)


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


def train_until_crash(trainer, crash_step: int) -> None:
    """Run `trainer` and interrupt it (as Ctrl-C would) when it reaches step index `crash_step`."""
    real_step = trainer.train_step

    def step_or_crash(step):
        if step == crash_step:
            raise KeyboardInterrupt
        return real_step(step)

    trainer.train_step = step_or_crash
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_exact_resume_in_process(tmp_path):
    """A run interrupted after a checkpoint and resumed equals an uninterrupted run, exactly."""
    examples = variable_examples(24, seed=3)
    recipe = loop_recipe(tmp_path, name="full", max_steps=8, save_every=3, eval_every=4)
    full = SFTTrainer(recipe, tiny_gpt(seed=0), StubTokenizer(), examples, examples[:5])
    full.train()

    recipe = loop_recipe(tmp_path, name="cut", max_steps=8, save_every=3, eval_every=4)
    cut = SFTTrainer(recipe, tiny_gpt(seed=0), StubTokenizer(), examples, examples[:5])
    train_until_crash(cut, 5)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "cut")] == [3]
    assert max(losses(tmp_path / "cut")) == 5  # steps 4 and 5 were logged before the crash

    recipe = loop_recipe(tmp_path, name="cut", max_steps=8, save_every=3, eval_every=4, resume=True)
    resumed = SFTTrainer(recipe, tiny_gpt(seed=123), StubTokenizer(), examples, examples[:5])
    resumed.train()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")  # exact, fp32 on CPU
    for pa, pb in zip(full.unwrapped().parameters(), resumed.unwrapped().parameters()):
        assert torch.equal(pa, pb)
    for name in ("final", "step_000008"):
        assert (tmp_path / "cut" / name / "model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    examples = variable_examples(16)
    recipe = loop_recipe(tmp_path, max_steps=6, save_every=2)
    trainer = SFTTrainer(recipe, tiny_gpt(), StubTokenizer(), examples)
    real = trainer.compute_loss

    def poisoned(model, batch):
        loss, stats = real(model, batch)
        return (loss * float("nan") if trainer.step >= 3 else loss), stats

    trainer.compute_loss = poisoned
    with pytest.raises(TrainingError, match=r"train/loss is nan at step 4.*last good checkpoint is .*step_000002"):
        trainer.train()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [2]
    assert not (tmp_path / "run" / "final").exists()


def test_checkpoints_are_complete_pruned_and_loadable(tmp_path):
    from aligner.model.gpt import GPT

    examples = variable_examples(16)
    recipe = loop_recipe(tmp_path, max_steps=6, save_every=2, keep_checkpoints=2)
    trainer = SFTTrainer(recipe, tiny_gpt(), StubTokenizer(), examples)
    trainer.train()
    run = tmp_path / "run"
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6]
    assert not list(run.glob(".tmp_*")) and not list(run.glob(".old_*"))
    for f in ("model.safetensors", "config.json", "recipe.yaml", "trainer_state.pt", "rng_state_0.pt"):
        assert (run / "final" / f).is_file(), f
    state = ckpt.load_trainer_state(run / "final")  # weights_only
    assert state["step"] == 6
    loaded = GPT.from_pretrained(run / "final")
    for pa, pb in zip(trainer.unwrapped().parameters(), loaded.parameters()):
        assert torch.equal(pa, pb)


def test_schedule_and_param_groups():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    model = tiny_gpt()
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.ndim >= 2 for p in decay["params"])
    assert model.model.embed_tokens.weight in no_decay["params"]
    assert all(p.ndim == 1 for p in no_decay["params"] if p is not model.model.embed_tokens.weight)


def test_data_order_is_a_function_of_step(tmp_path):
    examples = variable_examples(10)
    recipe = loop_recipe(tmp_path, micro_batch_size=3, grad_accum=1, max_steps=10)
    t = Trainer(recipe, tiny_gpt(), StubTokenizer(), examples)
    seen = [i for s in range(10) for i in t.step_indices(s)]
    # 30 positions over 10 examples = 3 full epochs, each a permutation
    for epoch in range(3):
        assert sorted(seen[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    t2 = Trainer(recipe, tiny_gpt(), StubTokenizer(), examples)
    assert t2.step_indices(7) == t.step_indices(7)


def test_tensorboard_tracker_and_plot(tmp_path):
    examples = variable_examples(8)
    recipe = loop_recipe(tmp_path, max_steps=3, eval_every=2, trackers=["tensorboard"])
    SFTTrainer(recipe, tiny_gpt(), StubTokenizer(), examples, examples[:4]).train()
    run = tmp_path / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= rows[0].keys()
    assert "eval/loss" in rows[1] and "eval/ppl" in rows[2]
    assert (run / "metrics.png").stat().st_size > 1000


def test_exact_resume_with_lora_adapters(tmp_path):
    """The same for a LoRA run: checkpoints hold only the adapter, and resuming loads it back exactly."""
    from aligner.config import LoRAConfig
    from aligner.model.load import apply_lora

    def lora_gpt(seed):
        torch.manual_seed(seed)
        return apply_lora(tiny_gpt(seed=0), LoRAConfig(enabled=True, r=4, alpha=8, dropout=0.1))

    examples = variable_examples(24, seed=3)
    full = SFTTrainer(
        loop_recipe(tmp_path, name="full", max_steps=6, save_every=3), lora_gpt(1), StubTokenizer(), examples
    )
    full.train()
    cut = SFTTrainer(
        loop_recipe(tmp_path, name="cut", max_steps=6, save_every=3), lora_gpt(1), StubTokenizer(), examples
    )
    train_until_crash(cut, 4)
    assert (tmp_path / "cut" / "step_000003" / "adapter_model.safetensors").is_file()
    recipe = loop_recipe(tmp_path, name="cut", max_steps=6, save_every=3, resume=True)
    resumed = SFTTrainer(recipe, lora_gpt(99), StubTokenizer(), examples)  # other adapter init: must be loaded
    resumed.train()
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    for (name, pa), pb in zip(full.unwrapped().named_parameters(), resumed.unwrapped().parameters()):
        assert torch.equal(pa, pb), name
