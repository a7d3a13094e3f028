"""Completions that share their prompt (a GRPO group) as branches after one copy of it
(`collate.share_prompts`, `forward.causal_lm_shared_logprobs`): the layout by hand, the log-probs and
gradients of the padded batch on the GPT core and transformers models, and the cost rule that picks it."""

from __future__ import annotations

import pytest
import torch
import transformers

import aligner.model.forward as forward
from aligner.data.collate import pad_examples, prompt_groups, share_prompts, sharing_branches
from aligner.logprobs import IGNORE_INDEX as X
from aligner.model.forward import causal_lm_shared_logprobs, causal_lm_token_logprobs, forward_costs, prefix_window
from aligner.model.gpt import GPT, GPTConfig


def completions(prompt, *replies):
    return [{"input_ids": (prompt + r)[:-1], "labels": [X] * (len(prompt) - 1) + r} for r in replies]


def test_the_layout_by_hand():
    rows = completions([1, 2, 3], [7, 8], [9]) + completions([4, 5], [6, 6, 6]) + completions([1, 2, 3], [10, 11])
    rows.append({"input_ids": [1, 2, 3, 5], "labels": [X] * 4})  # no labels (a masked, truncated completion)
    batch = pad_examples(rows, pad_id=0)
    groups = prompt_groups(batch)
    assert groups == [[(0, 2, 4), (1, 2, 3), (3, 2, 4)], [(2, 1, 4)]]  # (row, first label, end)
    out = share_prompts(batch, groups, branches=2)
    assert out["shared_input_ids"].tolist() == [[1, 2, 3, 7], [1, 2, 3, 10], [4, 5, 6, 6]]
    assert out["shared_branch_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert out["shared_position_ids"].tolist() == [[0, 1, 2, 3]] * 3
    assert out["shared_doc_ids"].tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2]]
    # each label, from the hidden state that predicts it: reply [9]'s only token from the prompt's last
    assert out["shared_targets"].tolist() == [7, 8, 9, 10, 11, 6, 6, 6]
    assert out["shared_from"].tolist() == [2, 3, 2, 6, 7, 9, 10, 11]
    assert batch["labels"].shape[1] == 4
    assert out["shared_slots"].tolist() == [2, 3, 6, 14, 15, 9, 10, 11]


def models():
    llama = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return [
        GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, num_key_value_heads=2)),
        transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**llama, num_key_value_heads=2)),  # q/k/v biases
    ]


@pytest.mark.parametrize("fused", [True, False])
def test_log_probs_and_gradients_are_the_padded_batchs(fused, monkeypatch):
    if not fused:  # the full-logits path (a head that cannot be fused: soft-capping, LoRA, a ZeRO-3 partition)
        monkeypatch.setattr(forward, "fused_head", lambda model: None)
    torch.manual_seed(0)
    rows = []
    for prompt in ([5, 6, 7, 8], [9, 10, 11]):
        rows += completions(prompt, *(torch.randint(12, 60, (n,)).tolist() for n in (3, 5, 1, 4)))
    rows[1]["labels"][5] = X  # a label left out inside a completion
    batch = pad_examples(rows, pad_id=0)
    groups = prompt_groups(batch)
    for model in models():
        model.float().train()
        padded = causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"], temperature=0.7)
        grads = torch.autograd.grad(padded.sum(), list(model.parameters()), allow_unused=True)
        for branches in (2, 3, 4):
            shared = causal_lm_shared_logprobs(model, share_prompts(batch, groups, branches), temperature=0.7)
            assert torch.allclose(shared, padded, atol=1e-5), (type(model).__name__, branches)
            again = torch.autograd.grad(shared.sum(), list(model.parameters()), allow_unused=True)
            for g, h in zip(grads, again):
                assert (g is None and h is None) or torch.allclose(g, h, atol=1e-5)
        wrong = share_prompts(batch, groups, 4)
        wrong["shared_branch_ids"] = torch.zeros_like(wrong["shared_branch_ids"])  # branches see each other
        assert not torch.allclose(causal_lm_shared_logprobs(model, wrong, temperature=0.7), padded, atol=1e-3)


def test_the_cost_rule_by_hand():
    # two groups of 4 completions of 10 tokens after a 5-token prompt: padded rows of 5 + 9 = 14 tokens
    rows = []
    for prompt in ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]):
        rows += completions(prompt, *([11] * 10 for _ in range(4)))
    batch = pad_examples(rows, pad_id=0)
    groups = prompt_groups(batch)
    # per token 100, per query-key pair 1: padded 8 x 14 x (100 + 7) = 11,984; 2 per document 4 x 23 x
    # (100 + 23) = 11,316; 3: 4 rows of 32 (groups of 3 + 1) x (100 + 32) = 16,896; 4: 2 x 41 x 141 = 11,562
    assert sharing_branches(batch, groups, linear=100.0, attention=1.0, window=float("inf")) == 2
    assert (
        sharing_branches(batch, groups, linear=200.0, attention=1.0, window=float("inf")) == 4
    )  # 19,762 < 20,516 (2 per document)
    assert sharing_branches(batch, groups, linear=10.0, attention=1.0, window=float("inf")) == 0  # attention dominates
    assert sharing_branches(batch, groups, linear=200.0, attention=1.0, window=30) == 2  # 41 > the window


def test_which_models_take_branches_and_their_costs():
    gpt = GPT(GPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4))
    assert prefix_window(gpt) == float("inf")
    llama = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    assert prefix_window(transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama))) == float("inf")
    eager = transformers.LlamaConfig(**llama, attn_implementation="eager")
    assert prefix_window(transformers.LlamaForCausalLM(eager)) == 0.0
    mistral = transformers.MistralConfig(**llama, sliding_window=48)
    assert prefix_window(transformers.MistralForCausalLM(mistral)) == 48.0
    # per layer: q, o 32 x 32 each, k, v 32 x 16 each (2 kv heads of 8), the MLP 3 x 32 x 64
    linear, attention = forward_costs(
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama, num_key_value_heads=2))
    )
    assert linear == 2 * 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)
    assert attention == 2 * 4 * 4 * 8
