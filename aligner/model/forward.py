"""Forward passes of any causal LM, the GPT core or a transformers model, wrapped or not (DDP, peft):
logits, per-token log-probs of labels (the LM head fused with the log-softmax where it can be), and
gradient checkpointing. Torch only: transformers models are used through their forward's arguments.
"""

from __future__ import annotations

import functools
import inspect

import torch

from aligner.errors import ConfigError
from aligner.logprobs import IGNORE_INDEX, linear_token_logprobs, token_logprobs
from aligner.model.attention import build_attn_mask
from aligner.model.gpt import GPT, GPTConfig


def base_config(model: torch.nn.Module):
    """The config of the model inside any wrappers (DDP's .module, peft's base model)."""
    while hasattr(model, "module"):
        model = model.module
    return model.config


def causal_lm_logits(model: torch.nn.Module, input_ids: torch.Tensor, position_ids=None) -> torch.Tensor:
    """Logits (B, T, V) of the GPT core or an HF model, wrapped or not; position_ids may pack rows."""
    if isinstance(base_config(model), GPTConfig):
        return model(input_ids, position_ids=position_ids)
    # no cache and no attention mask: transformers reads restarting position_ids as packed documents
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _innermost(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP's .module and peft's wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (GPT core, HF models,
    reward/value models over either; through DDP and peft wrappers). Non-reentrant, so frozen
    embeddings under LoRA need no input-grad hook."""
    inner = _innermost(model)
    if hasattr(inner, "policy"):  # PPO's policy + critic
        for part in (inner.policy, getattr(inner, "critic", None)):
            if part is not None:
                enable_gradient_checkpointing(part)
        return
    gpt = inner if isinstance(inner, GPT) else getattr(inner, "_gpt", None)
    if gpt is not None:
        gpt.gradient_checkpointing = True
        return
    body = inner if hasattr(inner, "gradient_checkpointing_enable") else getattr(inner, "model", None)
    if body is None or not hasattr(body, "gradient_checkpointing_enable"):
        raise ConfigError(f"train.gradient_checkpointing: {type(inner).__name__} does not support it")
    body.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the model's forward has a parameter `name` (transformers' arguments change across releases)."""
    return name in _forward_parameters(type(model))


def skips_head(model: torch.nn.Module) -> bool:
    """Whether a transformers model's forward can compute the LM head on the last positions only."""
    return forward_takes(model, "logits_to_keep")


def fused_head(model: torch.nn.Module) -> torch.Tensor | None:
    """The LM head's weight when log-probs may be computed from the final hidden states with it
    (`linear_token_logprobs`): a plain bias-free Linear head with no logit soft-capping or scaling and a
    forward that can skip the head (GPT core: return_hidden; transformers: logits_to_keep). Else None."""
    inner = _innermost(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None or hasattr(head.weight, "ds_id"):
        # e.g. a LoRA-wrapped or quantized head, or a ZeRO-3 partition (whole only inside the head's own
        # forward): the full path applies it properly
        return None
    cfg = inner.config
    if isinstance(cfg, GPTConfig):
        return head.weight
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    return head.weight if skips_head(inner) else None


def causal_lm_token_logprobs(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, position_ids=None, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob (B, T) fp32 of each label (0 where labels == IGNORE_INDEX) under the model, wrapped or not.

    Where the head allows (`fused_head`), the model runs without its LM head and the head and log-softmax
    run together over the label positions only, in chunks (no (B, T, V) logits, forward or backward);
    otherwise from the full logits, chunked in fp32.
    """
    if fused_head(model) is None:
        logits = causal_lm_logits(model, input_ids, position_ids)
        if temperature != 1.0:
            logits = logits.float() / temperature
        return token_logprobs(logits, labels) * (labels != IGNORE_INDEX)
    if isinstance(base_config(model), GPTConfig):
        hidden = model(input_ids, position_ids=position_ids, return_hidden=True)
    else:  # the head runs on one position only; the last hidden state is the final norm's output
        out = model(
            input_ids=input_ids,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[-1]
    # the head's weight as the forward left it: a sharded model (FSDP2) holds it unsharded only from its forward
    return linear_token_logprobs(hidden, fused_head(model), labels, temperature)


def prefix_window(model: torch.nn.Module) -> float:
    """The longest row over which the model's forward takes documents with branches after a shared prefix
    (`attention.build_attn_mask`'s `branch_ids`): any for the GPT core; for a transformers model whose
    attention is SDPA (a boolean 4-D mask used as given), rows up to its sliding window, which a given mask
    replaces; 0 for other attention kernels (flash attention, eager with soft-capping)."""
    cfg = base_config(model)
    if isinstance(cfg, GPTConfig):
        return float("inf")
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return 0.0
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    return float("inf") if window is None else float(window)


def forward_costs(model: torch.nn.Module) -> tuple[float, float]:
    """The forward's multiply-adds x 2 per token in the decoder's linear layers and per query-key pair in
    attention (QK^T and the weighted sum of V), summed over layers, from the config: what a layout of the
    same tokens costs (`collate.shared_prompt_cost`)."""
    cfg = base_config(model)
    d, heads, layers = cfg.hidden_size, cfg.num_attention_heads, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    per_layer = d * hd * (2 * heads + 2 * kv) + 3 * d * cfg.intermediate_size
    return 2.0 * per_layer * layers, 4.0 * heads * hd * layers


def causal_lm_shared_logprobs(model: torch.nn.Module, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """`causal_lm_token_logprobs` of a padded batch (B, T) that `collate.share_prompts` laid out as
    documents of completions branching from their shared prompt: each prompt runs once per document, and
    each label's log-prob comes from the hidden state that predicts it. Returns (B, T) fp32, 0 where no label."""
    ids, docs, branches = batch["shared_input_ids"], batch["shared_doc_ids"], batch["shared_branch_ids"]
    positions, fused = batch["shared_position_ids"], fused_head(model) is not None
    if isinstance(base_config(model), GPTConfig):
        out = model(ids, position_ids=positions, return_hidden=fused, document_ids=docs, branch_ids=branches)
    else:
        mask = build_attn_mask(ids.shape[1], 0, None, ids.device, docs, branches)
        kw = dict(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
        if fused:  # the head on one position only; the last hidden state is the final norm's output
            out = model(**kw, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        else:
            out = model(**kw).logits
    rows = out.reshape(-1, out.shape[-1]).index_select(0, batch["shared_from"])  # (N, D) or (N, V)
    targets = batch["shared_targets"]
    if fused:  # the head's weight as the forward left it (FSDP2: unsharded only from its forward)
        picked = linear_token_logprobs(rows, fused_head(model), targets, temperature)
    else:
        picked = token_logprobs(rows[None].float() / temperature, targets[None])[0]
    B, T = batch["labels"].shape
    flat = torch.zeros(B * T, dtype=torch.float32, device=picked.device)
    return flat.index_put((batch["shared_slots"],), picked).view(B, T)
