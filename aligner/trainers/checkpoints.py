"""What the training loop does with checkpoints (a mixin of `aligner.trainers.base.Trainer`): atomic
step_* directories (every process's RNG state, the main process's weights, tokenizer, recipe, optimizer
and scheduler, a manifest written last), the published `final`, and exact resume from the newest intact
checkpoint, with the recipe checked against the checkpoint's."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from aligner import checkpoint as ckpt
from aligner.config import Recipe, save_recipe
from aligner.errors import ConfigError
from aligner.registry import SECTIONS
from aligner.trainers.sharding import full_state_dict, load_sharded, save_sharded

# fields that do not change what a run optimises (cadence, where and how it reports, end-of-run evals): a
# resumed run may change them freely; a change to any other field needs train.resume_with_changes
RESUME_FREE = {
    "train": {"name", "out_dir", "eval_every", "save_every", "keep_checkpoints", "log_every", "trackers", "progress",
              "resume", "resume_with_changes", "overwrite", "compile"},
    "data": {"eval_source", "eval_split", "num_eval_rows", "streaming"},
    "sft": {"accuracy_items", "accuracy_tokens", "samples", "sample_tokens"},
    "dpo": {"accuracy_items", "accuracy_tokens", "ref_cache_dir"},
    "rollout": {"engine", "compile", "vllm_memory", "vllm_sleep", "server_url", "sync_bucket_mb", "share_prompts"},
}  # fmt: skip
END_EVALS = {"accuracy_items", "accuracy_tokens"}  # any other algorithm section's resume-free fields


def recipe_changes(old: Recipe, new: Recipe) -> dict[str, tuple]:
    """{"section.key": (old value, new value)} for every field outside RESUME_FREE that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {
        f"{section}.{key}": (a[section][key], value)
        for section in SECTIONS
        for key, value in b[section].items()
        if key not in RESUME_FREE.get(section, END_EVALS) and a[section].get(key) != value
    }


