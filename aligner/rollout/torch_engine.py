"""Batched KV-cache sampling in plain PyTorch, for the GPT core and any Hugging Face causal LM.

    engine = TorchEngine(model, pad_id=tokenizer.pad_token_id)
    completions = engine.generate(prompt_ids, SamplingParams(temperature=0.7, n=8, stop_ids=(eos,)))

Prompts are left-padded into one batch (each repeated n times; with the GPT core's cache each prompt is
prefilled once and its cache rows repeated for its n samples), then decoded one token per step from the
cache: the GPT core's `KVCache`, or the model's own `past_key_values` for
transformers models, with `attention_mask` and `position_ids = cumsum(mask) - 1` so that a padded
row computes what it would alone. A row that emits a stop id is finished: it is fed padding (which no
other row attends to) until every row is done or `max_new_tokens` is reached; with the GPT core's
cache, finished rows leave the batch (their cache rows dropped) once a quarter of it has finished, so
a batch of short and long completions costs little more than its long ones.

`dtype=torch.bfloat16` samples in bf16 from fp32 weights, as vLLM does: the GPT core (or a Llama
decoding through it) gets a bf16 copy of the weights for each `generate` call (half the weights'
memory, for the call's duration), its KV cache in bf16 too; other models run under autocast. On a
2-core AVX-512 BF16 CPU ~1.6x the tokens/s of fp32 at a 10M-parameter Llama's shape. The sampled
tokens' log-probs then carry bf16 numerics (what a trainer under bf16 autocast sees is close, not
equal: the online trainers log the mismatch and can correct for it).

`compile=True` runs the GPT core's decoding step through `torch.compile` (dynamic shapes, so one
graph serves every batch size and cache length, and every model of the same architecture in the
process): on 2 CPU cores ~1.05-1.1x the tokens/s of eager decoding, for a one-off compilation of
10-30 s (inductor keeps it on disk, so later processes reuse most of it). Worth it for RL runs, not
for a handful of prompts. Prefill stays eager.

Sampling order (as in transformers): temperature, then top-k, top-p and min-p, each filter applied
to the distribution left by the previous one. The log-prob reported for a token is taken from the
distribution after temperature and BEFORE the top-k/top-p/min-p filters, i.e.
log_softmax(logits / temperature); for greedy decoding (temperature 0) it is the raw log_softmax(logits).
At temperature 1 this is exactly what a teacher-forced forward pass of the policy gives, which is
what RL losses recompute; the filters' renormalisation is deliberately left out of it.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from aligner.model.forward import forward_takes, skips_head
from aligner.model.gpt import GPT, GPTConfig, KVCache
from aligner.rollout.engine import Completion, Engine, SamplingParams, check_prompts

# --- sampling -------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every token outside the top-k / nucleus / min-p sets. logits: (B, V)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (so the most likely one always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(-1)  # (B, V)
        logits = logits.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None, block: int = 128) -> torch.Tensor:
    """One draw per row of probs (B, V) (unnormalised is fine) by inverting the CDF with one uniform per
    row: exact, and on the CPU several times faster than torch.multinomial, which draws an exponential for
    every entry. The CDF is taken in two levels, over blocks of `block` tokens and then within the block
    the draw falls in, since a cumulative sum over a long row is slow on the CPU."""
    B, V = probs.shape
    u = torch.rand(B, 1, generator=generator, device=probs.device, dtype=probs.dtype)  # (B, 1)
    n = V // block
    if n < 2 or V % block:
        cdf = probs.cumsum(-1)  # (B, V)
        tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]  # first index with cdf > u
        return tokens.clamp(max=V - 1)
    blocks = probs.view(B, n, block)
    ends = blocks.sum(-1).cumsum(-1)  # (B, n): the mass up to each block's end
    target = u * ends[:, -1:]  # (B, 1)
    b = torch.searchsorted(ends, target, right=True).clamp(max=n - 1)  # (B, 1): the block the draw falls in
    before = ends.gather(-1, (b - 1).clamp(min=0)).masked_fill(b == 0, 0.0)  # (B, 1): the mass before it
    inner = blocks[torch.arange(B, device=probs.device), b[:, 0]].cumsum(-1)  # (B, block)
    # rounding may put the residual a hair past the block's own sum: take its last token of nonzero mass then
    residual = torch.minimum(target - before, inner[:, -1:])
    i = torch.searchsorted(inner, residual, right=True)
    last = torch.searchsorted(inner, inner[:, -1:].contiguous(), right=False)  # first index reaching the sum
    return (b * block + torch.minimum(i, last))[:, 0]


def argmax_rows(logits: torch.Tensor, block: int = 128) -> torch.Tensor:
    """logits.argmax(-1) for (B, V), the same index (the first maximum), through block maxima: on the
    CPU, argmax over a long row runs ~10x slower than amax."""
    B, V = logits.shape
    n = V // block
    if n < 2:
        return logits.argmax(-1)
    blocks = logits[:, : n * block].reshape(B, n, block)  # a view: (B, n, block)
    best = blocks.amax(-1).argmax(-1)  # (B,): the first block holding the row's maximum
    chosen = blocks[torch.arange(B, device=logits.device), best]  # (B, block)
    tokens = chosen.argmax(-1) + best * block  # (B,)
    if n * block < V:  # a tail shorter than a block wins only with a strictly larger value
        tail_max, tail_arg = logits[:, n * block :].max(-1)
        tokens = torch.where(tail_max > chosen.amax(-1), tail_arg + n * block, tokens)
    return tokens


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """Next tokens (B,) and their log-probs (B,) from last-position logits (B, V) in fp32."""
    if params.temperature == 0:  # the raw log-softmax of the argmax, without the (B, V) log-softmax
        tokens = argmax_rows(logits)
        return tokens, logits.gather(-1, tokens[:, None])[:, 0] - logits.logsumexp(-1)
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    if params.top_k == 0 and params.top_p == 1.0 and params.min_p == 0.0:  # no filter: no (B, V) log-softmax
        lse = scaled.logsumexp(-1, keepdim=True)  # (B, 1)
        tokens = sample_categorical((scaled - lse).exp(), generator)
        return tokens, scaled.gather(-1, tokens[:, None])[:, 0] - lse[:, 0]
    logprobs = scaled.log_softmax(-1)  # (B, V): reported log-probs
    kept = filter_logits(logprobs, params.top_k, params.top_p, params.min_p)
    tokens = sample_categorical(kept.softmax(-1), generator)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


# --- the engine -----------------------------------------------------------------------------------


def llama_as_gpt(model: torch.nn.Module) -> GPT | None:
    """A GPT core over the very parameters of a transformers `LlamaForCausalLM` (no copy, so optimizer
    steps on the model show in it), or None for any other model, a peft-wrapped one included. Same
    architecture and parameter names; the GPT core's static KV cache decodes faster than transformers'."""
    if type(model).__name__ != "LlamaForCausalLM":
        return None
    try:
        config = GPTConfig.from_hf_dict(model.config.to_dict())
    except (ValueError, TypeError, KeyError):
        return None
    with torch.device("meta"):
        gpt = GPT(config)
    state = dict(model.named_parameters())
    missing, unexpected = gpt.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        return None
    gpt.tie_weights()
    return gpt


def cast_gpt(core: GPT, dtype: torch.dtype) -> GPT:
    """A GPT core with `core`'s weights cast to `dtype` (copies; `core` is unchanged), tied as `core` is."""
    with torch.device("meta"):
        cast = GPT(core.config)
    state = {k: v.detach().to(dtype) for k, v in core.state_dict().items()}
    if core.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cast.load_state_dict(state, assign=True, strict=not core.config.tie_word_embeddings)
    cast.tie_weights()
    return cast.eval()


