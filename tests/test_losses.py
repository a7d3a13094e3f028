"""Loss values against hand-computed numbers and against torch's own cross-entropy."""

import math

import torch
import torch.nn.functional as F

from aligner.logprobs import IGNORE_INDEX, masked_mean, token_logprobs
from aligner.losses import sft_loss


def test_token_logprobs_matches_log_softmax_and_is_chunked():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    for chunk in (1, 4, 1024):
        assert torch.allclose(token_logprobs(logits, labels, chunk_size=chunk), ref, atol=1e-6)


def test_token_logprobs_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 9).bfloat16()
    labels = torch.randint(0, 9, (2, 5))
    out = token_logprobs(logits, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert torch.allclose(out, ref, atol=1e-6)


def test_sft_loss_by_hand():
    """Two positions, vocab 2, logits [0, 0] -> NLL ln 2 each; [ln 3, 0] on label 0 -> ln(4/3).

    The third position is masked. Sum = ln 2 + ln(4/3) = ln(8/3); 2 loss tokens.
    """
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, IGNORE_INDEX]])
    loss, stats = sft_loss(token_logprobs(logits, labels), labels)
    assert math.isclose(loss.item(), math.log(8 / 3), rel_tol=1e-6)
    assert int(stats["tokens"]) == 2


def test_sft_loss_sum_equals_torch_cross_entropy_sum():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 13, requires_grad=True)
    labels = torch.randint(0, 13, (4, 6))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 4:] = IGNORE_INDEX
    loss, stats = sft_loss(token_logprobs(logits, labels), labels)
    ref = F.cross_entropy(logits.reshape(-1, 13), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(loss, ref, atol=1e-5)
    assert stats["tokens"] == int((labels != IGNORE_INDEX).sum())
    (g1,) = torch.autograd.grad(loss, logits)
    logits2 = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(logits2.reshape(-1, 13), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum").backward()
    assert torch.allclose(g1, logits2.grad, atol=1e-6)


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert masked_mean(v, m).item() == 2.0
    assert masked_mean(v, m, dim=1).tolist() == [2.0, 0.0]