class Checkpointing:
    """Needs the trainer's run_dir, rank, world, is_main, accelerator, model, optimizer, scheduler, tokenizer,
    recipe, cfg, stage and step, and its hooks save_extra, load_extra, load_weights and unwrapped."""

    def save_checkpoint(self, step: int) -> Path:
        """Write step_<step> atomically: all processes write their RNG state, the main one the rest."""
        name = ckpt.step_dir_name(step)
        tmp = self.run_dir / f".tmp_{name}"
        if self.is_main:
            ckpt.temp_dir(self.run_dir, name)
        self.accelerator.wait_for_everyone()
        ckpt.save_rng(tmp, self.rank)
        self.save_extra(tmp)
        weights = {}  # the module's own, or a sharded model's gathered
        if self.sharded:  # every process: its shards to tmp/sharded, and its part of gathering the weights
            save_sharded(self.model, self.optimizer, tmp)
            weights = {"state_dict": full_state_dict(self.model, main_only=True)}
        if self.is_main:
            self.unwrapped().save_pretrained(tmp, **weights)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            save_recipe(self.recipe, tmp)
            state = {
                "step": step,
                "optimizer": None if self.sharded else self.optimizer.state_dict(),  # sharded: in tmp/sharded
                "scheduler": self.scheduler.state_dict(),
                "world_size": self.world,
            }
            ckpt.save_trainer_state(tmp, state)
        self.accelerator.wait_for_everyone()
        target = self.run_dir / name
        if self.is_main:
            ckpt.write_manifest(tmp)  # last: a checkpoint whose files match it is whole
            ckpt.publish(tmp, target)
            ckpt.prune(self.run_dir, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return target

    def publish_final(self, step_dir: Path) -> Path:
        final = self.run_dir / "final"
        if self.is_main:
            tmp = self.run_dir / ".tmp_final"
            if tmp.exists():
                shutil.rmtree(tmp)
            ckpt.link_copy(step_dir, tmp)
            ckpt.publish(tmp, final)
        self.accelerator.wait_for_everyone()
        return final

    def resume(self) -> None:
        """Continue from the newest intact checkpoint: one whose files do not match its manifest, or whose
        state cannot be read, is skipped with a line saying so. The recipe must not have changed in what
        shapes the optimisation (`recipe_changes`) unless train.resume_with_changes, which
        applies the new values and records them in <run dir>/resume_changes.jsonl."""
        found = ckpt.list_checkpoints(self.run_dir)
        for _, path in reversed(found):
            problem = ckpt.verify(path)
            state = None
            if problem is None:
                try:
                    state = ckpt.load_trainer_state(path)
                except Exception as e:  # a damaged pickle raises any of several types
                    problem = f"{ckpt.STATE_FILE} cannot be read ({type(e).__name__})"
            if problem is None:
                changes = self.check_recipe(path)
                if state.get("world_size", 1) != self.world:
                    raise ConfigError(
                        f"{path} was written by {state.get('world_size')} processes; resume it with the same number "
                        f"(this run has {self.world}) so the data order stays the same"
                    )
                try:
                    if self.sharded:
                        load_sharded(self.model, self.optimizer, path)
                    else:
                        self.load_weights(path)
                        self.optimizer.load_state_dict(state["optimizer"])
                    self.scheduler.load_state_dict(state["scheduler"])
                except Exception as e:  # weights that do not fit: a damaged or foreign checkpoint
                    problem = f"its weights or optimizer state cannot be loaded ({type(e).__name__})"
            if problem is not None:
                if self.is_main:
                    print(f"{self.stage}: --resume skips {path}: {problem}")
                continue
            self.step = int(state["step"])
            ckpt.load_rng(path, self.rank)
            self.load_extra(path)
            if changes:
                self.apply_changes(changes)
            if self.is_main:
                print(f"{self.stage}: resumed from {path} at step {self.step}")
            return
        if found:
            raise ConfigError(
                f"--resume: no intact checkpoint in {self.run_dir} (each one above is damaged); start the run "
                "again with --overwrite"
            )
        if self.is_main:
            print(f"{self.stage}: --resume given but {self.run_dir} has no checkpoint; starting from step 0")

    def check_recipe(self, path: Path) -> dict:
        """The changes from the checkpoint's recipe that matter to the optimisation; an error unless
        train.resume_with_changes."""
        from aligner.config import load_recipe

        saved = Path(path) / "recipe.yaml"
        if not saved.is_file():
            return {}
        changes = recipe_changes(load_recipe(saved), self.recipe)
        if changes and not self.cfg.resume_with_changes:
            listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            raise ConfigError(
                f"--resume: the recipe differs from {saved} in {listed}; resume as it was, or pass "
                "--resume-with-changes to apply the new values from here on"
            )
        return changes

    def apply_changes(self, changes: dict) -> None:
        """After a resume with changes: the new learning rate, schedule and AdamW settings replace those the
        optimizer and scheduler state carried (batch, data and seed changes apply by themselves), and the
        change is recorded in the run directory."""
        groups = self.optimizer.param_groups
        for group, decay in zip(groups, (self.cfg.weight_decay, 0.0)):
            group.update(weight_decay=decay, betas=(self.cfg.beta1, self.cfg.beta2), initial_lr=self.cfg.lr)
        self.scheduler.base_lrs = [self.cfg.lr] * len(groups)
        for group, fn in zip(groups, self.scheduler.lr_lambdas):
            group["lr"] = self.cfg.lr * fn(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in groups]
        if self.is_main:
            row = {
                "step": self.step,
                "time": round(time.time(), 3),
                "changes": {k: list(v) for k, v in changes.items()},
            }
            with (self.run_dir / "resume_changes.jsonl").open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
            print(
                f"{self.stage}: resumed with changes: " + ", ".join(f"{k} -> {b!r}" for k, (_, b) in changes.items())
            )


def discard_unstarted(run_dir: Path, created: Path) -> None:
    """Remove the run directory, and the new ones above it up to `created`, when the run stopped before it
    logged a step or saved a checkpoint (it holds only its recipe.yaml and empty logs)."""
    if not run_dir.is_dir():
        return
    metrics = run_dir / "metrics.jsonl"
    if (metrics.is_file() and metrics.stat().st_size) or any(
        p.name == "final" or ckpt.STEP_RE.match(p.name) for p in run_dir.iterdir()
    ):
        return
    shutil.rmtree(run_dir)
    for parent in run_dir.parents:
        if created not in (parent, *parent.parents) or any(parent.iterdir()):
            break
        parent.rmdir()


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; called after all inputs have been validated."""
    run_dir = Path(run_dir)
    has_run = run_dir.exists() and any(
        p.name == "final" or p.name == "metrics.jsonl" or ckpt.STEP_RE.match(p.name) for p in run_dir.iterdir()
    )
    if has_run and not resume and not overwrite:
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it, --train.name NAME to start another, "
            "or --overwrite to replace it"
        )
    if has_run and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
