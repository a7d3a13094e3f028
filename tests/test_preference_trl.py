"""aligner's DPO-family losses equal TRL 1.16's DPOTrainer loss on identical inputs (within 1e-5).

Same tiny transformers Llama (policy) and reference, same token ids and completion masks: TRL computes
its loss through `DPOTrainer._compute_loss`; aligner sums completion-token log-probs (`token_logprobs`)
and applies its loss function, and the two means over pairs are compared. Variants TRL does not have
(cDPO, SimPO, ORPO) are checked by hand in test_preference_losses.py.
"""

import pytest
import torch
from conftest import chat_tokenizer, tiny_llama

from aligner.logprobs import token_logprobs
from aligner.losses import PREFERENCE_LOSSES

trl = pytest.importorskip("trl")


def batch(vocab: int, pairs: int = 3, seed: int = 0):
    """[chosen rows; rejected rows], right-padded: prompt tokens then a completion of varying length."""
    g = torch.Generator().manual_seed(seed)
    rows, masks = [], []
    for side in range(2):
        for i in range(pairs):
            prompt = torch.randint(5, vocab, (4 + i,), generator=g).tolist()
            completion = torch.randint(5, vocab, (3 + 2 * i + side,), generator=g).tolist()
            rows.append(prompt + completion)
            masks.append([0] * len(prompt) + [1] * len(completion))
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    completion = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def sequence_logps(model, inputs):
    with torch.no_grad():
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    labels = inputs["input_ids"][:, 1:]
    mask = inputs["completion_mask"][:, 1:].float()
    logps = (token_logprobs(logits[:, :-1], labels) * mask).sum(-1)  # (2B,)
    return logps.chunk(2)


def trl_dpo_loss(tmp_path, **config):
    """TRL's DPOTrainer (tiny Llama policy and reference, beta 0.3) and its loss on `batch`."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok = chat_tokenizer("chatml")
    policy, ref = tiny_llama(vocab=len(tok), seed=0), tiny_llama(vocab=len(tok), seed=1)
    args = DPOConfig(output_dir=str(tmp_path), beta=0.3, report_to=[], use_cpu=True, bf16=False, **config)
    data = Dataset.from_list([{"prompt": "What is 2 + 2?", "chosen": " 4", "rejected": " 5"}] * 2)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    inputs = batch(len(tok))
    trainer.model.eval()  # no dropout either way
    return trainer, inputs, float(trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "robust"])
def test_dpo_variants_match_trl(tmp_path, loss_type):

    smoothing = 0.1 if loss_type == "robust" else 0.0
    trainer, inputs, trl_loss = trl_dpo_loss(tmp_path, loss_type=[loss_type], label_smoothing=smoothing)

    chosen, rejected = sequence_logps(trainer.model, inputs)
    ref_chosen, ref_rejected = sequence_logps(trainer.ref_model, inputs)
    lens = inputs["completion_mask"].sum(-1).float().chunk(2)
    ours, stats = PREFERENCE_LOSSES[loss_type](
        chosen_logps=chosen,
        rejected_logps=rejected,
        ref_chosen_logps=ref_chosen,
        ref_rejected_logps=ref_rejected,
        chosen_len=lens[0],
        rejected_len=lens[1],
        beta=0.3,
        label_smoothing=smoothing,
    )
    assert abs(float(ours) / 3 - trl_loss) < 1e-5
    assert abs(trl_loss) > 1e-3  # a real value, not a degenerate zero


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(tmp_path, with_margin):
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from aligner.losses import bradley_terry_loss

    tok = chat_tokenizer("chatml")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForSequenceClassification(cfg).eval()
    args = RewardConfig(output_dir=str(tmp_path), center_rewards_coefficient=0.01, report_to=[], use_cpu=True)
    data = Dataset.from_list([{"chosen": "4", "rejected": "5"}] * 2)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    inputs = batch(len(tok))
    inputs.pop("completion_mask")
    inputs["input_ids"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, tok.pad_token_id)
    margin = torch.tensor([0.5, -0.2, 1.0])
    if with_margin:
        inputs["margin"] = margin
    trl_loss = float(trainer.compute_loss(trainer.model, dict(inputs)))

    with torch.no_grad():
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
    chosen, rejected = rewards.chunk(2)
    ours, stats = bradley_terry_loss(chosen, rejected, margin=margin if with_margin else None, center_coef=0.01)
    # TRL's centring term is the batch mean of (r_c + r_r)^2, added once: per pair it is the same sum / B
    assert abs(float(ours) / 3 - trl_loss) < 1e-5


def test_kto_matches_trl_kto_trainer(tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from aligner.losses import kto_loss

    tok = chat_tokenizer("chatml")
    vocab = len(tok)
    policy, ref = tiny_llama(vocab=vocab, seed=0), tiny_llama(vocab=vocab, seed=1)
    with torch.no_grad():
        ref.lm_head.weight.mul_(4.0)  # a sharper reference: the KL estimate is positive, so z is not clamped away
    args = KTOConfig(
        output_dir=str(tmp_path),
        beta=0.2,
        desirable_weight=1.0,
        undesirable_weight=1.3,
        report_to=[],
        use_cpu=True,
        bf16=False,
    )
    rows = [{"prompt": "2 + 2?", "completion": c, "label": c == " 4"} for c in (" 4", " 5")]
    data = Dataset.from_list(rows)
    trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data, processing_class=tok)
    main = batch(vocab, pairs=3, seed=0)  # 6 unpaired rows
    mismatched = batch(vocab, pairs=3, seed=1)  # the KL estimate's prompt/completion pairs
    label = torch.tensor([True, False, True, True, False, False])
    inputs = dict(main, label=label)
    inputs.update({f"KL_{k}": v for k, v in mismatched.items()})
    trainer.model.eval()
    trl_loss = float(trainer._compute_loss(trainer.model, dict(inputs), return_outputs=False))

    logps = torch.cat(sequence_logps(trainer.model, main))
    ref_logps = torch.cat(sequence_logps(trainer.ref_model, main))
    kl_logps = torch.cat(sequence_logps(trainer.model, mismatched))
    ref_kl_logps = torch.cat(sequence_logps(trainer.ref_model, mismatched))
    kl = (kl_logps - ref_kl_logps).mean()
    ours, stats = kto_loss(logps, ref_logps, label, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.3)
    assert abs(float(ours) / 6 - trl_loss) < 1e-5
    assert stats["kl"] == pytest.approx(float(kl.clamp(min=0)))
    assert float(kl) > 0.05


def test_rpo_matches_trl_sigmoid_plus_sft(tmp_path):
    """RPO = DPO + alpha x NLL of the chosen replies: TRL 1.16 loss_type [sigmoid, sft], weights [1, alpha]."""

    from aligner.losses import dpo_sigmoid_loss, rpo_nll

    trainer, inputs, trl_loss = trl_dpo_loss(tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7])

    chosen, rejected = sequence_logps(trainer.model, inputs)
    ref_chosen, ref_rejected = sequence_logps(trainer.ref_model, inputs)
    chosen_len = inputs["completion_mask"].sum(-1).float().chunk(2)[0]
    dpo, _ = dpo_sigmoid_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.3)
    nll, stats = rpo_nll(chosen, chosen_len)
    assert abs(float(dpo + 0.7 * nll) / 3 - trl_loss) < 1e-5
    assert stats["nll"] > 0
