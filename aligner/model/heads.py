"""A scalar head over any decoder: reward models (one score per sequence) and value models (one per token).

    rm = ScalarHeadModel.from_causal_lm(lm)       # GPT core or HF causal LM; its LM head is dropped
    values = rm(input_ids)                        # (B, T): the head read at every position
    rm = ScalarHeadModel.from_causal_lm(lm, keep_lm_head=True)
    values, logps = rm(input_ids, lm_labels=labels)   # + each label's log-prob under the LM head
    scores = last_token_values(values, lengths)   # (B,): each row's value at its last non-pad token
    scores = rm.sequence_scores(input_ids, labels, lengths)   # the reward itself, as scoring uses it

Rows are right-padded, so with causal attention a real token never sees padding and no attention
mask is needed. Checkpoints use the layout of transformers' `<Family>ForSequenceClassification` with
one label (the decoder under `model.*`, the head as `score.weight`, no bias), so a reward model
trained here also loads in transformers as AutoModelForSequenceClassification. A kept LM head is
not part of the checkpoint when it only serves a language-modelling term in training (`rm.lm_coef`).

A reward model may also count its own likelihood of the reply (`rm.likelihood_coef` = c): its reward
is then head(last token) + c * sum of log p(reply token) under the kept LM head, in training and in
every score (`sequence_scores`). config.json then records `reward_likelihood_coef`, and an untied LM
head is saved as `lm_head.weight` (a tied one is the embedding, already there); transformers loads
such a checkpoint's head but not the likelihood term.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from aligner.logprobs import linear_token_logprobs, summed_logps
from aligner.model.gpt import GPT, GPTConfig


class ScalarHeadModel(nn.Module):
    """A decoder body (`model`) and a linear head to one number (`score`)."""

    head_names = ("score",)  # trained in full (never given LoRA adapters), saved with any adapter

    def __init__(
        self,
        body: nn.Module,
        config,
        gpt: GPT | None = None,
        lm_head: nn.Linear | None = None,
        likelihood_coef: float = 0.0,
    ):
        super().__init__()
        if likelihood_coef and lm_head is None:
            raise ValueError("likelihood_coef needs the LM head: build with from_causal_lm(lm, likelihood_coef=...)")
        self.config = config
        self.likelihood_coef = float(likelihood_coef)  # reward = head + this x the reply's summed log-probs
        self.model = body  # the GPT core's ModuleDict, or the HF model's base (e.g. LlamaModel)
        self.__dict__["_gpt"] = gpt  # not a submodule: its `model` is ours, its LM head is unused
        # not a submodule either (not saved): the causal LM's head, tied to the embedding or frozen
        self.__dict__["_lm_head"] = lm_head
        hidden = config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False)
        std = getattr(config, "initializer_range", 0.02)
        nn.init.normal_(self.score.weight, 0.0, std)
        self.score.to(next(body.parameters()).device)

    @classmethod
    def from_causal_lm(
        cls, lm: nn.Module, keep_lm_head: bool = False, likelihood_coef: float = 0.0
    ) -> ScalarHeadModel:
        """Reuse the decoder of a causal LM (its weights, not a copy). The LM head is dropped, or with
        `keep_lm_head` (or a `likelihood_coef`, which needs it) kept for `forward(..., lm_labels=)`: a
        head tied to the input embedding trains with it, an untied one is frozen (it then anchors the
        hidden states to what it reads)."""
        head = lm.get_output_embeddings() if keep_lm_head or likelihood_coef else None
        if head is not None and head.weight is not lm.get_input_embeddings().weight:
            head.requires_grad_(False)
        if isinstance(lm, GPT):
            lm.lm_head = nn.Identity()  # the GPT core's forward below asks for hidden states
            model = cls(lm.model, lm.config, gpt=lm, lm_head=head, likelihood_coef=likelihood_coef)
        else:
            model = cls(lm.base_model, lm.config, lm_head=head, likelihood_coef=likelihood_coef)
        if getattr(lm, "is_loaded_in_4bit", False):
            model.is_loaded_in_4bit = True  # peft wraps 4-bit layers with its bnb LoRA layers only then
        return model

    def _apply(self, fn, *args, **kwargs):
        """.to() / .float() / .cuda() also reach a kept LM head, which is not a submodule."""
        super()._apply(fn, *args, **kwargs)
        if self._lm_head is not None:
            self._lm_head._apply(fn, *args, **kwargs)
        return self

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens if self._gpt is not None else self.model.get_input_embeddings()

    def hidden_states(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, document_ids=None, branch_ids=None
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, D); position_ids may pack several documents in a row, or
        `document_ids` and `branch_ids` (B, T) say which, with branches after a shared prefix (a transformers
        model then gets the boolean 4-D mask of `attention.build_attn_mask`; see `shares_prefixes`)."""
        if self._gpt is not None:
            return self._gpt(
                input_ids, position_ids=position_ids, return_hidden=True, document_ids=document_ids,
                branch_ids=branch_ids,
            )  # fmt: skip
        mask = None
        if document_ids is not None:
            from aligner.model.attention import build_attn_mask

            mask = build_attn_mask(input_ids.shape[1], 0, None, input_ids.device, document_ids, branch_ids)
        return self.model(
            input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False
        ).last_hidden_state

    def shares_prefixes(self, row_len: int) -> bool:
        """Whether `hidden_states` can take branches after a shared prefix: the GPT core, or a transformers
        model whose attention (SDPA) takes a boolean 4-D mask as given, without sliding-window layers
        shorter than a row (a given mask replaces the window)."""
        if self._gpt is not None:
            return True
        cfg = self.model.config
        window = getattr(cfg, "sliding_window", None)
        return getattr(cfg, "_attn_implementation", None) == "sdpa" and (window is None or window >= row_len)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, lm_labels=None, **documents):
        """The head at every position, (B, T), in fp32. Given `lm_labels` (B, T) (shifted token ids,
        IGNORE_INDEX where not wanted), also each label's fp32 log-prob under the kept LM head, (B, T).
        `documents`: document_ids and branch_ids for `hidden_states`."""
        h = self.hidden_states(input_ids, position_ids, **documents)
        values = self.score(h.to(self.score.weight.dtype)).squeeze(-1).float()
        if lm_labels is None:
            return values
        if self._lm_head is None:
            raise ValueError("this reward model has no LM head; build it with from_causal_lm(lm, keep_lm_head=True)")
        return values, linear_token_logprobs(h, self._lm_head.weight, lm_labels)

    def sequence_scores(self, input_ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The reward of each right-padded row, (B,): the head at its last real token (lengths (B,)),
        plus `likelihood_coef` x the summed log-probs of its labelled (reply) tokens when that is on.
        labels (B, T): shifted reply token ids, IGNORE_INDEX elsewhere, as the trainer encodes them."""
        if not self.likelihood_coef:
            return last_token_values(self(input_ids), lengths)
        values, token_logps = self(input_ids, lm_labels=labels)
        return last_token_values(values, lengths) + self.likelihood_coef * summed_logps(token_logps, labels)[0]

    def head_only(self) -> ScalarHeadModel:
        """This model without a likelihood term or kept LM head (in place): the head alone, e.g. for a
        PPO critic that starts from a reward model and predicts values, not rewards."""
        self.likelihood_coef = 0.0
        self.__dict__["_lm_head"] = None
        return self

    def _tied_lm_head(self) -> bool:
        return self._lm_head is not None and self._lm_head.weight is self.get_input_embeddings().weight

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_pretrained(
        self, directory: str | Path, dtype: torch.dtype | None = None, state_dict: dict | None = None, **_
    ) -> None:
        """model.safetensors + config.json in the `<Family>ForSequenceClassification` layout. `state_dict`:
        the weights to write instead of the module's own (a sharded model's, gathered)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        dtype = dtype or self.score.weight.dtype
        tensors = dict(self.state_dict() if state_dict is None else state_dict)
        if self.likelihood_coef and not self._tied_lm_head():  # scoring needs an untied LM head back
            tensors["lm_head.weight"] = self._lm_head.weight
        state = {k: v.detach().to(device="cpu", dtype=dtype).contiguous() for k, v in tensors.items()}
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        if isinstance(self.config, GPTConfig):
            d = self.config.to_hf_dict(str(dtype).removeprefix("torch."))
        else:
            d = self.config.to_dict()
        arch = (d.get("architectures") or ["LlamaForCausalLM"])[0]
        d["architectures"] = [arch.replace("ForCausalLM", "") + "ForSequenceClassification"]
        d["id2label"], d["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        d.pop("reward_likelihood_coef", None)
        if self.likelihood_coef:
            d["reward_likelihood_coef"] = self.likelihood_coef
        (directory / "config.json").write_text(json.dumps(d, indent=2) + "\n")


def last_token_values(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """values (B, T) read at each row's last real token (index length - 1): (B,)."""
    return values.gather(1, (lengths.long() - 1).clamp(min=0)[:, None].to(values.device))[:, 0]


def is_reward_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    arch = (json.loads(cfg.read_text()).get("architectures") or [""])[0]
    return arch.endswith("ForSequenceClassification")


def load_reward_model(path: str | Path) -> ScalarHeadModel:
    """The one way to load a saved reward model for scoring (PPO, evals): a full checkpoint, or a LoRA
    adapter (with its head) over the causal LM it was trained from, merged. Returned in eval mode."""
    from aligner.config import resolve_path
    from aligner.model.load import loading

    path = resolve_path(path)
    with loading(path, "reward model"):
        return _load_reward_model(path)


def _load_reward_model(path: Path) -> ScalarHeadModel:
    from aligner.checkpoint import read_safetensors
    from aligner.errors import ConfigError
    from aligner.model.load import is_gpt_checkpoint, load_model

    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base_path = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ConfigError(f"{path}/adapter_config.json does not say which base model the adapter belongs to")
        model = ScalarHeadModel.from_causal_lm(load_model(base_path))
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        return model.eval()
    if not is_reward_checkpoint(path):
        raise ConfigError(
            f"'{path}' is not a reward model checkpoint (config.json architectures: not *ForSequenceClassification)"
        )
    state = read_safetensors(path)
    config_dict = json.loads((path / "config.json").read_text())
    coef = float(config_dict.get("reward_likelihood_coef", 0.0))
    # saved only for a likelihood term's untied head; without it the LM head is the embedding
    head_weight = state.pop("lm_head.weight", None)
    if is_gpt_checkpoint(path):
        with torch.device("meta"):
            model = ScalarHeadModel.from_causal_lm(GPT(GPTConfig.from_hf_dict(config_dict)), likelihood_coef=coef)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    else:
        from transformers import AutoModel

        body = AutoModel.from_pretrained(str(path), dtype=torch.float32)  # reads model.* from the file
        head = None
        if coef:  # the LM head, over the embedding or from the file (replaced below)
            emb = body.get_input_embeddings().weight
            head = nn.Linear(emb.shape[1], emb.shape[0], bias=False, device="meta")
        model = ScalarHeadModel(body, body.config, lm_head=head, likelihood_coef=coef)
        missing = [] if "score.weight" in state else ["score.weight"]
        unexpected = []
        if not missing:
            model.score.weight.data.copy_(state["score.weight"])
    if coef:  # point the kept LM head at the loaded weights
        if head_weight is None:
            model._lm_head.weight = model.get_input_embeddings().weight
        else:
            model._lm_head.weight = nn.Parameter(head_weight, requires_grad=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    return model.float().eval()
