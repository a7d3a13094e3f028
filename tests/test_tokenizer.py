"""Byte-level BPE training, special tokens, and the chat template through AutoTokenizer."""

import pytest
from transformers import AutoTokenizer

from aligner.data.world import world_rows
from aligner.errors import DataError
from aligner.model.tokenizer import SPECIAL_TOKENS, end_of_turn_ids, load_chat_template, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = [r["text"] for r in world_rows("pretrain", "train", n=300)]
    t = train_tokenizer(texts, vocab_size=400, chat_template=load_chat_template("chatml"))
    path = tmp_path_factory.mktemp("tok")
    t.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_vocab_and_specials(tok):
    assert len(tok) <= 400
    for s in SPECIAL_TOKENS:
        assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1, s
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token_id is None
    assert end_of_turn_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


@pytest.mark.parametrize("text", ["What is 12 + 30?", "  spaces\tand\nnewlines ", "héllo wörld 你好 🙂"])
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_merges_compress_domain_text(tok):
    text = "Question: What is 12 + 30?\n12 + 30 = 42\nFinal answer: 42"
    assert len(tok(text)["input_ids"]) < len(text.encode()) / 2


def test_chat_template_renders_chatml_without_bos(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tok(text)["input_ids"] == ids  # encoding adds nothing


def test_unknown_role_and_missing_template(tok):
    with pytest.raises(Exception, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    with pytest.raises(DataError, match="template 'nope' not found"):
        load_chat_template("nope")
    with pytest.raises(DataError, match="vocab_size must be at least"):
        train_tokenizer(["x"], vocab_size=100)
