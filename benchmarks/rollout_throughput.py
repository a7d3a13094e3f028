"""Rollout throughput: aligner's torch engine against transformers' `generate`, same model, same process.

    python benchmarks/rollout_throughput.py         # the task world's policy shape (1.0M params), batch 64
    python benchmarks/rollout_throughput.py --batch 32 --prompt 64 --hidden 256 --layers 8 --vocab 8192  # 8M

Both generate from the same randomly initialised `LlamaForCausalLM` (transformers), the same left-padded
prompts (lengths drawn between --prompt/2 and --prompt tokens) and the same number of new tokens (no
stop token, so every row runs to --new), greedy and sampling at temperature 1. The runs take turns
(--repeats rounds, after one warm-up each) and the best time of each is reported as generated tokens/s,
with the torch engine's ratio to `generate`, eager and with `compile=True` (its compilation, timed
apart, happens in the warm-up call). The engine decodes a transformers Llama through the GPT core's
KV cache over the same weights, so these are also the figures RL on the GPT core gets.
"""

from __future__ import annotations

import argparse
import time

import torch

from aligner.rollout.engine import SamplingParams
from aligner.rollout.torch_engine import TorchEngine


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 + 64,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def best_times(fns, repeats: int) -> list[float]:
    """Best wall time of each function over `repeats` rounds, the functions taking turns within a round
    (so a slow spell of the machine hits all of them), after one warm-up call each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # defaults: the shape of the task world's policy (runs/sft/final) and of GRPO's 64-row rollouts
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=96, help="longest prompt (tokens)")
    p.add_argument("--new", type=int, default=128, help="new tokens per row")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = llama(args)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(args.prompt // 2, args.prompt + 1, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(3, args.vocab, (n,), generator=g).tolist() for n in lengths]
    width = max(lengths)
    ids = torch.zeros((args.batch, width), dtype=torch.long)
    mask = torch.zeros((args.batch, width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    params = sum(p.numel() for p in model.parameters())
    generated = args.batch * args.new
    print(f"Llama {params / 1e6:.1f}M params, vocab {args.vocab}, batch {args.batch}, prompts <= {args.prompt}, "
          f"{args.new} new tokens, {torch.get_num_threads()} threads")  # fmt: skip

    engine = TorchEngine(model, pad_id=0)
    compiled = TorchEngine(model, pad_id=0, compile=True)
    start = time.perf_counter()
    compiled.generate(prompts[:2], SamplingParams(max_new_tokens=4, temperature=0.0))
    print(f"compilation of the decoding step: {time.perf_counter() - start:.0f} s (once per process)")
    for temperature in (0.0, 1.0):
        sp = SamplingParams(max_new_tokens=args.new, temperature=temperature, seed=0)
        kw = dict(do_sample=temperature > 0, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)

        def hf(kw=kw):
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, **kw)

        t_hf, t_ours, t_comp = best_times(
            [hf, lambda sp=sp: engine.generate(prompts, sp), lambda sp=sp: compiled.generate(prompts, sp)],
            args.repeats,
        )
        mode = "greedy" if temperature == 0 else "sampling T=1"
        print(
            f"{mode:>13}: transformers generate {generated / t_hf:7.0f} tok/s | torch engine "
            f"{generated / t_ours:7.0f} tok/s ({t_hf / t_ours:.2f}x) | torch engine, compiled "
            f"{generated / t_comp:7.0f} tok/s ({t_hf / t_comp:.2f}x)"
        )


if __name__ == "__main__":
    main()
