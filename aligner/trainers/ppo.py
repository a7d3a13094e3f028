"""PPO with a KL penalty (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT) on the shared loop.

    aligner ppo                                   # recipes/ppo.yaml: from runs/sft/final, scored by runs/rm/final
    aligner ppo --kl_coef 0.1 --kl_target 4       # adaptive KL controller toward 4 nats per completion
    aligner ppo --value_model shared              # the value head on the policy instead of its own critic

Each rollout samples one completion for each of `ppo.rollout_prompts` prompts, scores it with the
reward model (and any reward functions), and subtracts `missing_eos_penalty` where the completion
never ended. With no gradient, the trainer then computes the policy's log-probs, the reference's
(a frozen copy, or with LoRA the adapter-disabled model) and the values. The per-token reward is
-kl_coef * KL_t (k1 or k3 estimate) with the score added on the last token; GAE gives advantages and
returns, advantages are whitened over the rollout. The rollout then serves `ppo_epochs` passes in
minibatches of the loop's global batch, one optimizer step each: clipped policy loss
(aligner.losses.ppo_policy_loss), vf_coef x clipped value loss, minus an optional entropy bonus.

The value model is a critic of its own (a scalar-head model started from `ppo.value_init`, by
default the reward model, as InstructGPT did) or a linear head on the policy's final hidden states.
Checkpoints hold the policy as usual (it loads anywhere a policy does) and the critic under
`critic/` (or the head as `value_head.safetensors`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from aligner import checkpoint as ckpt
from aligner.advantages import AdaptiveKLController, gae, kl_shaped_rewards, whiten
from aligner.config import Recipe
from aligner.data.collate import pad_examples, pad_examples_with
from aligner.errors import ConfigError
from aligner.logprobs import IGNORE_INDEX, kl_estimate, token_logprobs
from aligner.losses import ppo_policy_loss, ppo_value_loss
from aligner.model.forward import base_config, causal_lm_logits
from aligner.model.gpt import GPTConfig
from aligner.model.heads import ScalarHeadModel, is_reward_checkpoint, load_reward_model
from aligner.model.load import load_model
from aligner.trainers.base import prepare_run_dir
from aligner.trainers.online import OnlineTrainer, setup
from aligner.trainers.reference import frozen_reference, reference_kind, reference_of


class PolicyAndValue(nn.Module):
    """The policy and its value model, trained by one optimizer: a separate critic, or a head on the policy."""

    def __init__(self, policy: nn.Module, critic: ScalarHeadModel | None = None):
        super().__init__()
        self.policy = policy
        self.critic = critic
        self.value_head = None
        if critic is None:
            self.value_head = nn.Linear(base_config(policy).hidden_size, 1, bias=False)
            nn.init.zeros_(self.value_head.weight)
            self.value_head.to(next(policy.parameters()).device)

    def shard_units(self) -> list[nn.Module]:
        """FSDP2: the modules to shard as units of their own (aligner.trainers.sharding.shard_model)."""
        return [self.policy, self.critic if self.critic is not None else self.value_head]

    def forward(self, input_ids: torch.Tensor, values: bool = True):
        """Logits (B, T, V) and values (B, T) (fp32) of every position; the logits alone if not `values`."""
        if not values:
            return causal_lm_logits(self.policy, input_ids)
        if self.critic is not None:
            return causal_lm_logits(self.policy, input_ids), self.critic(input_ids)
        if isinstance(base_config(self.policy), GPTConfig):
            logits, hidden = self.policy(input_ids, hidden_too=True)  # (B, T, V), (B, T, D)
        else:
            out = self.policy(input_ids=input_ids, output_hidden_states=True, use_cache=False)
            logits, hidden = out.logits, out.hidden_states[-1]
        return logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def save_pretrained(self, directory, state_dict: dict | None = None, **kw) -> None:
        """The policy into `directory`, the critic into directory/critic or the value head beside the policy.
        `state_dict`: this module's weights to write instead of its own (a sharded model's, gathered)."""
        directory = Path(directory)

        def part(prefix: str) -> dict | None:
            if state_dict is None:
                return None
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        self.policy.save_pretrained(directory, **kw, **({"state_dict": part("policy.")} if state_dict else {}))
        if self.critic is not None:
            self.critic.save_pretrained(directory / "critic", state_dict=part("critic."))
        else:
            head = self.value_head.weight if state_dict is None else state_dict["value_head.weight"]
            save_file({"weight": head.detach().cpu().contiguous()}, directory / "value_head.safetensors")

    def load_checkpoint(self, directory) -> None:
        directory = Path(directory)
        ckpt.load_weights(self.policy, directory)
        if self.critic is not None:
            ckpt.load_weights(self.critic, directory / "critic")
        else:
            self.value_head.weight.data.copy_(load_file(directory / "value_head.safetensors")["weight"])


class PPOTrainer(OnlineTrainer):
    """Training data are prompt records {"prompt", "prompt_ids", **columns} (see aligner.trainers.grpo)."""

    stage = "ppo"
    total_name = "score"

    def __init__(
        self, recipe: Recipe, model: PolicyAndValue, tokenizer, prompts, eval_prompts, reward_set, ref_model=None, **kw
    ):
        self.p = recipe.ppo
        super().__init__(recipe, model, tokenizer, prompts, eval_prompts, reward_set, ref_model=ref_model, **kw)
        self.kl_ctl = (
            AdaptiveKLController(self.p.kl_coef, self.p.kl_target, self.p.kl_horizon) if self.p.kl_target else None
        )

    @property
    def steps_per_rollout(self) -> int:
        return self.p.ppo_epochs * self.p.rollout_prompts // self.global_batch

    def compute_total_steps(self) -> int:
        if self.cfg.max_steps is not None:
            return self.cfg.max_steps
        rollouts = max(1, round(self.cfg.epochs * len(self.train_data) / self.recipe.ppo.rollout_prompts))
        return rollouts * self.recipe.ppo.ppo_epochs * self.recipe.ppo.rollout_prompts // self.global_batch

    @property
    def kl_coef(self) -> float:
        return self.kl_ctl.beta if self.kl_ctl else self.p.kl_coef

    def policy(self) -> nn.Module:
        return self.unwrapped().policy

    def generating_part(self, model: PolicyAndValue) -> nn.Module:
        return model.policy

    # --- rollouts ------------------------------------------------------------------------------------

    def token_logps_values(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            logits, values = model(batch["input_ids"])
        return token_logprobs(logits.float() / self.temperature, batch["labels"]), values.float()

    def policy_logps(self, model, batch: dict) -> torch.Tensor:
        with self.autocast():
            logits = causal_lm_logits(model, batch["input_ids"])
        return token_logprobs(logits.float() / self.temperature, batch["labels"])

    @torch.no_grad()
    def make_rollout(self, rollout: int) -> tuple[list[dict], dict]:
        rows = self.rollout_rows(rollout, self.p.rollout_prompts)
        params = self.sampling_params(seed=self.sampling_seed(rollout))
        outs, _, scores, parts = self.complete_and_score(rows, params)
        no_eos = torch.tensor([not o.finished for o in outs]).float()
        scores = torch.tensor(scores) - self.p.missing_eos_penalty * no_eos
        examples = self.completion_examples(outs, mask_truncated=False)
        batch = self.to_device(pad_examples(examples, self.pad_id))
        mask = (batch["labels"] != IGNORE_INDEX).float()  # (B, T)
        logps, values = self._chunked(lambda b: self.token_logps_values(self.model, b), batch)
        ref_logps = self._chunked(lambda b: (self.reference_logps(b),), batch)[0]
        kl = kl_estimate(logps, ref_logps, self.p.kl_estimator) * mask  # (B, T)
        rewards = kl_shaped_rewards(scores, kl, mask, self.kl_coef)
        advantages, returns = gae(rewards, values * mask, mask, self.p.gamma, self.p.lam)
        if self.p.whiten_advantages:
            advantages = whiten(advantages, mask)
        var = ((returns - returns[mask > 0].mean()) ** 2 * mask).sum()
        resid = ((returns - values) ** 2 * mask).sum()
        metrics = {
            "rollout/score_mean": float(scores.mean()),
            "rollout/score_std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "rollout/completion_len": float(mask.sum(-1).mean()),
            "rollout/no_eos": float(no_eos.mean()),
            "kl/mean": float(kl.sum(-1).mean()),
            "kl/coef": self.kl_coef,
            "rollout/explained_variance": float(1 - resid / var.clamp(min=1e-8)),
            **{f"rollout/{name}": sum(v) / len(v) for name, v in parts.items()},
        }
        per_token = {"old_logps": logps, "old_values": values, "advantages": advantages, "returns": returns}
        per_token = {k: v.cpu() for k, v in per_token.items()}
        items = [
            {
                "input_ids": batch["input_ids"][i].cpu(),
                "labels": batch["labels"][i].cpu(),
                **{k: v[i] for k, v in per_token.items()},
            }
            for i in range(len(examples))
        ]
        return items, metrics

    def on_rollout(self, metrics: dict) -> None:
        if self.kl_ctl:
            self.kl_ctl.update(metrics["kl/mean"], self.p.rollout_prompts)

    def _chunked(self, fn, batch: dict) -> tuple[torch.Tensor, ...]:
        """fn over micro-batch-sized slices of a padded batch, concatenated."""
        mb, B = self.cfg.micro_batch_size, batch["input_ids"].shape[0]
        parts = [fn({k: v[i : i + mb] for k, v in batch.items() if torch.is_tensor(v)}) for i in range(0, B, mb)]
        return tuple(torch.cat(xs) for xs in zip(*parts))

    def reference_logps(self, batch: dict) -> torch.Tensor:
        with reference_of(self.policy(), self.ref_model) as ref:
            if ref is self.policy():  # adapter disabled: through the wrapper, whose forward a sharded model needs
                with self.autocast():
                    logits = self.model(batch["input_ids"], values=False)
                return token_logprobs(logits.float() / self.temperature, batch["labels"])
            return self.policy_logps(ref, batch)

    def micro_batches(self, step: int) -> list[dict]:
        """Minibatch `step` of the rollout's epochs: a seeded shuffle of the rollout per epoch."""
        items = self.rollout_data(step)
        rollout, within = divmod(step, self.steps_per_rollout)
        size = self.cfg.micro_batch_size * self.cfg.grad_accum
        epoch, index = divmod(within, len(items) // size)
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + rollout * 101 + epoch)
        chosen = torch.randperm(len(items), generator=g).tolist()[index * size : (index + 1) * size]
        mb = self.cfg.micro_batch_size
        return [self.collate([items[i] for i in chosen[j : j + mb]]) for j in range(0, size, mb)]

    def collate(self, items: list) -> dict:
        return pad_examples_with(items, self.pad_id, per_token=("old_logps", "old_values", "advantages", "returns"))

    def save_extra(self, directory: Path) -> None:
        super().save_extra(directory)
        if self.kl_ctl and self.is_main:
            torch.save({"beta": self.kl_ctl.beta}, directory / "kl_controller.pt")

    def load_extra(self, directory: Path) -> None:
        super().load_extra(directory)
        if self.kl_ctl and (Path(directory) / "kl_controller.pt").is_file():
            self.kl_ctl.beta = float(torch.load(Path(directory) / "kl_controller.pt", weights_only=True)["beta"])

    def load_weights(self, directory: Path) -> None:
        self.unwrapped().load_checkpoint(directory)

    # --- loss ----------------------------------------------------------------------------------------

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        with self.autocast():
            logits, values = model(batch["input_ids"])  # (B, T, V), (B, T)
        logits = logits.float() / self.temperature
        logps = token_logprobs(logits, batch["labels"])
        mask = (batch["labels"] != IGNORE_INDEX).float()
        pg, stats = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"], mask, self.p.cliprange)
        vf, vstats = ppo_value_loss(
            values.float(), batch["old_values"], batch["returns"], mask, self.p.cliprange_value
        )
        loss = pg + self.p.vf_coef * vf
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            stats.update(vstats, value_loss=vf / n, policy_loss=pg / n)
        if self.p.entropy_coef:
            probs = logits.softmax(-1)
            entropy = -(probs * logits.log_softmax(-1)).sum(-1)  # (B, T)
            loss = loss - self.p.entropy_coef * (entropy * mask).sum()
            stats["entropy"] = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return loss, stats


