"""What the online trainers (GRPO, PPO, RLOO, REINFORCE++, online DPO) share on top of the loop: rollouts
that serve several steps, the rollout engine, reward scoring, log-prob passes and greedy evals.

A rollout is made from the policy at the step it starts and serves `steps_per_rollout` optimizer
steps; its prompts are the next ones of the loop's seeded order (a pure function of the seed and the
rollout index, strided over processes) and its sampling seed is a function of (seed, rollout, rank),
so a resumed run samples what the uninterrupted one did. A rollout that still has steps to serve is
saved with the checkpoint (per process), which makes resume exact in the middle of one. Rollout
metrics are averaged over processes and logged with every step it serves. Eval decodes the eval
prompts greedily and reports the mean of every reward function (and their weighted total).
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path

import torch

from aligner.data.chat import pad_token_id, reply_stop_ids
from aligner.logprobs import IGNORE_INDEX
from aligner.model.forward import causal_lm_shared_logprobs, causal_lm_token_logprobs
from aligner.rewards import RewardModelScorer
from aligner.rollout import make_engine
from aligner.rollout.engine import Completion, SamplingParams
from aligner.rollout.torch_engine import TorchEngine
from aligner.tracking import phase, tqdm_write
from aligner.trainers.base import Trainer
from aligner.trainers.reference import reference_of
from aligner.trainers.sharding import copy_full_weights, sampler_copy_needed, shard_like_policy

PROMPT_KEYS = ("prompt", "prompt_ids")  # the columns of a prompt record that are not handed to rewards


class OnlineTrainer(Trainer):
    """Subclasses set `steps_per_rollout`, `max_new_tokens` and implement `make_rollout(rollout)`, which
    returns (data, metrics); `rollout_data(step)` gives the data of the rollout serving `step`."""

    token_loss = False
    empty_steps_ok = True  # every completion masked out (truncated): no update; the rollout metrics say why
    total_name = "reward_mean"  # the eval metric of the weighted reward total

    def __init__(self, recipe, model, tokenizer, prompts, eval_prompts, reward_set, ref_model=None, **kw):
        # FSDP2, DeepSpeed: each process generates on its own, which a sharded forward (all processes in step)
        # cannot serve, so generation runs on a full copy of the policy, taken before it is sharded (`sampler_model`)
        copied = sampler_copy_needed()
        sampler = copy.deepcopy(self.generating_part(model)).requires_grad_(False) if copied else None
        super().__init__(recipe, model, tokenizer, prompts, eval_prompts, **kw)
        self._sampler = sampler.to(self.device).eval() if sampler is not None else None
        self._sampler_step: int | None = None
        self.ref_model = shard_like_policy(ref_model, self)  # None: LoRA's base
        for fn in reward_set.fns:  # a reward model on the training device, sharded like the policy where it is
            if isinstance(fn, RewardModelScorer):
                fn.model = shard_like_policy(fn.model, self)
        self.reward_set = reward_set
        self.pad_id = pad_token_id(tokenizer)
        self.stop_ids = tuple(reply_stop_ids(tokenizer))
        self._rollout: tuple[int, object, dict] | None = None  # (rollout index, data, metrics)
        self.r = recipe.rollout
        self.max_new_tokens, self.temperature = self.r.max_new_tokens, self.r.temperature
        self._engine = None  # made at the first rollout (`engine`)
        self._synced_at: int | None = None  # the optimizer step whose weights the engine holds
        self._sync_seconds = 0.0  # spent syncing weights during the current rollout

    steps_per_rollout = 1

    def sampling_params(self, n: int = 1, seed: int | None = None, greedy: bool = False) -> SamplingParams:
        """The rollout section's sampling (greedy for evals) with the template's stop ids."""
        r = self.r
        if greedy:
            return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0, stop_ids=self.stop_ids)
        return SamplingParams(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
            n=n, stop_ids=self.stop_ids, seed=seed,
        )  # fmt: skip

    def make_rollout(self, rollout: int) -> tuple[object, dict]:
        raise NotImplementedError

    def on_rollout(self, metrics: dict) -> None:
        """Called once per new rollout (PPO's adaptive KL controller)."""

    def policy(self) -> torch.nn.Module:
        """The policy (unwrapped)."""
        return self.unwrapped()

    def generating_part(self, model: torch.nn.Module) -> torch.nn.Module:
        """The part of the trained model that generates (PPO: the policy without its value model)."""
        return model

    def sampler_model(self) -> torch.nn.Module:
        """The model that generates: the policy, or when the policy is sharded a full copy of it on every
        process, refreshed from the shards whenever the policy has moved (all processes gather together)."""
        if self._sampler is None or not self.sharded:
            return self.policy()
        if self._sampler_step != self.step:
            copy_full_weights(self._sampler, self.policy())
            self._sampler_step = self.step
        return self._sampler

    def rollout_steps(self, prompts_per_rollout: int, steps_per_rollout: int) -> int:
        """train.max_steps, else the steps of train.epochs passes over the prompts at `prompts_per_rollout`
        prompts (all processes) per rollout and `steps_per_rollout` steps per rollout."""
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        rollouts = math.ceil(self.cfg.epochs * len(self.train_data) / max(prompts_per_rollout, 1))
        return max(1, rollouts * steps_per_rollout)

    # --- rollouts ------------------------------------------------------------------------------------

    def rollout_rows(self, rollout: int, prompts: int) -> list[dict]:
        """This process's share of the `prompts` prompt records of rollout `rollout`."""
        n = len(self.train_data)
        order = [
            int(self._permutation(pos // n)[pos % n]) for pos in range(rollout * prompts, (rollout + 1) * prompts)
        ]
        return [self.train_data[i] for i in order[self.rank :: self.world]]

    def sampling_seed(self, rollout: int) -> int:
        return (self.cfg.seed * 1_000_003 + rollout) * 64 + self.rank

    def engine(self):
        """The rollout engine (`aligner.rollout.make_engine`), holding the policy's current weights:
        awake, and synced whenever the policy has moved (a no-op for the torch engine, which samples from the
        policy itself; colocated vLLM starts from model.init_from's weights; a vLLM server, which may hold
        anything, is synced at the start too, by the main process while the others wait)."""
        if self._engine is None:
            from aligner.config import resolve_path

            checkpoint = resolve_path(self.recipe.model.init_from) if self.recipe.model.init_from else None
            self._engine = make_engine(
                self.r, self.sampler_model(), self.pad_id, checkpoint=checkpoint,
                max_model_len=self.recipe.data.seq_len, seed=self.cfg.seed, main=self.is_main,
                dtype=self.sampling_dtype(),
            )  # fmt: skip
            fresh = not self.cfg.resume and self.r.engine == "vllm"
            self._synced_at = 0 if fresh else None  # a fresh colocated vLLM holds init_from's weights
        self._engine.wake_up()
        if self._synced_at != self.step:
            start = time.perf_counter()
            self._engine.sync_weights(self.sampler_model())
            if self.world > 1 and self.r.engine == "vllm_server":
                self.accelerator.wait_for_everyone()  # no process samples before the server has the new weights
            self._synced_at = self.step
            self._sync_seconds += time.perf_counter() - start
        return self._engine

    def sampling_dtype(self) -> torch.dtype | None:
        """The torch engine's precision (`rollout.dtype`): bf16 when asked, or under `auto` when training runs
        under bf16 autocast; else None (the weights' own)."""
        if self.r.dtype == "bf16" or (self.r.dtype == "auto" and self.precision == "bf16"):
            return torch.bfloat16
        return None

    def complete_and_score(self, rows: list[dict], params: SamplingParams, engine=None):
        """Completions of `rows` (params.n each), their texts and the reward set's (totals, per-function)."""
        outs: list[Completion] = (engine or self.engine()).generate([r["prompt_ids"] for r in rows], params)
        texts = [self.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        n = params.n
        columns = {k: [r[k] for r in rows for _ in range(n)] for k in rows[0] if k not in PROMPT_KEYS}
        prompts = [r["prompt"] for r in rows for _ in range(n)]
        if self._engine is not None:
            self._engine.sleep()  # vLLM frees its GPU memory for training (CUDA sleep mode; else nothing)
        totals, parts = self.reward_set(prompts, texts, completion_ids=[o.token_ids for o in outs], **columns)
        return outs, texts, totals, parts

    def sample_rollout(self, rollout: int, prompts: int, n: int) -> tuple[list[Completion], list[float], dict]:
        """This process's share of rollout `rollout`'s `prompts` prompts, `n` completions each, scored:
        (completions, reward totals, {reward name: values})."""
        rows = self.rollout_rows(rollout, prompts)
        outs, _, totals, parts = self.complete_and_score(
            rows, self.sampling_params(n=n, seed=self.sampling_seed(rollout))
        )
        return outs, totals, parts

    @staticmethod
    def rollout_metrics(outs: list[Completion], totals: list[float], parts: dict) -> dict:
        """The metrics every sampled rollout logs: reward mean and spread, completion length, truncation, and
        each reward function's mean."""
        r = torch.tensor(totals, dtype=torch.float32)
        return {
            "rollout/reward_mean": float(r.mean()),
            "rollout/reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "rollout/completion_len": sum(len(o.token_ids) for o in outs) / len(outs),
            "rollout/truncated": sum(not o.finished for o in outs) / len(outs),
            **{f"rollout/{name}": sum(v) / len(v) for name, v in parts.items()},
        }

    def rollout_data(self, step: int):
        rollout = step // self.steps_per_rollout
        if self._rollout is None or self._rollout[0] != rollout:
            if self._rollout is None and self.is_main and self.cfg.progress:  # the first: the bar has not moved yet
                tqdm_write(f"{self.stage}: sampling rollout {rollout + 1} (up to {self.max_new_tokens} new tokens)")
            self._sync_seconds = 0.0
            data, metrics = self.make_rollout(rollout)
            if self.r.engine != "torch":  # the time this rollout spent pushing weights into vLLM
                metrics = {**metrics, "rollout/weight_sync_s": self._sync_seconds}
            self._rollout = (rollout, data, metrics)
            self.on_rollout(metrics)
        return self._rollout[1]

    def micro_batches(self, step: int) -> list[dict]:
        """The micro-batches of the rollout serving `step` (made by `make_rollout`)."""
        return self.rollout_data(step)

    def train_step(self, step: int) -> dict:
        metrics = super().train_step(step)
        names = sorted(self._rollout[2])
        values = self.reduce_sum([self._rollout[2][k] for k in names])
        metrics.update({k: v / self.world for k, v in zip(names, values)})
        return metrics

    def save_extra(self, directory: Path) -> None:
        """A rollout that still has steps to serve is saved, so a resumed run trains on the same samples."""
        if self._rollout is not None and self.step % self.steps_per_rollout:
            rollout, data, metrics = self._rollout
            torch.save({"rollout": rollout, "data": data, "metrics": metrics}, directory / f"rollout_{self.rank}.pt")

    def load_extra(self, directory: Path) -> None:
        path = Path(directory) / f"rollout_{self.rank}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            self._rollout = (saved["rollout"], saved["data"], saved["metrics"])

    # --- what the sampled-completion trainers share (GRPO, RLOO, REINFORCE++) ---------------------------

    def token_logps(self, model, batch: dict) -> torch.Tensor:
        """Per-token log-probs (B, T) of the labels under the sampling temperature, as the sampler saw them."""
        with self.autocast():
            if "shared_from" in batch:
                return causal_lm_shared_logprobs(model, batch, self.temperature)
            return causal_lm_token_logprobs(model, batch["input_ids"], batch["labels"], temperature=self.temperature)

    @torch.no_grad()
    def rollout_logps(self, model, batch: dict) -> torch.Tensor:
        """`token_logps` of a whole rollout's padded batch, a micro-batch at a time, as float32 on the CPU."""
        mb, B = self.cfg.micro_batch_size, batch["input_ids"].shape[0]
        parts = []
        for i in range(0, B, mb):
            part = self.to_device({k: batch[k][i : i + mb] for k in ("input_ids", "labels")})
            parts.append(self.token_logps(model, part).float().cpu())
        return torch.cat(parts)

    def reference_rollout_logps(self, batch: dict) -> torch.Tensor:
        """`rollout_logps` under the reference (a frozen copy, or the policy with its adapter disabled)."""
        with reference_of(self.policy(), self.ref_model) as ref:
            return self.rollout_logps(ref, batch)

    @staticmethod
    def completion_examples(outs: list[Completion], mask_truncated: bool) -> list[dict]:
        """One training example per completion: the prompt and completion as input, the completion's tokens
        as labels (all IGNORE_INDEX for a completion that hit max_new_tokens when `mask_truncated`), and the
        sampler's log-prob of each label (0 before the completion)."""
        examples = []
        for o in outs:
            keep = o.finished or not mask_truncated
            completion = o.token_ids if keep else [IGNORE_INDEX] * len(o.token_ids)
            labels = [IGNORE_INDEX] * (len(o.prompt_ids) - 1) + completion
            sampler = torch.tensor([0.0] * (len(o.prompt_ids) - 1) + [float(x) for x in o.logprobs])
            examples.append(
                {
                    "input_ids": (o.prompt_ids + o.token_ids)[:-1],
                    "labels": labels,
                    "kept": keep,
                    "sampler_logps": sampler,
                }
            )
        return examples

    # --- eval ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy completions of the eval prompts: the mean of each reward function and of the total."""
        if not self.eval_data:
            return {}
        mine = list(self.eval_data)[self.rank :: self.world]
        # every process scores as many rows (the first repeated, its scores not counted), so that a sharded
        # reward model runs its forwards in step on all of them
        rows = mine + [self.eval_data[0]] * (-(-len(self.eval_data) // self.world) - len(mine))
        params = self.sampling_params(greedy=True)
        sums = dict.fromkeys([self.total_name, *self.reward_set.names], 0.0)  # the same keys on every process
        engine = TorchEngine(self.sampler_model(), pad_id=self.pad_id, compile=self.r.compile)
        for start in phase(range(0, len(rows), 64), "eval: greedy completions", "batch", min_items=4):
            _, _, totals, parts = self.complete_and_score(rows[start : start + 64], params, engine)
            for name, values in {self.total_name: totals, **parts}.items():
                sums[name] += sum(values[: max(0, len(mine) - start)])
        names = sorted(sums)
        reduced = self.reduce_sum([float(len(mine))] + [sums[k] for k in names])
        return {f"eval/{k}": v / max(reduced[0], 1) for k, v in zip(names, reduced[1:])}


# --- what the commands share ------------------------------------------------------------------------


def setup(recipe, name: str) -> tuple:
    """Tokenizer (with the chat template of section `name`), reward set and encoded train/eval prompts for an
    online-RL command, all checked before anything is written: (tokenizer, rewards, prompts, evals, note)."""
    from aligner.errors import ConfigError
    from aligner.model.tokenizer import system_prompt
    from aligner.trainers.setup import encode_prompts, load_splits, reward_set_of, sft_tokenizer

    d, section = recipe.data, getattr(recipe, name)
    tokenizer = sft_tokenizer(recipe, name)
    if not reply_stop_ids(tokenizer):
        raise ConfigError("the tokenizer has no end-of-turn or EOS token, so completions could never stop; add one")
    weights = section.reward_weights
    if f"{name}.rewards" in recipe.explicit and f"{name}.reward_weights" not in recipe.explicit and weights:
        print(f"{name}: rewards {', '.join(section.rewards)} given without weights: each weighs 1")
        weights = section.reward_weights = []  # the recipe's weights were for its own rewards
    rewards = reward_set_of(section.rewards, weights, section.reward_model)
    train_rows, eval_rows = load_splits(recipe, "rl")
    limit = d.seq_len - recipe.rollout.max_new_tokens
    system = system_prompt(d.system_prompt)
    prompts, dropped = encode_prompts(train_rows, tokenizer, limit, f"data.source '{d.source}'", system)
    evals = encode_prompts(eval_rows, tokenizer, limit, "the eval split", system)[0] if eval_rows else None
    note = f"{len(prompts)} prompts" + (f", {dropped} longer than {limit} tokens dropped" if dropped else "")
    return tokenizer, rewards, prompts, evals, f"{note}; rewards {', '.join(rewards.names)}"


def run_online(recipe, trainer_class: type, describe, reference: bool = True, grouped: bool = True) -> dict:
    """An online command, from the recipe's model (default: the SFT run), with its section
    `recipe.<trainer_class.stage>`: the completions of a process's step checked to split into whole groups of
    `num_generations` (`grouped`), tokenizer, rewards and prompts (`setup`), the model and, when `reference`,
    its frozen reference, the run directory and the trainer, all before anything is written; two start-up
    lines (the second's middle is `describe(trainer, reference kind)`); then train and score held-out
    accuracy. Returns what `train_and_score` does."""
    from aligner.errors import ConfigError
    from aligner.trainers.base import prepare_run_dir
    from aligner.trainers.reference import frozen_reference, reference_kind
    from aligner.trainers.setup import prepare_model, train_and_score, training_kind

    name = trainer_class.stage
    c, t = getattr(recipe, name), recipe.train
    if grouped and (t.micro_batch_size * t.grad_accum) % c.num_generations:
        raise ConfigError(
            f"{recipe.path or 'recipe'}: train.micro_batch_size x grad_accum (completions per process and step) "
            f"must be a multiple of {name}.num_generations ({c.num_generations})"
        )
    tokenizer, reward_set, prompts, evals, note = setup(recipe, name)
    model = prepare_model(recipe, tokenizer, stage=name)
    ref_model = frozen_reference(model, recipe, needed=reference)
    run_dir = Path(t.out_dir) / t.name
    prepare_run_dir(run_dir, t.resume, t.overwrite)
    trainer = trainer_class(recipe, model, tokenizer, prompts, evals, reward_set, ref_model=ref_model)
    if trainer.is_main:
        print(f"{name}: {note}")
        what = describe(trainer, reference_kind(recipe, reference, ref_model=trainer.ref_model))
        print(f"{name}: {training_kind(recipe)}, {what}, {trainer.total_steps} steps -> {run_dir}")
    return train_and_score(trainer, trainer.unwrapped, tokenizer, c.accuracy_items, c.accuracy_tokens)
