"""TorchEngine: cache == no cache, parity with transformers' generate, log-probs == teacher forcing,
filters, seeds, stop ids, grouping, train/eval mode."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt, tiny_llama

from aligner.model.gpt import GPT
from aligner.rollout.engine import Completion, Engine, SamplingParams
from aligner.rollout.torch_engine import TorchEngine, argmax_rows, filter_logits, sample_categorical

VOCAB = 64
PAD = 0
PROMPTS = [[5, 9, 13, 2, 40, 41, 7], [3, 17], [60, 1, 8, 22]]  # different lengths -> left padding


def make_gpt(seed: int = 0) -> GPT:
    # a larger init than training's 0.02 gives peaked distributions, so greedy choices are not near-ties
    return tiny_gpt(vocab=VOCAB, seed=seed, max_position_embeddings=512, initializer_range=0.3)


def make_llama(seed: int = 0):
    return tiny_llama(vocab=VOCAB, seed=seed, initializer_range=0.3, pad_token_id=PAD)


@pytest.fixture(scope="module")
def llama():
    return make_llama()


def teacher_forced_logprobs(model, c: Completion, temperature: float = 1.0) -> torch.Tensor:
    """log p(token_t | prefix) from one full forward over prompt + completion, no padding."""
    ids = torch.tensor([c.prompt_ids + c.token_ids])
    with torch.no_grad():
        out = model(ids)
    logits = out if torch.is_tensor(out) else out.logits  # (1, L, V)
    P = len(c.prompt_ids)
    logps = (logits[0, P - 1 : -1].float() / temperature).log_softmax(-1)  # (N, V)
    return logps.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]


def greedy(max_new_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


# --- equivalences ---------------------------------------------------------------------------------


def test_cached_generation_equals_uncached_for_gpt_core():
    model = make_gpt()
    cached = TorchEngine(model, PAD).generate(PROMPTS, greedy())
    uncached = TorchEngine(model, PAD, use_cache=False).generate(PROMPTS, greedy())
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    for a, b in zip(cached, uncached):
        assert a.prompt_ids == b.prompt_ids and len(a.token_ids) == 12 and not a.finished
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


def test_cached_generation_equals_uncached_for_hf_model(llama):
    cached = TorchEngine(llama, PAD).generate(PROMPTS, greedy())
    uncached = TorchEngine(llama, PAD, use_cache=False).generate(PROMPTS, greedy())
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]


def hf_generate(model, prompts, max_new_tokens, eos=None) -> list[list[int]]:
    P = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=PAD,
    )
    rows = []
    for row in out[:, P:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos) + 1]
        rows.append(row)
    return rows


def test_greedy_equals_transformers_generate(llama):
    ours = TorchEngine(llama, PAD).generate(PROMPTS, greedy())
    theirs = hf_generate(llama, PROMPTS, 12)
    assert [c.token_ids for c in ours] == theirs
    # with a stop id that occurs mid-way in the first row
    eos = theirs[0][4]
    ours = TorchEngine(llama, PAD).generate(PROMPTS, greedy(stop_ids=(eos,)))
    theirs = hf_generate(llama, PROMPTS, 12, eos=eos)
    assert [c.token_ids for c in ours] == theirs
    assert ours[0].finished and ours[0].token_ids[-1] == eos and len(ours[0].token_ids) <= 5
    assert all(c.finished == (eos in c.token_ids) for c in ours)


def test_gpt_core_and_its_transformers_twin_generate_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_gpt()
    model.save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = TorchEngine(model, PAD).generate(PROMPTS, greedy())
    theirs = TorchEngine(hf, PAD).generate(PROMPTS, greedy())
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]


@pytest.mark.parametrize("kind", ["gpt", "hf"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_equal_teacher_forcing(kind, temperature, llama):
    model = make_gpt() if kind == "gpt" else llama
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=20, top_p=0.9, n=2, seed=0)
    outs = TorchEngine(model, PAD).generate(PROMPTS, params)
    assert len(outs) == len(PROMPTS) * 2
    for c in outs:
        recomputed = teacher_forced_logprobs(model, c, temperature)
        torch.testing.assert_close(torch.tensor(c.logprobs), recomputed, atol=1e-4, rtol=0)


def test_greedy_logprobs_are_the_raw_log_softmax():
    model = make_gpt()
    for c in TorchEngine(model, PAD).generate(PROMPTS, greedy(8)):
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced_logprobs(model, c), atol=1e-4, rtol=0)


# --- sampling controls ----------------------------------------------------------------------------


def test_top_k_1_equals_greedy():
    model = make_gpt()
    g = TorchEngine(model, PAD).generate(PROMPTS, greedy())
    k1 = TorchEngine(model, PAD).generate(PROMPTS, SamplingParams(max_new_tokens=12, top_k=1, seed=3))
    assert [c.token_ids for c in k1] == [c.token_ids for c in g]
    for a, b in zip(g, k1):  # at temperature 1 the reported log-probs are the same unfiltered ones
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-6, rtol=0)


def test_seed_makes_sampling_reproducible():
    model = make_gpt()
    engine = TorchEngine(model, PAD)
    params = SamplingParams(max_new_tokens=10, n=3, seed=123)
    a, b = engine.generate(PROMPTS, params), engine.generate(PROMPTS, params)
    assert a == b
    c = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, seed=124))
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    # the n samples of one prompt differ from each other
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1


def test_stop_ids_stop_each_row_and_keep_the_stop_id():
    model = make_gpt()
    stop = tuple(range(0, VOCAB, 3))  # a third of the vocabulary: most rows stop early
    outs = TorchEngine(model, PAD).generate(PROMPTS, SamplingParams(max_new_tokens=16, n=4, stop_ids=stop, seed=0))
    assert len(outs) == 12
    assert [o.prompt_ids for o in outs] == [p for p in PROMPTS for _ in range(4)]
    assert any(o.finished for o in outs)
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids)
        assert not any(t in stop for t in o.token_ids[:-1])
        if o.finished:
            assert o.token_ids[-1] in stop
        else:
            assert len(o.token_ids) == 16 and o.token_ids[-1] not in stop


def test_finished_rows_leave_the_batch_without_changing_any_completion(monkeypatch):
    """Rows that stop early are dropped from the batch and its KV cache (the GPT core): greedy output and
    log-probs equal the uncached engine's, which keeps every row, and sampled log-probs equal teacher
    forcing; the streamed tokens still cover every row."""
    from aligner.model.kv_cache import KVCache

    drops, real = [], KVCache.select_rows
    monkeypatch.setattr(KVCache, "select_rows", lambda self, index: (drops.append(len(index)), real(self, index)))
    model = make_gpt()
    prompts = [[(7 * i + j) % (VOCAB - 1) + 1 for j in range(2 + i % 5)] for i in range(16)]
    stop = tuple(range(0, VOCAB, 5))
    cached = TorchEngine(model, PAD).generate(prompts, greedy(20, stop_ids=stop))
    assert drops and min(drops) < 16  # some rows left the batch
    uncached = TorchEngine(model, PAD, use_cache=False).generate(prompts, greedy(20, stop_ids=stop))
    assert [c.token_ids for c in cached] == [c.token_ids for c in uncached]
    assert len({len(c.token_ids) for c in cached}) > 2 and any(not c.finished for c in cached)
    for a, b in zip(cached, uncached):
        assert a.finished == b.finished
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)

    streamed = []
    params = SamplingParams(max_new_tokens=20, temperature=1.0, n=2, stop_ids=stop, seed=0)
    drops.clear()
    outs = TorchEngine(model, PAD).generate(prompts, params, on_token=lambda tok, alive: streamed.append((tok, alive)))
    assert drops
    for c in outs:
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced_logprobs(model, c), atol=1e-4, rtol=0)
    for i, c in enumerate(outs):  # each row's alive tokens, in order, are its completion
        assert [int(tok[i]) for tok, alive in streamed if alive[i]] == c.token_ids
        assert all(len(tok) == len(alive) == 32 for tok, alive in streamed)


def test_compiled_decoding_equals_eager_and_serves_every_shape(llama):
    """compile=True: the same greedy tokens and log-probs as eager decoding, for the GPT core and a
    transformers Llama (decoded through the core), with padding, rows leaving the batch and several batch
    sizes, from one graph (dynamic shapes: no recompilation per batch size or cache length)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    prompts = [[(7 * i + j) % (VOCAB - 1) + 1 for j in range(2 + i % 5)] for i in range(12)]
    stop = tuple(range(0, VOCAB, 5))
    for model in (make_gpt(), llama):
        for batch in (prompts, prompts[:5], [[3, 4]]):
            params = greedy(16, stop_ids=stop)
            eager = TorchEngine(model, PAD).generate(batch, params)
            compiled = TorchEngine(model, PAD, compile=True).generate(batch, params)
            assert [c.token_ids for c in compiled] == [c.token_ids for c in eager]
            for a, b in zip(compiled, eager):
                assert a.finished == b.finished
                torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2  # one per architecture (the tiny GPT's, the tiny Llama's)
    assert TorchEngine(make_gpt(), PAD, use_cache=False, compile=True).compile is False  # nothing to compile


