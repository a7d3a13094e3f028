"""SFT: loss parity with TRL's SFTTrainer, padding-free packing == padding, and the model kinds.

Models are tiny (GPT core, transformers Llama, Llama-3, Qwen2, Gemma-2 and Mistral) and built here;
conversations come from the task world, rendered with the ChatML template by a tokenizer built in conftest.
"""

import pytest
import torch
from conftest import chat_tokenizer, tiny_gpt, tiny_hf, tiny_llama

from aligner.data.chat import encode_conversation, encode_dataset
from aligner.data.collate import pack_examples, pad_examples
from aligner.data.world import world_rows
from aligner.logprobs import token_logprobs
from aligner.losses import sft_loss
from aligner.model.forward import causal_lm_logits


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer("chatml")


@pytest.fixture(scope="module")
def examples(tok):
    records = [{"messages": r["messages"]} for r in world_rows("sft", "train", n=12)]
    ex, report = encode_dataset(records, tok, max_len=512)
    assert report.kept == 12
    return ex


def make(kind: str, vocab: int, tok=None):
    if kind == "gpt":
        return tiny_gpt(vocab=vocab)
    if kind == "llama":
        return tiny_llama(vocab=vocab)
    if kind == "qwen2":
        return tiny_hf("qwen2", vocab)
    import transformers
    from tiny_archs import MODEL_CLASS, tiny_config

    torch.manual_seed(0)  # Llama-3 RoPE scaling, Gemma-2 soft caps and sliding windows (16), Mistral's window (32)
    return getattr(transformers, MODEL_CLASS[kind])(tiny_config(kind, vocab, tok))


def test_loss_equals_trl_sft_trainer(tok, examples, tmp_path):
    """Identical ids, masks and weights: aligner's token-mean NLL == TRL SFTTrainer.compute_loss within 1e-5."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama(vocab=len(tok))
    rows = []
    for r in world_rows("sft", "train", n=12):
        ids, mask = encode_conversation(tok, r["messages"])
        rows.append({"input_ids": ids, "assistant_masks": mask})
    args = SFTConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(rows),
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    model.train()
    trl_loss = trainer.compute_loss(model, batch)

    ours = pad_examples(examples, tok.pad_token_id)
    total, stats = sft_loss(token_logprobs(causal_lm_logits(model, ours["input_ids"]), ours["labels"]), ours["labels"])
    assert stats["tokens"] == ours["n_loss"]
    assert abs(float(total / ours["n_loss"]) - float(trl_loss)) < 1e-5


@pytest.mark.parametrize("kind", ["gpt", "llama", "qwen2", "llama3", "gemma2", "mistral"])
def test_packed_equals_padded_loss_and_grads(tok, examples, kind):
    model = make(kind, len(tok), tok).train()
    padded = pad_examples(examples, tok.pad_token_id)
    packed = pack_examples(examples, tok.pad_token_id, row_len=400)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # it really packed
    assert packed["n_loss"] == padded["n_loss"] and packed["n_tokens"] == padded["n_tokens"]

    def loss_and_grads(batch):
        model.zero_grad()
        logits = causal_lm_logits(model, batch["input_ids"], batch.get("position_ids"))
        loss, _ = sft_loss(token_logprobs(logits, batch["labels"]), batch["labels"])
        (loss / batch["n_loss"]).backward()
        return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    assert abs(loss_a - loss_b) / padded["n_loss"] < 1e-5
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


def test_packing_without_the_document_mask_would_differ(tok, examples):
    """The check above can fail: the same packed rows with plain causal attention give another loss."""
    model = tiny_gpt(vocab=len(tok))
    packed = pack_examples(examples, tok.pad_token_id, row_len=400)
    with torch.no_grad():
        labels = packed["labels"]
        right, _ = sft_loss(
            token_logprobs(causal_lm_logits(model, packed["input_ids"], packed["position_ids"]), labels), labels
        )
        wrong, _ = sft_loss(token_logprobs(causal_lm_logits(model, packed["input_ids"]), labels), labels)
    assert abs(float(right - wrong)) / packed["n_loss"] > 1e-4  # ten times the tolerance above


def test_pack_rows_and_positions():
    ex = [{"input_ids": torch.arange(n), "labels": torch.arange(n)} for n in (5, 3, 4, 2)]
    b = pack_examples(ex, pad_id=99, row_len=8)
    assert b["input_ids"].shape == (2, 8)  # 5+3 and 4+2 (+2 padding)
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert b["labels"][1, 6:].tolist() == [-100, -100] and b["n_tokens"] == 14
    # an example longer than the row gets a row of its own
    b = pack_examples(ex, pad_id=99, row_len=3)
    assert b["input_ids"].shape[1] == 5