def decode_step(core: GPT, input_ids, attention_mask, position_ids, cache: KVCache) -> torch.Tensor:
    """One forward of the GPT core through its KV cache: fp32 logits (B, V) of the last position."""
    hidden = core(input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache, return_hidden=True)
    return cache.logits(core, hidden[:, -1]).float()


@functools.cache
def compiled_decode_step():
    """`decode_step` through torch.compile, made once per process (its graphs are shared by every engine)."""
    return torch.compile(decode_step, dynamic=True)


def mark_dynamic(cache: KVCache) -> None:
    """Declare the cache's batch and length dimensions dynamic and its head dimensions static, so that the
    compiled step is not specialised on the first sizes it meets (nor a batch of, say, 8 rows taken for
    the same size as a head_dim of 8)."""
    for t in (*cache.keys, *cache.values):
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 2)
        torch._dynamo.mark_static(t, 1)
        torch._dynamo.mark_static(t, 3)
    for t in cache.rope_table:  # (max_len, hd)
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.mark_static(t, 1)


class TorchEngine(Engine):
    """Generates with `model` in this process. `pad_id` fills left padding and finished rows (any id
    works since padding is masked; None -> 0). `use_cache=False` recomputes the whole sequence every
    step (slow; a reference for tests). `compact=False` keeps finished rows in the batch to the end.
    `compile=True` compiles the decoding step (GPT core and transformers Llama models; others ignore it).
    `dtype` (e.g. torch.bfloat16): the precision to sample in, where it differs from the weights' (see above)."""

    def __init__(
        self,
        model: torch.nn.Module,
        pad_id: int | None,
        use_cache: bool = True,
        compact: bool = True,
        compile: bool = False,
        dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.dtype = dtype
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.use_cache = use_cache
        self.compact = compact
        # a peft wrapper around the GPT core: call the wrapped GPT directly (its LoRA layers stay active)
        self.core = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not isinstance(self.core, GPT):  # a plain transformers Llama decodes through the GPT core, weights shared
            self.core = llama_as_gpt(model) or self.core
        self.is_gpt = isinstance(self.core, GPT)
        self.compile = compile and self.is_gpt and use_cache
        # transformers models can skip the lm_head on all but the last position
        self.hf_logits_to_keep = not self.is_gpt and skips_head(self.core)
        # transformers >= 5.2x names the KV cache `cache` (in and out), earlier releases `past_key_values`
        self.hf_cache_arg = "cache" if not self.is_gpt and forward_takes(self.core, "cache") else "past_key_values"

    def generate(self, prompts: list[list[int]], params: SamplingParams, on_token=None) -> list[Completion]:
        """len(prompts) * params.n completions, grouped per prompt (the n samples of prompt 0 first).
        `on_token(tokens, alive)`, if given, sees each step's (rows,) new ids and which rows were still
        generating, as they are produced (streaming)."""
        check_prompts(prompts)
        if not prompts:
            return []
        rows = [list(p) for p in prompts for _ in range(params.n)]
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.inference_mode(), self._precision() as core:
                tokens, logps, lengths, finished = self._generate(core, rows, params, on_token)
        finally:
            for m, mode in modes.items():
                m.training = mode
        tokens, logps, lengths, finished = tokens.tolist(), logps.tolist(), lengths.tolist(), finished.tolist()
        return [
            Completion(
                prompt_ids=rows[i],
                token_ids=tokens[i][: lengths[i]],
                logprobs=logps[i][: lengths[i]],
                finished=finished[i],
            )
            for i in range(len(rows))
        ]

    @contextlib.contextmanager
    def _precision(self):
        """The model to decode with at `dtype`: the core itself (no dtype, or its own), a cast copy of a
        plain GPT core (a peft-wrapped one keeps its adapters: autocast), or the model under autocast."""
        own = next(self.core.parameters()).dtype
        if self.dtype is None or self.dtype == own:
            yield self.core
        elif type(self.core) is GPT and not any(hasattr(m, "lora_A") for m in self.core.modules()):
            yield cast_gpt(self.core, self.dtype)
        else:
            device = next(self.core.parameters()).device
            with torch.autocast(device.type, dtype=self.dtype):
                yield self.core

    def _generate(self, core, rows: list[list[int]], params: SamplingParams, on_token=None):
        device = next(self.model.parameters()).device
        B, P, N = len(rows), max(len(r) for r in rows), params.max_new_tokens
        total = P + N
        ids = torch.full((B, total), self.pad_id, dtype=torch.long)  # prompt (left-padded) then generated
        mask = torch.ones((B, total), dtype=torch.long)  # 0 on left padding only
        for i, r in enumerate(rows):
            ids[i, P - len(r) : P] = torch.tensor(r)
            mask[i, : P - len(r)] = 0
        padded = bool((mask == 0).any())
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, total): each row counts from its first token
        stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)

        out = torch.full((B, N), self.pad_id, dtype=torch.long, device=device)
        logps = torch.zeros((B, N), dtype=torch.float32, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        # the n samples of a prompt share its prefill: the GPT core's cache is filled for each prompt once, then
        # its rows repeated (a transformers cache is prefilled row by row)
        group = params.n if self.is_gpt and self.use_cache else 1
        state = self._new_cache(core, B // group, total, device) if self.use_cache else None
        first = slice(None, None, group)
        prompt_mask = mask[first, :P] if padded else None
        logits, state = self._last_logits(core, ids[first, :P], prompt_mask, positions[first, :P], state)
        if group > 1:
            logits = logits.repeat_interleave(group, 0)  # (B, V)
            state.select_rows(torch.arange(B // group, device=device).repeat_interleave(group))
        if self.compile:
            mark_dynamic(state)
        # rows still generating; with the GPT core's cache, finished rows leave the batch (`compact`).
        # `rows` indexes them: a plain slice (a view, no gather) until the first row leaves
        active = torch.arange(B, device=device)
        rows = slice(None)
        compact = self.compact and isinstance(state, KVCache)

        for t in range(N):
            tok, logp = sample_next(logits, params, generator)  # (A,), (A,) for the A rows in the batch
            alive = ~finished[rows]
            out[rows, t] = tok.masked_fill(~alive, self.pad_id)
            logps[rows, t] = logp.masked_fill(~alive, 0.0)
            lengths[rows] += alive
            if on_token is not None:
                if len(active) == B:
                    on_token(tok, alive)
                else:  # every row's token (padding for the rows that left the batch) and which were alive
                    alive_rows = torch.zeros(B, dtype=torch.bool, device=device)
                    alive_rows[active] = alive
                    on_token(out[:, t], alive_rows)
            if stop.numel():
                finished[rows] |= alive & torch.isin(tok, stop)
            if t == N - 1 or bool(finished.all()):
                break
            ids[:, P + t] = out[rows, t]  # ids, mask, positions and the cache hold the active rows only
            end = P + t + 1
            if compact:
                keep = ~finished[rows]
                # finished rows stay in the batch (fed padding) until a quarter of it has finished: dropping
                # them copies the cache, which then costs less than decoding them
                if int(keep.sum()) <= len(active) * 3 // 4:
                    active, ids, mask, positions = active[keep], ids[keep], mask[keep], positions[keep]
                    rows = active
                    state.select_rows(keep.nonzero()[:, 0])
                    if self.compile:
                        mark_dynamic(state)  # the new, smaller cache tensors
            start = end - 1 if self.use_cache else 0  # with a cache, feed only the newest token
            step_ids, step_positions = ids[:, start:end], positions[:, start:end]
            if self.compile and len(active) > 1:
                # one graph for every step: the mask always given, batch and cache length symbolic (a batch
                # of one would be a graph of its own, so that rare step stays eager)
                logits = compiled_decode_step()(core, step_ids, mask[:, :end], step_positions, state)
            else:
                step_mask = mask[:, :end] if padded else None
                logits, state = self._last_logits(core, step_ids, step_mask, step_positions, state)
        return out, logps, lengths, finished

    def _new_cache(self, core, batch_size: int, max_len: int, device):
        if self.is_gpt:
            dtype = next(core.parameters()).dtype
            return KVCache(core.config, batch_size, max_len, device=device, dtype=dtype, model=core)
        return None  # transformers models create their own cache on the first call

    def _last_logits(self, core, input_ids, attention_mask, position_ids, state):
        """fp32 logits (B, V) of the last position, and the updated cache (None without caching)."""
        if self.is_gpt:
            if state is not None:
                return decode_step(core, input_ids, attention_mask, position_ids, state), state
            hidden = core(input_ids, position_ids=position_ids, attention_mask=attention_mask, return_hidden=True)
            return core.lm_head(hidden[:, -1]).float(), None
        kw = {"logits_to_keep": 1} if self.hf_logits_to_keep else {}
        kw[self.hf_cache_arg] = state
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=self.use_cache,
            **kw,
        )
        return out.logits[:, -1].float(), getattr(out, self.hf_cache_arg) if self.use_cache else None
