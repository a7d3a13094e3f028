"""Train a byte-level BPE tokenizer with the `tokenizers` library and attach a chat template.

    aligner pretrain recipes/pretrain.yaml     # trains one (tokenizer.vocab_size) before the model

Special tokens: `<|endoftext|>` (EOS, ends every pretraining document), `<|pad|>` (padding, distinct
from EOS so labels never confuse the two), `<|im_start|>` / `<|im_end|>` (chat turns; `<|im_end|>`
ends an assistant turn). There is no BOS token and encoding adds no special tokens, so a chat
template is the only thing that puts special tokens into a sequence. The result is a
`PreTrainedTokenizerFast` that `save_pretrained` writes and `AutoTokenizer.from_pretrained` reads,
with `apply_chat_template` working.

Digits are split one per token before BPE (as Llama and Qwen do): "1234" is always 1-2-3-4, so a
small model sees the same digits whatever number they sit in, which is what arithmetic needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from aligner.config import REPO_ROOT
from aligner.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, chat_template: str | None = None, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE of `vocab_size` tokens (specials included) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    n_base = 256 + len(SPECIAL_TOKENS)
    if vocab_size < n_base:
        raise DataError(f"tokenizer.vocab_size must be at least {n_base} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def load_chat_template(path_or_name: str) -> str:
    """A template's text from a path (cwd first, then the repository root) or a name in prompts/."""
    candidates = [Path(path_or_name), REPO_ROOT / path_or_name]
    if "/" not in path_or_name and not path_or_name.endswith(".jinja"):
        candidates += [Path("prompts") / f"{path_or_name}.jinja", REPO_ROOT / "prompts" / f"{path_or_name}.jinja"]
    for p in candidates:
        if p.is_file():
            return p.read_text()
    looked = ", ".join(str(p) for p in dict.fromkeys(candidates))
    raise DataError(f"tokenizer.chat_template: template '{path_or_name}' not found (looked for {looked})")


def system_prompt(value: str | None) -> str | None:
    """A system prompt: a file's text, a file in prompts/, or the text itself; None or '' = none."""
    if not value:
        return None
    for path in (Path(value), Path("prompts") / value, REPO_ROOT / "prompts" / value):
        if path.is_file():
            return path.read_text().strip()
    return value


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end a generation: EOS and, when the vocabulary has it, the chat end-of-turn token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
