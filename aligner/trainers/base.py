"""THE training loop, shared by every trainer.

Subclasses say only how a micro-batch is made (`collate`, or `micro_batches` for trainers that
generate their data, such as PPO/GRPO) and how its loss is computed (`compute_loss`). This class does
everything else: the optimizer (AdamW with weight-decay groups), warmup + cosine schedule, gradient
clipping, bf16 autocast, gradient accumulation, multi-process data parallelism through accelerate,
eval cadence, metrics and progress, atomic checkpoints and exact resume.

Loss normalisation. `compute_loss` returns the *sum* of per-unit losses of its micro-batch (units are
tokens for SFT, pairs for DPO), and each micro-batch carries `n_loss`, its number of units. One
optimizer step divides by the units of the whole accumulated batch on all processes, so
micro-batch 8 x accumulation 1 and micro-batch 2 x accumulation 4 give the same update even when
micro-batches hold different numbers of loss tokens. A loss with a term of other units (DPO's RPO term
and the reward model's LM term are token means over the chosen replies) has its micro-batches carry
`units` ({"chosen_tokens": k}); the loop sums those over the accumulated batch and processes too and
hands them to `compute_loss` as `self.units`, so that term is normalised over the whole batch as well.

Data order is a pure function of (seed, step): the examples of step s are the s-th slice of a stream
of seeded per-epoch permutations, split across processes and micro-batches. Resuming at step s
therefore needs only s, the model, the optimizer, the scheduler and the RNG states.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from aligner import checkpoint as ckpt
from aligner.config import Recipe, save_recipe
from aligner.errors import AlignerError, DataError
from aligner.model.forward import enable_gradient_checkpointing
from aligner.tracking import Progress, Tracker, plot_metrics
from aligner.trainers import zero
from aligner.trainers.checkpoints import Checkpointing, prepare_run_dir  # noqa: F401  (part of this module's API)
from aligner.trainers.optim import (  # noqa: F401  (part of this module's API)
    make_accelerator,
    param_groups,
    resolve_precision,
    warmup_cosine,
)
from aligner.trainers.sharding import clip_gradients, is_sharded, shard_for_launch


class TrainingError(AlignerError):
    """The run cannot go on (non-finite loss or gradients); the last good checkpoint is kept."""


class Trainer(Checkpointing):
    """Shared loop. Subclasses implement `collate` (or `micro_batches`) and `compute_loss`."""

    stage = "train"  # used in messages and the progress bar
    token_loss = True  # the loss units are tokens (eval reports perplexity); False for pairs, rows
    empty_steps_ok = False  # a step without loss units skips its update (RL) instead of stopping the run

    def __init__(
        self,
        recipe: Recipe,
        model: torch.nn.Module,
        tokenizer: Any,
        train_data: Sequence,
        eval_data: Sequence | None = None,
        accelerator: Accelerator | None = None,
    ):
        self.recipe = recipe
        zero.check(self)  # before accelerate, which would import DeepSpeed
        self.cfg = recipe.train
        self.tokenizer = tokenizer
        self.train_data = train_data
        self.eval_data = eval_data
        self.accelerator = accelerator or make_accelerator(recipe.train.precision)
        self.device = self.accelerator.device
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.run_dir = Path(self.cfg.out_dir) / self.cfg.name
        self.step = 0
        self.units: dict[str, float] = {}  # the current step's unit counts, over the accumulated batch (see above)
        self._perm_cache: tuple[int, torch.Tensor] | None = None

        if self.cfg.deterministic:  # before the first cuBLAS call, which reads the workspace setting
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        torch.manual_seed(self.cfg.seed)
        self.model = model
        if self.cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.cfg.compile:  # in place: the module, its parameter names and checkpoints stay as they are
            model.compile(dynamic=None)  # shapes that vary between batches become dynamic after one recompile
        self.shard_here = shard_for_launch(self, model)  # FSDP2 where accelerate does not shard (CPUs)
        self.sharded = self.shard_here  # set again once accelerate has prepared the model
        self.optimizer = self.make_optimizer(model)
        self.total_steps = self.compute_total_steps()
        warmup = self.cfg.warmup_steps
        if warmup is None:
            warmup = max(1, round(self.cfg.warmup_ratio * self.total_steps)) if self.cfg.warmup_ratio > 0 else 0
        self.warmup = warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, self.total_steps, warmup, self.cfg.min_lr_ratio)
        )

    # --- hooks for subclasses ------------------------------------------------------------------------

    def collate(self, examples: list) -> dict:
        """Turn examples into a micro-batch dict of tensors with `n_loss` (int) and `n_tokens` (int)."""
        raise NotImplementedError

    def batch_units(self, batch: dict) -> dict:
        """The unit counts a loss term normalises by: the whole step's inside the loop, else (a direct call)
        the batch's own."""
        return self.units or {"n_loss": batch["n_loss"], **batch.get("units", {})}

    def compute_loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """Return (sum of per-unit losses over the micro-batch, stats of floats averaged over units)."""
        raise NotImplementedError

    def save_extra(self, directory: Path) -> None:
        """Per-process state beyond model, optimizer and RNG that exact resume needs (every process calls it)."""

    def load_extra(self, directory: Path) -> None:
        """Read back what `save_extra` wrote."""

    def load_weights(self, directory: Path) -> None:
        """Model weights back from a checkpoint (a trainer whose model saves in parts overrides it)."""
        ckpt.load_weights(self.unwrapped(), directory)

    def eval_metrics(self, totals: dict) -> dict:
        """Eval metrics from summed `loss` and `n_loss` over the eval set (perplexity when the units are
        tokens), and the means over units of the stats `compute_loss` returned."""
        loss = totals["loss"] / max(totals["n_loss"], 1)
        out = {"eval/loss": loss}
        if self.token_loss:
            out["eval/ppl"] = math.exp(min(loss, 50.0))
        out.update({f"eval/{k}": v for k, v in totals.items() if k not in ("loss", "n_loss")})
        return out

    # --- data order ------------------------------------------------------------------------------------

    @property
    def global_batch(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum * self.world

    def compute_total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        return max(1, math.ceil(self.cfg.epochs * len(self.train_data) / self.global_batch))

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(len(self.train_data), generator=g))
        return self._perm_cache[1]

    def step_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of optimizer step `step` (all processes)."""
        n = len(self.train_data)
        start = step * self.global_batch
        out = []
        for pos in range(start, start + self.global_batch):
            out.append(int(self._permutation(pos // n)[pos % n]))
        return out

    def first_epoch_batches(self) -> list[list[int]]:
        """The dataset indices of every micro-batch training makes (of every process, in step order) until
        each example has appeared once: the batches a per-example precomputation should use to reproduce
        the first epoch's numbers exactly."""
        n, mb, seen, out, step = len(self.train_data), self.cfg.micro_batch_size, set(), [], 0
        while len(seen) < n:
            idx = self.step_indices(step)
            for k in range(self.cfg.grad_accum * self.world):
                chunk = idx[k * mb : (k + 1) * mb]
                if not seen.issuperset(chunk):
                    out.append(chunk)
                    seen.update(chunk)
            step += 1
        return out

    def batching(self) -> list:
        """What decides how examples are grouped into micro-batches, and the precision they run in."""
        c = self.cfg
        packing = [getattr(self, "packing", False), getattr(self, "row_len", 0)]
        return [c.seed, c.micro_batch_size, c.grad_accum, self.world, self.precision, *packing]

    def micro_batches(self, step: int) -> list[dict]:
        """This process's `grad_accum` micro-batches for optimizer step `step`.

        Micro-batch j of process r holds slice (j * world + r) of the global batch, so the union
        over processes of micro-batch j is the same whatever the number of processes.
        """
        idx = self.step_indices(step)
        mb = self.cfg.micro_batch_size
        out = []
        for j in range(self.cfg.grad_accum):
            k = j * self.world + self.rank
            out.append(self.collate([self.train_data[i] for i in idx[k * mb : (k + 1) * mb]]))
        return out

    # --- optimizer -----------------------------------------------------------------------------------

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        groups = param_groups(model, self.cfg.weight_decay)
        kwargs = dict(lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2), eps=1e-8)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # fused kernel not available for this device/dtype
            return torch.optim.AdamW(groups, **kwargs)

    # --- precision -----------------------------------------------------------------------------------

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.precision == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        """The batch's tensors on the training device; to a GPU from pinned memory, so the copy does not
        make the host wait (`non_blocking`)."""
        pin = self.device.type == "cuda"
        return {
            k: (v.pin_memory() if pin and v.is_cpu else v).to(self.device, non_blocking=True)
            if torch.is_tensor(v)
            else v
            for k, v in batch.items()
        }

    def reduce_sum(self, values: list) -> list[float]:
        """Sums over processes of numbers or 0-d tensors, as floats (one copy to the host for all of them)."""
        t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device) for v in values])
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    # --- one optimizer step --------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        """Forward/backward over this step's micro-batches, clip, optimizer and scheduler step."""
        model = self.model
        micro = self.micro_batches(step)
        n_local = sum(int(b["n_loss"]) for b in micro)
        tokens_local = sum(int(b.get("n_tokens", 0)) for b in micro)
        extra = sorted({k for b in micro for k in b.get("units", {})})  # counts of other loss terms' units
        units_local = [sum(int(b.get("units", {}).get(k, 0)) for b in micro) for k in extra]
        n_global, tokens_global, *units_global = self.reduce_sum([n_local, tokens_local, *units_local])
        self.units = {"n_loss": n_global, **dict(zip(extra, units_global))}
        if n_global == 0:
            if not self.empty_steps_ok:
                raise DataError(
                    f"{self.stage}: step {step + 1} has no loss tokens in any example; check the data masks"
                )
            lr = self.scheduler.get_last_lr()[0]  # nothing to learn from (RL: every completion masked): no update
            self.scheduler.step()
            self.units = {}
            return {"train/loss": 0.0, "train/lr": lr, "train/grad_norm": 0.0, "train/tokens": tokens_global}
        loss_sum_local = torch.zeros((), dtype=torch.float64, device=self.device)
        stats_sum: dict[str, float] = {}
        ds = zero.is_engine(model)  # DeepSpeed: the engine accumulates until the step's last micro-batch
        for j, batch in enumerate(micro):
            batch = self.to_device(batch)
            last = j == len(micro) - 1
            sync = contextlib.nullcontext() if last or self.world == 1 or ds else self.accelerator.no_sync(model)
            with sync:
                with self.autocast():
                    loss_sum, stats = self.compute_loss(model, batch)
                # DDP averages gradients over processes; scale so the result is sum / n_global.
                scaled = loss_sum * (self.world / n_global)
                if ds:
                    zero.backward(model, scaled, last)
                else:
                    self.accelerator.backward(scaled)
            loss_sum_local += loss_sum.detach().double()
            for k, v in stats.items():  # tensors stay on the device: one synchronisation per step, below
                stats_sum[k] = stats_sum.get(k, 0.0) + v * int(batch["n_loss"])
        keys = sorted(stats_sum)
        reduced = self.reduce_sum([loss_sum_local] + [stats_sum[k] for k in keys])
        loss = reduced[0] / n_global
        if not math.isfinite(loss):
            raise TrainingError(self._stop_message(step, f"train/loss is {loss}"))
        params = [p for p in model.parameters() if p.requires_grad]
        # the norm before clipping; a DeepSpeed engine clips and steps here (so its step is taken before the check)
        grad_norm = zero.step(model) if ds else clip_gradients(params, self.cfg.grad_clip, self)
        if not math.isfinite(grad_norm):
            raise TrainingError(self._stop_message(step, f"the gradient norm is {grad_norm}"))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.units = {}
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/tokens": tokens_global}
        metrics.update({f"{self.stage}/{k}": v / n_global for k, v in zip(keys, reduced[1:])})  # dpo/rewards/...
        return metrics

    def _stop_message(self, step: int, what: str) -> str:
        last = ckpt.latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return f"{self.stage}: {what} at step {step + 1}; stopped without saving, {kept} (try a lower train.lr)"

    # --- eval ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.eval_data:
            return {}
        was_training = self.model.training
        self.model.eval()
        mb = self.cfg.micro_batch_size
        loss_sum, n, stats_sum = 0.0, 0, {}
        mine = list(range(self.rank, len(self.eval_data), self.world))
        # every process runs the same number of forward passes (a wrapped model may synchronise in each);
        # one with fewer rows runs a stand-in batch whose results are not counted
        per_process = -(-len(self.eval_data) // self.world)
        for start in range(0, per_process, mb):
            rows = mine[start : start + mb]
            batch = self.to_device(self.collate([self.eval_data[i] for i in rows or [0]]))
            with self.autocast():
                loss, stats = self.compute_loss(self.model, batch)
            if not rows:
                continue
            loss_sum += float(loss)
            n += int(batch["n_loss"])
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + float(v) * int(batch["n_loss"])
        keys = sorted(stats_sum)
        reduced = self.reduce_sum([loss_sum, n] + [stats_sum[k] for k in keys])
        self.model.train(was_training)
        totals = {"loss": reduced[0], "n_loss": reduced[1]}
        totals.update({k: v / max(reduced[1], 1) for k, v in zip(keys, reduced[2:])})  # means over units
        return self.eval_metrics(totals)

    # --- checkpoints ---------------------------------------------------------------------------------

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # --- the loop ------------------------------------------------------------------------------------

    def train(self) -> dict:
        """Run to `total_steps`; returns the last eval metrics (and writes runs/<name>/final)."""
        zero.configure(self.accelerator, self.cfg, self.world)  # under DeepSpeed: the loop's settings
        if not self.shard_here:  # (a model the loop sharded itself must not be wrapped in DDP on top)
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.sharded = is_sharded(self.model)
        self.model.train()
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.cfg.resume:  # before the run's recipe.yaml is written: resume compares with the checkpoint's
            self.resume()
        if self.is_main:
            save_recipe(self.recipe, self.run_dir)
        tracker = Tracker(self.run_dir, self.cfg.trackers, enabled=self.is_main, config=self.recipe.to_dict())
        if self.cfg.resume and self.is_main:
            tracker.truncate_after(self.step)
        progress = Progress(self.total_steps, self.step, enabled=self.is_main and self.cfg.progress, desc=self.stage)
        last_eval: dict = {}
        saved_at = None
        tok_ema = None
        try:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                metrics = self.train_step(self.step)
                dt = time.perf_counter() - t0
                self.step += 1
                tok_s = metrics["train/tokens"] / dt
                tok_ema = tok_s if tok_ema is None else 0.9 * tok_ema + 0.1 * tok_s
                metrics["train/tokens_per_s"] = tok_s
                metrics["train/step_time"] = dt
                at_end = self.step == self.total_steps
                evaluated = False
                if at_end or (self.cfg.eval_every and self.step % self.cfg.eval_every == 0):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                    evaluated = bool(last_eval)
                    if evaluated:
                        progress.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                if self.step % self.cfg.log_every == 0 or at_end or evaluated:
                    tracker.log(self.step, metrics)
                progress.update(loss=metrics["train/loss"], lr=metrics["train/lr"], tok_s=round(tok_ema))
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_checkpoint(self.step)
                    saved_at = self.step
        finally:
            progress.close()
            tracker.close()
        step_dir = self.run_dir / ckpt.step_dir_name(self.step)
        if saved_at != self.step and not (step_dir / ckpt.STATE_FILE).is_file():
            step_dir = self.save_checkpoint(self.step)
        self.publish_final(step_dir)
        if self.is_main:
            plot_metrics(self.run_dir)
        return last_eval
