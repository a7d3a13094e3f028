"""Byte-level BPE training, special tokens, and the ChatML template through AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from aligner.data.world import world_rows
from aligner.errors import DataError
from aligner.model.tokenizer import (
    EOS,
    IM_END,
    IM_START,
    PAD,
    REPO_ROOT,
    SPECIAL_TOKENS,
    end_of_turn_ids,
    load_chat_template,
    train_tokenizer,
)

VOCAB = 500
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 + 30?"},
    {"role": "assistant", "content": "12 + 30 = 42\nFinal answer: 42"},
]
CHATML = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
    "<|im_start|>assistant\n12 + 30 = 42\nFinal answer: 42<|im_end|>\n"
)


@pytest.fixture(scope="module")
def trained():
    texts = [r["text"] for r in world_rows("pretrain", "train", n=300)]
    return train_tokenizer(texts, vocab_size=VOCAB, chat_template=load_chat_template("chatml"))


@pytest.fixture(scope="module")
def tok(trained, tmp_path_factory):
    """The trained tokenizer after a save / AutoTokenizer round trip, as every later stage sees it."""
    path = tmp_path_factory.mktemp("tok")
    trained.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_vocab_and_special_tokens(trained, tok):
    assert len(trained) == len(tok) <= VOCAB
    assert len(tok) > VOCAB - 20  # the merges fill the vocabulary
    for s in SPECIAL_TOKENS:
        assert len(ids_of(tok, s)) == 1, s
    assert [tok.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert tok.eos_token == EOS and tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None and tok.bos_token_id is None
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]
    assert tok("12 + 30")["input_ids"] == ids_of(tok, "12 + 30")  # encoding adds nothing


@pytest.mark.parametrize(
    "text",
    ["What is 12 + 30?", "  spaces\tand\nnewlines \n\n", "héllo wörld 你好 🙂 \x00\x7f", "<|im_start|>x<|im_end|>"],
)
def test_round_trip(tok, text):
    assert tok.decode(ids_of(tok, text)) == text


def test_digits_are_single_tokens(tok):
    assert tok.tokenize("x 1234 9.11") == ["x", "Ġ", "1", "2", "3", "4", "Ġ", "9", ".", "1", "1"]


def test_merges_compress_domain_text(tok):
    text = 'Question: How many times does the letter "r" appear in "strawberry"?\nFinal answer: 3'
    assert len(ids_of(tok, text)) < len(text.encode()) / 2


def test_chat_template_renders_chatml_exactly(tok):
    assert tok.apply_chat_template(CHAT, tokenize=False) == CHATML
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == CHATML[: CHATML.index("12 + 30 = 42")]
    assert prompt.endswith("<|im_start|>assistant\n")
    encoded = tok.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded  # a dict in transformers 5
    assert ids == ids_of(tok, prompt)  # no BOS, no special token added twice
    assert ids.count(tok.convert_tokens_to_ids(IM_START)) == 3
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 2
    assert tok.eos_token_id not in ids


def test_unknown_role_raises(tok):
    with pytest.raises(Exception, match="unknown role 'robot'"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)
    text = tok.apply_chat_template([{"role": "tool", "content": "42"}], tokenize=False)  # tool results are turns
    assert text == "<|im_start|>tool\n42<|im_end|>\n"


def test_load_chat_template_resolution(tmp_path, monkeypatch):
    text = (REPO_ROOT / "prompts" / "chatml.jinja").read_text()
    monkeypatch.chdir(tmp_path)  # not the repository: names and relative paths fall back to the repo root
    assert load_chat_template("chatml") == text
    assert load_chat_template("prompts/chatml.jinja") == text
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "chatml.jinja").write_text("mine")
    assert load_chat_template("prompts/chatml.jinja") == "mine"  # the working directory comes first
    assert load_chat_template(str(tmp_path / "prompts" / "chatml.jinja")) == "mine"
    with pytest.raises(DataError, match="template 'prompts/nope.jinja' not found .*prompts/nope.jinja"):
        load_chat_template("prompts/nope.jinja")
    with pytest.raises(DataError, match="template 'nope' not found"):
        load_chat_template("nope")


def test_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size must be at least 260"):
        train_tokenizer(["x"], vocab_size=100)


def test_any_text_encodes_with_a_tiny_corpus():
    tiny = train_tokenizer(["aaa bbb"], vocab_size=270)
    text = "Zürich ∑ 😀 \t\n"
    assert tiny.decode(ids_of(tiny, text)) == text
    assert tiny.unk_token_id is None