# --- the command ------------------------------------------------------------------------------------


def make_critic(recipe: Recipe, policy: nn.Module) -> ScalarHeadModel:
    """The separate critic: from ppo.value_init (or the reward model), a reward-model or LM checkpoint."""
    from aligner.config import resolve_path

    init = recipe.ppo.value_init or recipe.ppo.reward_model
    if init and is_reward_checkpoint(resolve_path(init)):
        return load_reward_model(init).head_only().train().requires_grad_(True)
    if init:
        return ScalarHeadModel.from_causal_lm(load_model(init))
    base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    return ScalarHeadModel.from_causal_lm(copy.deepcopy(base))


def ppo(recipe: Recipe) -> dict:
    """PPO from the recipe's model (default: the SFT run) against its reward model; returns eval metrics."""
    from aligner.trainers.setup import prepare_model, train_and_score, training_kind

    p, t = recipe.ppo, recipe.train
    if p.rollout_prompts % (t.micro_batch_size * t.grad_accum):
        raise ConfigError(
            f"{recipe.path or 'recipe'}: ppo.rollout_prompts must be a multiple of train.micro_batch_size x "
            f"grad_accum ({t.micro_batch_size * t.grad_accum}, one minibatch per process)"
        )
    tokenizer, reward_set, prompts, evals, note = setup(recipe, "ppo")
    policy = prepare_model(recipe, tokenizer, stage="ppo")
    ref_model = frozen_reference(policy, recipe)
    critic = make_critic(recipe, policy) if p.value_model == "separate" else None
    model = PolicyAndValue(policy, critic)
    run_dir = Path(recipe.train.out_dir) / recipe.train.name
    prepare_run_dir(run_dir, recipe.train.resume, recipe.train.overwrite)
    trainer = PPOTrainer(recipe, model, tokenizer, prompts, evals, reward_set, ref_model=ref_model)
    if trainer.is_main:
        ref = reference_kind(recipe, ref_model=trainer.ref_model)
        print(f"ppo: {note}; value model {p.value_model}")
        print(
            f"ppo: {training_kind(recipe)}, {p.rollout_prompts} prompts per rollout x {p.ppo_epochs} epochs "
            f"({trainer.steps_per_rollout} steps each), kl_coef {p.kl_coef} (reference {ref}), "
            f"{trainer.total_steps} steps -> {run_dir}"
        )
    return train_and_score(trainer, trainer.policy, tokenizer, p.accuracy_items, p.accuracy_tokens)
