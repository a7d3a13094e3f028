"""aligner: a post-training alignment toolkit.

A small, readable GPT core that a pretraining recipe trains from scratch, and trainers (SFT, reward
models, DPO, PPO, GRPO, RLOO, REINFORCE++, online DPO) on one shared loop that run on that core or on any
Hugging Face causal LM.

Python API (imports are lazy so `import aligner` stays light); every registered algorithm's command is
here by its name (aligner.registry):

    from aligner import load_recipe, pretrain, sft
    recipe = load_recipe("recipes/pretrain.yaml", {"max_steps": 50})
    result = pretrain(recipe)
    result = sft(load_recipe("recipes/chat.yaml", {"max_steps": 50}, command="sft"))
"""

__version__ = "0.1.0"

_LAZY = {
    "load_recipe": "aligner.config",
    "Recipe": "aligner.config",
    "AlignerError": "aligner.errors",
    "GPT": "aligner.model.gpt",
    "GPTConfig": "aligner.model.gpt",
    "exact_match": "aligner.evaluate",
    "load_spec": "aligner.evaluate",
    "write_report": "aligner.report",
    "encode_conversation": "aligner.data.chat",
    "SFTTrainer": "aligner.trainers.sft",
    "Trainer": "aligner.trainers.base",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    from aligner.config import ALGORITHMS  # the recipe layer only: no torch

    if name in ALGORITHMS:
        return ALGORITHMS[name].command()
    raise AttributeError(f"module 'aligner' has no attribute {name!r}")
