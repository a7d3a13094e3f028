"""The GPT core: a small decoder-only transformer with the Llama architecture.

    aligner pretrain recipes/pretrain.yaml      # trains one from scratch on the built-in task world

RoPE, RMSNorm, grouped-query attention and a SwiGLU MLP, no biases. Parameter names are exactly
those of Hugging Face's `LlamaForCausalLM`, and `save_pretrained` writes a Llama `config.json`, so a
checkpoint loads unchanged in transformers and vLLM, and `GPT.from_pretrained` reads a Llama
checkpoint back (no biases, default RoPE).

Shapes: B batch, T new tokens, S attended key positions (cached + new), D hidden size,
H query heads, KV key/value heads, hd head size, V vocabulary.

Deliberate differences from transformers' Llama: RoPE frequencies are computed on the fly from the
config (no buffer that a dtype cast could round), and the output projections of each residual branch
(o_proj, down_proj) start with a smaller std (GPT-2 style). Neither changes what a checkpoint means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors.torch import save_file
from torch import nn

from aligner.checkpoint import read_safetensors
from aligner.model.attention import Attention, build_attn_mask, decode_bias, packed_document_ids
from aligner.model.kv_cache import FusedWeights, KVCache
from aligner.model.rope import rope_cos_sin

ROPE_TYPES = ("default",)  # RoPE variants implemented here (no linear/dynamic/yarn/llama3 scaling)
CORE_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")  # what a core checkpoint may say
# config.json keys of a Llama checkpoint that the GPT core implements or that do not change what it computes
# (metadata, token ids, generation defaults); any other key with a value means "load it with transformers"
KNOWN_HF_KEYS = frozenset(
    """architectures model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads
    num_key_value_heads head_dim hidden_act max_position_embeddings rms_norm_eps rope_theta rope_parameters
    rope_scaling attention_bias attention_dropout mlp_bias tie_word_embeddings initializer_range bos_token_id
    eos_token_id pad_token_id use_cache dtype torch_dtype transformers_version pretraining_tp _name_or_path
    id2label label2id num_labels problem_type reward_likelihood_coef output_hidden_states output_attentions
    return_dict use_return_dict chunk_size_feed_forward is_encoder_decoder is_decoder tokenizer_class
    max_length min_length do_sample num_beams num_beam_groups temperature top_k top_p typical_p repetition_penalty
    length_penalty no_repeat_ngram_size num_return_sequences diversity_penalty early_stopping
    encoder_no_repeat_ngram_size output_scores return_dict_in_generate forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty suppress_tokens begin_suppress_tokens
    decoder_start_token_id sep_token_id bad_words_ids finetuning_task prefix task_specific_params
    tie_encoder_decoder torchscript tf_legacy_loss use_bfloat16 cross_attention_hidden_size add_cross_attention
    pruned_heads""".split()
)

# --- config ---------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    vocab_size: int = 2048  # embedding rows (the tokenizer's size, usually padded up to a multiple of 64)
    hidden_size: int = 256  # width D of the residual stream
    intermediate_size: int | None = None  # SwiGLU width; None -> 8/3 * D rounded up to a multiple of 64
    num_hidden_layers: int = 4  # transformer blocks
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 2  # key/value heads shared by groups of query heads (GQA)
    head_dim: int | None = None  # width of one head; None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 512  # longest sequence the model is meant for (RoPE has no hard limit)
    rope_theta: float = 10000.0  # RoPE base wavelength
    rms_norm_eps: float = 1e-5  # epsilon inside RMSNorm
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    initializer_range: float = 0.02  # std of the normal init of linear and embedding weights
    bos_token_id: int | None = None  # beginning-of-sequence id, written to the HF configs
    eos_token_id: int | list[int] | None = None  # end id(s); generation stops at any of them
    pad_token_id: int | None = None  # padding id, written to the HF configs

    def __post_init__(self):
        if self.intermediate_size is None:
            self.intermediate_size = math.ceil(8 * self.hidden_size / 3 / 64) * 64
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    def to_hf_dict(self, dtype: str = "float32") -> dict:
        """The `config.json` of an equivalent `LlamaForCausalLM`.

        transformers 5 reads RoPE from `rope_parameters`; transformers 4 (and vLLM builds on it) read
        the top-level `rope_theta`. Both are written, as are `dtype` (v5) and `torch_dtype` (v4).
        """
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPTConfig:
        """Read a Llama `config.json` (transformers 4 or 5 style) that the GPT core runs exactly.

        Checked field by field: anything the core does not implement (another model type, biases,
        another activation, RoPE scaling of any kind, attention dropout, sliding windows, soft caps,
        quantization, remote code, or any key not known to be harmless) raises ValueError naming it,
        so such a checkpoint goes through transformers instead. Keys set to null, false or 0 are ignored.
        """
        if d.get("model_type") != "llama":
            raise ValueError(f"model_type is {d.get('model_type')!r}; the GPT core reads only 'llama' checkpoints")
        archs = [a for a in d.get("architectures") or [] if a not in CORE_ARCHITECTURES]
        if archs:
            raise ValueError(f"architectures {archs} are not the GPT core's (LlamaForCausalLM)")
        for key in ("attention_bias", "mlp_bias"):
            if d.get(key):
                raise ValueError(f"{key} is true; the GPT core has no biases")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act is {d['hidden_act']!r}; the GPT core implements only 'silu'")
        if d.get("attention_dropout"):
            raise ValueError(f"attention_dropout is {d['attention_dropout']}; the GPT core has no dropout")
        for rope in (d.get("rope_parameters") or {}, d.get("rope_scaling") or {}):  # transformers 5 / 4
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise ValueError(f"RoPE type {rope_type!r} is not implemented by the GPT core (only 'default')")
            extra = sorted(k for k, v in rope.items() if k not in ("rope_type", "type", "rope_theta") and v)
            if extra:
                raise ValueError(f"RoPE parameters {extra} are not implemented by the GPT core")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        unknown = sorted(k for k, v in d.items() if k not in KNOWN_HF_KEYS and v not in (None, False, 0, "", [], {}))
        if unknown:
            raise ValueError(f"config field {unknown[0]!r} = {d[unknown[0]]!r} is not implemented by the GPT core")
        names = {f.name for f in fields(cls)} - {"rope_theta"}
        kw = {k: v for k, v in d.items() if k in names and v is not None}
        kw.setdefault("tie_word_embeddings", False)  # LlamaConfig's defaults where the file is silent
        kw.setdefault("rms_norm_eps", 1e-6)
        kw.setdefault("num_key_value_heads", kw.get("num_attention_heads", cls.num_attention_heads))
        return cls(**kw, rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> GPTConfig:
        """The config of a checkpoint directory (peft calls this when it saves an adapter)."""
        return cls.from_hf_dict(json.loads((Path(directory) / "config.json").read_text()))


# --- building blocks ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 and cast back (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x32 * rsqrt(mean(x32^2) + eps), one kernel
        return self.weight * x32.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x, fused: FusedWeights | None = None):
        if fused is not None:  # gate and up in one matmul
            gate, up = (x @ fused.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        fused = cache.fused_weights(self.self_attn.layer_idx) if cache is not None else None
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, fused)
        return x + self.mlp(self.post_attention_layernorm(x), fused)


# --- the model ------------------------------------------------------------------------------------


class GPT(nn.Module):
    _no_split_modules = ["Block"]  # the unit to shard one by one (FSDP2 wrap policies read it, as transformers')

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
                layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
                norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
            )
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block's activations in backward (training only)
        self.tie_weights()
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make lm_head use the embedding matrix (one Parameter, two names) when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, initializer_range) for matrices, ones for norms. The projections that write into the
        residual stream (o_proj, down_proj) get std / sqrt(2 * n_layers), as in GPT-2, so the stream's
        variance does not grow with depth."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        hidden_too: bool = False,
        document_ids: torch.Tensor | None = None,
        branch_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, V), or with `return_hidden` the final-norm hidden states (B, T, D), or with
        `hidden_too` both (logits, hidden) from one forward (a value head on the policy).

        input_ids: (B, T). attention_mask: optional (B, S) 0/1 over every key position (cached + new),
        as in transformers, for left-padded batches. position_ids: (B, T), default cache length +
        arange(T); RoPE is relative, so left padding with default positions changes logits only by
        rounding, but `(mask.cumsum(-1) - 1).clamp(min=0)` matches an unpadded row exactly.
        cache: a KVCache, updated in place. Padding-free packing: position_ids restarting at 0 inside a
        row (no cache, no attention_mask) start a new document, and attention never crosses documents;
        or `document_ids` (B, T) say which document each token is in, with `branch_ids` (B, T) for
        documents that share a prefix between branches (`attention.build_attn_mask`).
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None].expand(B, T)  # (B, T)
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KVCache overflow: {past + T} positions needed, max_len is {cache.max_len}")
        if attention_mask is not None and attention_mask.shape != (B, past + T):
            raise ValueError(f"attention_mask must be (B, cached + new) = {(B, past + T)}, got {attention_mask.shape}")
        docs = document_ids
        if docs is None and explicit_positions and cache is None and attention_mask is None:
            docs = packed_document_ids(position_ids)  # padding-free packed rows: attend within a document
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        if cache is not None:
            # with a cache, attention takes an additive float mask (SDPA on the CPU runs it about twice as
            # fast as a boolean one), and RoPE reads the cache's table of every position
            device_type = input_ids.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
            if T == 1 and attention_mask is not None:  # decoding a left-padded batch: the mask is the padding
                mask = decode_bias(attention_mask, dtype)
            else:
                mask = build_attn_mask(T, past, attention_mask, input_ids.device, docs)
                if mask is not None:
                    mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
            if cache.whole_step(T):  # past > 0, so the mask is not None
                mask = cache.decode_mask(mask)  # over the keys `cache.update` returns
            cos, sin = cache.rope(position_ids, x.dtype)  # (B, T, hd)
        else:
            mask = build_attn_mask(T, past, attention_mask, input_ids.device, docs, branch_ids)
            cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, x.dtype)  # (B, T, hd)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for layer in self.model.layers:
            if recompute:  # keep only each block's input; its activations are recomputed in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.model.norm(x)  # (B, T, D)
        if hidden_too:
            return self.lm_head(x), x
        return x if return_hidden else self.lm_head(x)  # (B, T, V)

    # --- accounting ---

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the embedding table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, for MFU estimates.

        6 N + 12 L H hd T, as in the PaLM paper (Chowdhery et al. 2022, appendix B) and nanoGPT's
        `estimate_mfu`: 6 per weight that takes part in a matmul (N = all parameters but the embedding
        lookup, plus the output head even when it shares that table), and 12 L H hd T for the attention
        scores and the weighted sum of values over a context of T tokens.
        """
        c = self.config
        n = self.num_params(exclude_embeddings=True)
        if c.tie_word_embeddings:
            n += self.lm_head.weight.numel()
        return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len

    # --- checkpoints ---

    def save_pretrained(
        self, directory: str | Path, dtype: torch.dtype | None = None, state_dict: dict | None = None
    ) -> None:
        """Write model.safetensors + config.json + generation_config.json, loadable by transformers.
        `state_dict`: the weights to write instead of the module's own (a sharded model's, gathered)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = dtype or next(self.parameters()).dtype
        state = {
            name: t.detach().to(device="cpu", dtype=dtype).contiguous()
            for name, t in (self.state_dict() if state_dict is None else state_dict).items()
            if not (name == "lm_head.weight" and self.config.tie_word_embeddings)  # HF omits a tied head
        }
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        dtype_name = str(dtype).removeprefix("torch.")
        (directory / "config.json").write_text(json.dumps(self.config.to_hf_dict(dtype_name), indent=2) + "\n")
        c = self.config
        gen = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id}
        gen = {k: v for k, v in gen.items() if v is not None}
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype: torch.dtype | None = None) -> GPT:
        """Load a checkpoint written by `save_pretrained` or by `LlamaForCausalLM.save_pretrained`
        (safetensors only; no biases, default RoPE). dtype None keeps the dtype stored in the file."""
        directory = Path(directory)
        config = GPTConfig.from_hf_dict(json.loads((directory / "config.json").read_text()))
        state = read_safetensors(directory)
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.device("meta"):  # no memory and no init work: every tensor comes from the file
            model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ValueError(
                f"{directory}: weights do not match the config (missing {missing}, unexpected {unexpected})"
            )
        return model.to(device=device, dtype=dtype)
