"""Chat rendering and assistant-only loss masks for every template in prompts/.

Each template gets a tokenizer built here with that family's special tokens. The check: the masked
tokens, taken as contiguous runs, decode to exactly the assistant replies followed by the template's
end-of-turn token, nothing else (no header, no trailing newline), for single- and multi-turn
conversations with and without a system turn.
"""

import pytest
import torch
from conftest import FAMILIES, chat_tokenizer

from aligner.data.chat import IGNORE_INDEX, encode_conversation, encode_dataset, encode_prompt, render, reply_stop_ids
from aligner.errors import DataError
from aligner.model.tokenizer import load_chat_template

SYSTEM = {"role": "system", "content": "Be brief."}
Q1 = {"role": "user", "content": "What is 12 + 30?"}
A1 = {"role": "assistant", "content": "12 + 30 = 42. Final answer: 42"}
Q2 = {"role": "user", "content": "Which is larger: 9.9 or 9.11?"}
A2 = {"role": "assistant", "content": "The larger is 9.9."}
CONVERSATIONS = {
    "single": [Q1, A1],
    "single+system": [SYSTEM, Q1, A1],
    "multi": [Q1, A1, Q2, A2],
    "multi+system": [SYSTEM, Q1, A1, Q2, A2],
}


def masked_runs(tok, ids, mask) -> list[str]:
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param, chat_tokenizer(request.param)


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
def test_mask_is_exactly_the_replies_and_end_of_turn(family, conv):
    name, tok = family
    messages = CONVERSATIONS[conv]
    if name == "mistral" and messages[0]["role"] == "system":
        with pytest.raises(DataError, match="no system role"):
            encode_conversation(tok, messages)
        return
    eot = FAMILIES[name][3]
    ids, mask = encode_conversation(tok, messages)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = masked_runs(tok, ids, mask)
    # Mistral's reply starts with the space after [/INST], which belongs to the reply's first token.
    assert [r[1:] if name == "mistral" and r.startswith(" ") else r for r in runs] == [a + eot for a in replies]
    # the whole rendering round-trips, and the template's BOS appears once (never doubled)
    assert tok.decode(ids) == render(tok, messages)
    bos = FAMILIES[name][1]
    if bos:
        assert ids.count(tok.convert_tokens_to_ids(bos)) == 1 and ids[0] == tok.convert_tokens_to_ids(bos)
    # and the tokenizer really would have added a BOS of its own, had we let it
    if FAMILIES[name][4]:
        assert tok(render(tok, messages))["input_ids"][:2] == [tok.bos_token_id] * 2


def test_train_on_last_turn_only(family):
    name, tok = family
    ids, mask = encode_conversation(tok, CONVERSATIONS["multi"], train_on="last")
    runs = masked_runs(tok, ids, mask)
    assert len(runs) == 1 and runs[0].strip().startswith(A2["content"])


def test_generation_prompt_is_the_training_prefix(family):
    name, tok = family
    messages = CONVERSATIONS["multi"]
    ids, mask = encode_conversation(tok, messages)
    prompt = encode_prompt(tok, messages[:3])
    first = mask.index(1, len(prompt) - 1) if name != "mistral" else len(prompt)
    assert ids[: len(prompt)] == prompt and first == len(prompt)


def test_reply_stop_ids(family):
    name, tok = family
    eot = tok.convert_tokens_to_ids(FAMILIES[name][3])
    ids = reply_stop_ids(tok)
    assert ids[0] == eot and tok.eos_token_id in ids


def test_gemma_folds_the_system_turn_into_the_first_user_turn():
    tok = chat_tokenizer("gemma")
    text = render(tok, CONVERSATIONS["single+system"])
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat is 12 + 30?<end_of_turn>\n")


def test_qwen_default_system_prompt_is_not_in_the_loss():
    tok = chat_tokenizer("qwen")
    ids, mask = encode_conversation(tok, CONVERSATIONS["single"])
    assert "You are a helpful assistant." in tok.decode(ids)
    assert masked_runs(tok, ids, mask) == [A1["content"] + "<|im_end|>"]