@pytest.mark.parametrize("vocab", [64, 300, 2048, 2050])
def test_argmax_rows_is_argmax_with_first_index_on_ties(vocab):
    g = torch.Generator().manual_seed(vocab)
    cases = [torch.randn(6, vocab, generator=g), torch.randint(0, 3, (6, vocab), generator=g).float()]
    tied = torch.zeros(4, vocab)
    tied[1, [5, vocab - 1]] = 1.0  # a block maximum and the tail's, equal: the first wins
    tied[2, vocab - 1] = 1.0  # the maximum alone in the tail
    tied[3, [vocab // 2, vocab // 2 + 1]] = 2.0
    for x in cases + [tied]:
        assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    p = logits.exp()[0]
    kept = lambda out: torch.isfinite(out[0]).nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [0, 1]
    assert kept(filter_logits(logits, top_p=float(p[0]) - 1e-3)) == [0]
    assert kept(filter_logits(logits, top_p=float(p[0] + p[1]) - 1e-3)) == [0, 1]
    assert kept(filter_logits(logits, top_p=float(p[0] + p[1]) + 1e-3)) == [0, 1, 2]
    assert kept(filter_logits(logits, min_p=float(p[2] / p[0]) - 1e-3)) == [0, 1, 2]
    # top-p acts on what top-k left: renormalised over 2 tokens, the first holds 73% of the mass
    assert kept(filter_logits(logits, top_k=2, top_p=0.75)) == [0, 1]
    assert kept(filter_logits(logits, top_k=2, top_p=0.7)) == [0]


@pytest.mark.parametrize("vocab", [512, 300])  # blocks of 128 (two-level CDF), and a vocabulary that is not
def test_sample_categorical_draws_each_token_at_its_probability(vocab):
    g = torch.Generator().manual_seed(vocab)
    probs = torch.rand(2, vocab, generator=g) ** 4  # uneven, unnormalised
    probs[:, ::7] = 0.0  # tokens that must never be drawn (filtered out), block edges among them
    probs[1, 128:256] = 0.0  # a whole block without mass
    rows = probs.repeat_interleave(50_000, 0)  # 50k draws per distribution
    tokens = sample_categorical(rows, torch.Generator().manual_seed(0)).view(2, -1)
    for r in range(2):
        counts = torch.bincount(tokens[r], minlength=vocab).float()
        assert counts[probs[r] == 0].sum() == 0
        expected = probs[r] / probs[r].sum() * tokens.shape[1]
        # a chi-square statistic near its degrees of freedom (a wrong sampler is off by orders of magnitude)
        live = expected > 0
        chi2 = ((counts[live] - expected[live]) ** 2 / expected[live]).sum()
        dof = int(live.sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5


def test_bf16_sampling_from_fp32_weights_equals_a_bf16_model():
    """dtype=bf16 samples from a bf16 copy of fp32 weights (GPT core, a transformers Llama decoded
    through it): the tokens and log-probs of the same model cast to bf16, the weights left in fp32; a
    model the core cannot decode (peft-wrapped) runs under autocast."""
    import copy

    for model in (make_gpt(), make_llama()):
        params = SamplingParams(max_new_tokens=10, n=3, seed=5)
        ours = TorchEngine(model, PAD, dtype=torch.bfloat16).generate(PROMPTS, params)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        cast = copy.deepcopy(model).to(torch.bfloat16)
        theirs = TorchEngine(cast, PAD).generate(PROMPTS, params)
        assert ours == theirs
        fp32 = TorchEngine(model, PAD).generate(PROMPTS, greedy())
        bf16 = TorchEngine(model, PAD, dtype=torch.bfloat16).generate(PROMPTS, greedy())
        assert bf16 != fp32  # another precision's log-probs
        for a, b in zip(bf16, fp32):  # close to fp32's where the tokens agree
            n = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), len(a.token_ids))
            torch.testing.assert_close(torch.tensor(a.logprobs[:n]), torch.tensor(b.logprobs[:n]), atol=0.1, rtol=0)

    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(make_gpt(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    seen = []
    mlp = lora.get_base_model().model.layers[0].mlp
    hook = mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    TorchEngine(lora, PAD, dtype=torch.bfloat16).generate(PROMPTS, greedy(3))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}  # autocast's matmuls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_over_the_whole_cache_equals_the_filled_part(dtype):
    """A `whole` KV cache (decoding attends over every preallocated position, the unfilled ones masked)
    gives the logits of attending over the filled positions only."""
    from aligner.model.kv_cache import KVCache

    model = make_gpt().to(dtype).eval()
    ids = torch.tensor([[PAD, PAD, 5, 9, 13], [3, 17, 60, 1, 8]])
    mask = (ids != PAD).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = {}
    for whole in (False, True):
        cache = KVCache(model.config, 2, 12, dtype=dtype, model=model, whole=whole)
        with torch.no_grad():
            out = [model(ids, positions, mask, cache=cache)[:, -1]]
            step_mask, pos = mask, positions[:, -1:]
            for _ in range(5):
                step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], -1)
                pos = pos + 1
                out.append(model(out[-1].argmax(-1)[:, None], pos, step_mask, cache=cache)[:, -1])
        logits[whole] = torch.stack(out).float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logits[True], logits[False], atol=tol, rtol=0)


def test_the_samples_of_a_prompt_share_its_prefill():
    """n samples per prompt prefill each prompt once (the GPT core's cache rows repeated): the same
    samples as asking for each prompt n times with n = 1."""
    model = make_gpt()
    params = SamplingParams(max_new_tokens=10, n=3, seed=7)
    shared = TorchEngine(model, PAD).generate(PROMPTS, params)
    repeated = TorchEngine(model, PAD).generate(
        [p for p in PROMPTS for _ in range(3)], SamplingParams(max_new_tokens=10, n=1, seed=7)
    )
    assert [c.token_ids for c in shared] == [c.token_ids for c in repeated]
    for a, b in zip(shared, repeated):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)


# --- plumbing -------------------------------------------------------------------------------------


def test_protocol_modes_and_errors():
    model = make_gpt().train()
    model.lm_head.eval()  # mixed modes come back as they were
    engine = TorchEngine(model, pad_id=None)
    assert isinstance(engine, Engine)
    engine.generate(PROMPTS[:1], greedy(3))
    assert model.training and model.model.layers[0].training and not model.lm_head.training
    assert engine.generate([], greedy()) == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1], []], greedy())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
