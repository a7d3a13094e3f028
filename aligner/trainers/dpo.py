"""Direct preference optimisation and its family on the shared loop.

    aligner dpo                                   # recipes/dpo.yaml: DPO from runs/sft/final on the task world
    aligner dpo --beta 0.1 --loss ipo             # another variant (sigmoid, cdpo, robust, hinge, ipo, simpo, orpo)
    aligner dpo recipes/dpo_lora.yaml             # LoRA: the reference is the model with its adapter disabled
    aligner dpo --loss kto                        # KTO: unpaired rows (pairs are split into two)

Chosen and rejected replies go through one forward pass (a 2B-row batch, chosen first); each side's
log-probs are summed over its reply tokens and handed to one loss function from
`aligner.losses.PREFERENCE_LOSSES`. The reference is a frozen copy of the starting model, or, with
LoRA, the same model with the adapter disabled (no second copy), or nothing for the reference-free
variants (SimPO, ORPO). `dpo.sft_weight` adds RPO's NLL term on the chosen replies. With
`dpo.precompute_ref` the reference log-probs are computed once before training, stored under
`dpo.ref_cache_dir` keyed by the reference weights and the tokenized data, and reused by later
runs; no reference model is held during training then.

With `dpo.sample_pairs: n` the training pairs are on-policy: n replies per prompt are sampled from
the starting model and judged by the task world's answer checker; chosen is a correct sample (else
the row's chosen reply) and rejected a wrong one (else the row's rejected reply). The model then
learns against its own mistakes rather than the dataset's synthetic ones. With `dpo.sample_greedy`
the greedy reply is judged too and, when wrong, is the rejected one: the pair then targets the
answer the model actually gives (its mode), which random samples at T = 1 rarely are. With
`dpo.pairs_per_prompt: k` a prompt gives up to k distinct (correct, wrong) pairs of its samples, and with
`dpo.sample_fill: false` prompts without both kinds are left out (Pang et al.'s iterative RPO setup).
The sampled replies are cached under `dpo.ref_cache_dir`, so other pairings of them cost no sampling.
`dpo.rounds: R` repeats this R times on fresh prompts, each round sampling from and referring to the
model the round before trained (`iterative_dpo`).

KTO trains on unpaired rows (prompt, completion, label; preference pairs are split into a desirable
and an undesirable row). Its reference point z is an estimate of KL(policy || reference) from
mismatched rows (each prompt with the previous row's completion, as TRL estimates it), averaged over
the micro-batch and detached.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from aligner.config import Recipe
from aligner.data.chat import REPLY_SIDES, pad_token_id
from aligner.data.collate import pack_pairs, pad_pairs, pad_unpaired
from aligner.logprobs import summed_logps, summed_logps_by_doc
from aligner.losses import PREFERENCE_LOSSES, REFERENCE_FREE, batch_token_nll, kto_loss
from aligner.model.forward import causal_lm_token_logprobs
from aligner.tracking import phase
from aligner.trainers.base import Trainer, prepare_run_dir
from aligner.trainers.dpo_data import encode_pairs, weights_hash
from aligner.trainers.reference import frozen_reference, reference_kind, reference_of
from aligner.trainers.sharding import shard_like_policy


class DPOTrainer(Trainer):
    """Examples are pairs {"chosen", "rejected"} of SFT-style examples (+ "margin", "ref_logps"), or for
    KTO unpaired {"completion", "kl", "label"} (+ "ref_logps")."""

    stage = "dpo"
    token_loss = False  # units are pairs (KTO: rows)

    def __init__(self, recipe: Recipe, model, tokenizer, train_data, eval_data=None, ref_model=None, **kw):
        super().__init__(recipe, model, tokenizer, train_data, eval_data, **kw)
        self.dpo = recipe.dpo
        self.loss_fn = kto_loss if self.dpo.loss == "kto" else PREFERENCE_LOSSES[self.dpo.loss]
        self.ref_model = shard_like_policy(ref_model, self)

    packing = False  # pairs' 2B sequences packed padding-free into rows of `row_len` tokens (not KTO)
    row_len = 0

    def collate(self, pairs: list) -> dict:
        if self.dpo.loss == "kto":
            return pad_unpaired(pairs, pad_token_id(self.tokenizer))
        if self.packing:
            return pack_pairs(pairs, pad_token_id(self.tokenizer), self.row_len)
        return pad_pairs(pairs, pad_token_id(self.tokenizer))

    # --- log-probs --------------------------------------------------------------------------------------

    @staticmethod
    def logps_of(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reply log-probs and reply lengths of every row, ((2B,), (2B,))."""
        labels = batch["labels"]
        logps = causal_lm_token_logprobs(model, batch["input_ids"], labels, batch.get("position_ids"))
        if "doc_ids" in batch:  # packed rows
            return summed_logps_by_doc(logps, labels, batch["doc_ids"], len(batch["lengths"]))
        return summed_logps(logps, labels)

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with reference_of(self.unwrapped(), self.ref_model) as ref, self.autocast():
            return self.logps_of(ref, batch)[0]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.dpo.loss == "kto":
            return self.kto_loss(model, batch)
        logps, lengths = self.logps_of(model, batch)  # (2B,), (2B,)
        chosen, rejected = logps.chunk(2)
        chosen_len, rejected_len = lengths.chunk(2)
        kw = dict(chosen_logps=chosen, rejected_logps=rejected, chosen_len=chosen_len, rejected_len=rejected_len)
        if self.dpo.loss not in REFERENCE_FREE:
            ref_chosen, ref_rejected = self.reference_logps(batch).to(logps.dtype).chunk(2)
            kw.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
        d = self.dpo
        loss, stats = self.loss_fn(
            **kw, beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.simpo_gamma, lam=d.orpo_lambda
        )
        stats["loss"] = loss.detach() / chosen.numel()  # dpo/loss: the preference loss alone, per pair
        if d.sft_weight:  # RPO: keep the chosen replies likely while pushing the pair apart
            units = self.batch_units(batch)
            nll, nll_stats = batch_token_nll(chosen, chosen_len, units["n_loss"], units["chosen_tokens"])
            loss = loss + d.sft_weight * nll
            stats.update(nll_stats)
        return loss, stats

    def kto_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Completions (rows :B) with gradients; the mismatched KL rows (B:) without."""
        B, ids, labels = batch["n_loss"], batch["input_ids"], batch["labels"]
        logps = summed_logps(causal_lm_token_logprobs(model, ids[:B], labels[:B]), labels[:B])[0]
        with torch.no_grad():
            kl_logps = summed_logps(causal_lm_token_logprobs(model, ids[B:], labels[B:]), labels[B:])[0]
        ref = self.reference_logps(batch).to(logps.dtype)  # (2B,)
        kl = (kl_logps - ref[B:]).mean()
        d = self.dpo
        return self.loss_fn(
            logps,
            ref[:B],
            batch["desirable"],
            kl,
            beta=d.beta,
            desirable_weight=d.kto_desirable_weight,
            undesirable_weight=d.kto_undesirable_weight,
        )

    # --- precomputed reference log-probs --------------------------------------------------------------

    @torch.no_grad()
    def precompute_reference(self, datasets: list[list[dict]], reference, cache_dir: Path) -> bool:
        """Attach "ref_logps" (chosen, rejected) to every pair, from the disk cache when it has them.

        The training pairs are scored in the very micro-batches the first epoch trains them in (the same
        composition, padding or packing and precision), so under bf16 too the cached values are the numbers
        the live reference would give in that epoch (step 1's loss is ln 2, as with a live reference); eval
        pairs in the eval's batches. The key hashes the reference's weights, the token ids of every pair and
        that batching, so an entry is reused only for the same reference, data and batches. Returns True
        when it was read from disk.
        """
        key = _cache_key(reference, datasets, self.batching())
        path = Path(cache_dir) / f"ref_logps_{key}.pt"
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            for data, values in zip(datasets, cached):
                for pair, v in zip(data, values):
                    pair["ref_logps"] = v
            return True
        reference.eval()
        results = []
        for k, data in enumerate(datasets):
            mb = self.cfg.micro_batch_size
            batches = (
                self.first_epoch_batches()
                if k == 0
                else [list(range(i, min(i + mb, len(data)))) for i in range(0, len(data), mb)]
            )
            values: dict[int, torch.Tensor] = {}
            for idx in phase(batches, "reference log-probs", "batch", min_items=10):
                batch = self.to_device(self.collate([data[i] for i in idx]))
                with self.autocast():
                    chosen, rejected = self.logps_of(reference, batch)[0].float().cpu().chunk(2)
                for i, c, r in zip(idx, chosen, rejected):
                    values.setdefault(i, torch.stack([c, r]))  # (2,): as first seen, in its training batch
            for i, pair in enumerate(data):
                pair["ref_logps"] = values[i]
            results.append(torch.stack([values[i] for i in range(len(data))]) if data else torch.zeros(0, 2))
        if self.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(results, tmp)
            tmp.replace(path)
        return False


def _cache_key(model: torch.nn.Module, datasets: list[list[dict]], batching: list) -> str:
    h = weights_hash(model)
    h.update(json.dumps(batching).encode())
    for data in datasets:
        for pair in data:
            for side in [k for k in REPLY_SIDES if k in pair]:
                h.update(pair[side]["input_ids"].numpy().tobytes())
                h.update(pair[side]["labels"].numpy().tobytes())
    return h.hexdigest()[:24]


# --- the command ------------------------------------------------------------------------------------


def dpo(recipe: Recipe, share: tuple[int, int] = (1, 1)) -> dict:
    """Preference optimisation from the recipe's model (default: the SFT run); returns eval metrics.
    `share`: train on the k-th of n parts of the training prompts (see `iterative_dpo`)."""
    from aligner.trainers.setup import prepare_model, sft_tokenizer, train_and_score

    o = recipe.dpo
    if o.rounds > 1:
        return iterative_dpo(recipe)
    tokenizer = sft_tokenizer(recipe, "dpo")
    model = prepare_model(recipe, tokenizer, stage="dpo")
    train_data, eval_data, report = encode_pairs(recipe, tokenizer, model, share)
    needs_ref = o.loss not in REFERENCE_FREE
    ref_model = frozen_reference(model, recipe, needed=needs_ref)  # LoRA: the adapter-disabled model
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    prepare_run_dir(run_dir, recipe.train.resume, recipe.train.overwrite)
    trainer = DPOTrainer(recipe, model, tokenizer, train_data, eval_data, ref_model=ref_model)
    trainer.packing, trainer.row_len = o.packing and o.loss != "kto", recipe.data.seq_len
    if needs_ref and o.precompute_ref:
        datasets = [train_data] + ([eval_data] if eval_data else [])
        with reference_of(model, trainer.ref_model) as reference:
            cached = trainer.precompute_reference(datasets, reference, Path(o.ref_cache_dir))
        trainer.ref_model = ref_model = reference = None  # freed: every pair carries its reference log-probs
        if trainer.is_main:
            print(f"dpo: reference log-probs {'read from' if cached else 'computed and saved to'} {o.ref_cache_dir}")
    if trainer.is_main:
        ref = reference_kind(recipe, needs_ref, o.precompute_ref, trainer.ref_model)
        print(f"dpo: {report}")
        print(f"dpo: loss {o.loss}, beta {o.beta}, reference {ref}, {trainer.total_steps} steps -> {run_dir}")
    return train_and_score(trainer, trainer.unwrapped, tokenizer, o.accuracy_items, o.accuracy_tokens)


def iterative_dpo(recipe: Recipe) -> dict:
    """`dpo.rounds` rounds of on-policy DPO (iterative DPO: Xiong et al. 2024, Pang et al. 2024). Round k
    starts from round k-1's model (the first from `model.init_from`), which is also its reference,
    samples its pairs from that model on the k-th of `rounds` equal parts of the training prompts, and
    trains `train.max_steps` steps into <run dir>/round_k. The last round's model is the run's final;
    <run dir>/metrics.jsonl holds every round's metrics, steps counted across rounds. With --resume the
    rounds already finished are kept and an interrupted one continues from its last checkpoint."""
    from aligner.checkpoint import link_copy
    from aligner.tracking import plot_metrics, read_metrics

    t, rounds = recipe.train, recipe.dpo.rounds
    run_dir = Path(t.out_dir) / t.name
    prepare_run_dir(run_dir, t.resume, t.overwrite)
    start, result, offset, merged = recipe.model.init_from, None, 0, []
    for k in range(1, rounds + 1):
        r = copy.deepcopy(recipe)
        r.dpo.rounds, r.model.init_from = 1, start
        r.train.out_dir, r.train.name = str(run_dir), f"round_{k}"
        r.train.resume, r.train.overwrite = t.resume and (run_dir / r.train.name).is_dir(), not t.resume
        if k < rounds:
            r.dpo.accuracy_items = 0  # only the last round's model is scored
        round_dir = run_dir / r.train.name
        if (round_dir / "final").is_dir() and t.resume:
            print(f"dpo: round {k} of {rounds}: {round_dir}/final exists, kept")
        else:
            print(f"dpo: round {k} of {rounds} from {start}")
            result = dpo(r, share=(k, rounds))
        start = str(round_dir / "final")
        rows = read_metrics(round_dir)
        merged += [{**row, "step": row["step"] + offset, "dpo/round": k} for row in rows]
        offset += rows[-1]["step"] if rows else 0
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in merged))
    final = run_dir / "final"
    if final.exists():
        shutil.rmtree(final)
    link_copy(Path(start), final)
    if (round_dir / "accuracy.json").is_file():  # the last round's
        shutil.copy2(round_dir / "accuracy.json", run_dir / "accuracy.json")
    plot_metrics(run_dir)
    if result is None:  # every round was already done
        result = {"metrics": {}, "samples": [], "is_main": True}
    return {**result, "run_dir": str(run_dir)}