def test_template_from_prompts_overrides_the_tokenizers_own():
    tok = chat_tokenizer("chatml")
    ids, mask = encode_conversation(tok, CONVERSATIONS["single"], template=load_chat_template("qwen"))
    assert "You are a helpful assistant." in tok.decode(ids)


def test_template_that_rewrites_past_turns_is_refused():
    tok = chat_tokenizer("chatml")
    # renders only the last assistant turn in full: earlier turns change once a later one exists
    template = (
        "{%- for m in messages -%}{%- if m.role == 'assistant' and not loop.last -%}"
        "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{%- else -%}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )
    with pytest.raises(DataError, match="renders earlier turns differently"):
        encode_conversation(tok, CONVERSATIONS["multi"], template=template)


def test_dataset_labels_are_shifted_mask():
    tok = chat_tokenizer("chatml")
    examples, report = encode_dataset([{"messages": CONVERSATIONS["multi+system"]}], tok, max_len=512)
    (ex,) = examples
    ids, mask = encode_conversation(tok, CONVERSATIONS["multi+system"])
    assert ex["input_ids"].tolist() == ids[:-1]
    want = [i if m else IGNORE_INDEX for i, m in zip(ids[1:], mask[1:])]
    assert ex["labels"].tolist() == want
    assert report.kept == 1 and report.loss_tokens == sum(mask[1:])


def test_overlong_truncate_drop_error_are_counted():
    tok = chat_tokenizer("chatml")
    short = {"messages": CONVERSATIONS["single"]}
    long = {"messages": CONVERSATIONS["multi+system"]}
    n_long = len(encode_conversation(tok, long["messages"])[0]) - 1
    n_short = len(encode_conversation(tok, short["messages"])[0]) - 1
    limit = (n_long + n_short) // 2
    assert n_short <= limit < n_long
    ex, rep = encode_dataset([short, long], tok, limit, overlong="truncate")
    assert rep.truncated == 1 and rep.kept == 2 and max(len(e["input_ids"]) for e in ex) == limit
    assert "1 truncated" in rep.summary()
    ex, rep = encode_dataset([short, long], tok, limit, overlong="drop")
    assert rep.dropped_overlong == 1 and rep.kept == 1 and "1 dropped as longer" in rep.summary()
    with pytest.raises(DataError, match="row 2: .* longer than the max length"):
        encode_dataset([short, long], tok, limit, overlong="error", source="data.jsonl")
    with pytest.raises(DataError, match="every conversation was longer"):
        encode_dataset([long], tok, limit, overlong="drop")


def test_truncation_that_cuts_every_reply_is_counted_then_an_error():
    tok = chat_tokenizer("chatml")
    conv = [SYSTEM, Q1, A1]
    prompt_len = len(encode_prompt(tok, conv[:2]))
    with pytest.raises(DataError, match="assistant masks are all zero"):
        encode_dataset([{"messages": conv}], tok, prompt_len - 2, overlong="truncate", source="d.jsonl")
    ex, rep = encode_dataset([{"messages": conv}, {"messages": [Q1, A1]}], tok, prompt_len - 2)
    assert rep.dropped_no_loss >= 1


def test_bad_conversations_name_the_row():
    tok = chat_tokenizer("mistral")
    with pytest.raises(DataError, match=r"data.jsonl row 2: chat template: Mistral \[INST\] template has no system"):
        encode_dataset([{"messages": [Q1, A1]}, {"messages": [SYSTEM, Q1, A1]}], tok, 512, source="data.jsonl")
    tok = chat_tokenizer("chatml")
    with pytest.raises(DataError, match="row 1: the conversation starts with an assistant turn"):
        encode_dataset([{"messages": [A1, Q1, A2]}], tok, 512)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        encode_dataset([{"messages": [Q1, A1]}], tok, 512)


def test_examples_are_int64_tensors():
    tok = chat_tokenizer("llama3")
    ex, _ = encode_dataset([{"messages": CONVERSATIONS["single"]}], tok, 512)
    assert ex[0]["input_ids"].dtype == torch.int64 and ex[0]["labels"].dtype == torch.int64
