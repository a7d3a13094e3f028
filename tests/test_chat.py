"""Chat rendering and assistant-only loss masks for every template in prompts/.

Each template gets a tokenizer built here with that family's special tokens. The check: the masked
tokens, taken as contiguous runs, decode to exactly the assistant replies followed by the template's
end-of-turn token, nothing else (no header, no trailing newline), for single- and multi-turn
conversations with and without a system turn.
"""

import pytest
import torch
from conftest import FAMILIES, chat_tokenizer

from aligner.data.chat import encode_conversation, encode_dataset, encode_prompt, render, reply_stop_ids
from aligner.errors import DataError
from aligner.logprobs import IGNORE_INDEX
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


def test_template_that_rewrites_past_turns_suggests_training_on_the_last_turn():
    tok = chat_tokenizer("chatml")
    template = (
        "{%- for m in messages -%}{%- if m.role == 'assistant' and not loop.last -%}"
        "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{%- else -%}"
        "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )
    with pytest.raises(DataError, match=r"sft\.train_on: last"):
        encode_conversation(tok, CONVERSATIONS["multi"], template=template)
    ids, mask = encode_conversation(tok, CONVERSATIONS["multi"], template=template, train_on="last")
    assert masked_runs(tok, ids, mask) == [A2["content"] + "<|im_end|>"]


# --- reasoning, tools, and replies that start with whitespace --------------------------------------------

THINK = {"role": "assistant", "content": "Final answer: 42", "reasoning_content": "12 + 30 = 42."}
THINK2 = {"role": "assistant", "content": "\nThe larger is 9.9.", "reasoning_content": "9.90 > 9.11"}


def test_qwen3_template_renders_reasoning_in_every_turn_and_in_the_loss():
    tok = chat_tokenizer("qwen")
    template = load_chat_template("qwen3")
    examples, report = encode_dataset([{"messages": [Q1, THINK, Q2, THINK2]}], tok, 512, template=template)
    ids, mask = encode_conversation(tok, [Q1, THINK, Q2, THINK2], template)
    assert masked_runs(tok, ids, mask) == [
        "<think>\n12 + 30 = 42.\n</think>\n\nFinal answer: 42<|im_end|>",
        "<think>\n9.90 > 9.11\n</think>\n\nThe larger is 9.9.<|im_end|>",  # the content's leading newline goes
    ]
    assert not render(tok, [Q1, THINK], template=template).startswith("<|im_start|>system")  # no default system
    assert report.reasoning_inlined == 0 and "reasoning_content" not in report.summary()
    prompt = encode_prompt(tok, [Q1, THINK, Q2], template)
    assert ids[: len(prompt)] == prompt


def test_reasoning_is_inlined_for_templates_that_do_not_render_it():
    tok = chat_tokenizer("chatml")
    examples, report = encode_dataset([{"messages": [Q1, THINK]}, {"messages": [Q1, A1]}], tok, 512)
    assert report.reasoning_inlined == 1 and "1 assistant turns' reasoning_content inlined" in report.summary()
    ids, mask = encode_conversation(tok, [Q1, THINK])
    assert masked_runs(tok, ids, mask) == ["<think>\n12 + 30 = 42.\n</think>\n\nFinal answer: 42<|im_end|>"]
    llama = chat_tokenizer("llama3")
    ids, mask = encode_conversation(llama, [Q1, THINK])
    assert masked_runs(llama, ids, mask) == ["<think>\n12 + 30 = 42.\n</think>\n\nFinal answer: 42<|eot_id|>"]


CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}],
}
RESULT = {"role": "tool", "content": "42", "name": "add"}


@pytest.mark.parametrize("name", ["chatml", "qwen", "qwen3"])
def test_tool_turns_are_rendered_and_masked_out(name):
    from aligner.data.formats import to_records

    tok = chat_tokenizer("qwen")
    template = load_chat_template(name)
    (rec,) = to_records([{"messages": [Q1, CALL, RESULT, A1]}])
    assert rec["messages"][1]["content"] == "" and rec["messages"][2] == RESULT
    ids, mask = encode_conversation(tok, rec["messages"], template)
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|im_end|>'
    assert masked_runs(tok, ids, mask) == [call, A1["content"] + "<|im_end|>"]
    text = render(tok, rec["messages"], template=template)
    tool_turn = "<|im_start|>tool\n42<|im_end|>" if name == "chatml" else "<|im_start|>user\n<tool_response>\n42\n"
    assert tool_turn in text


# A tiny byte-level BPE with Qwen2's pre-tokenizer (the Split regex of its tokenizer.json, then ByteLevel
# without its own regex), trained on text with blank lines so that newline runs become single tokens.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def qwen2_tok():
    from conftest import TEXT
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [t.replace(" is ", "\n\nis ").replace(" the ", "\n \nthe ") for t in TEXT], trainer=trainer
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = load_chat_template("chatml")
    return fast


@pytest.mark.parametrize("reply", ["\n\nHello there", " \nHello there", "\n \nHello there"])
def test_reply_whitespace_that_straddles_the_span_start_is_stripped(qwen2_tok, reply):
    tok = qwen2_tok
    messages = [Q1, {"role": "assistant", "content": reply}]
    # the problem: "assistant\n" + reply's first newline make one token across the start of the reply
    text = render(tok, messages)
    start = len(render(tok, [Q1], add_generation_prompt=True))
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(s < start < e for s, e in offsets)
    examples, report = encode_dataset([{"messages": messages}], tok, 512)
    assert report.whitespace_stripped == 1 and "1 replies' leading whitespace stripped" in report.summary()
    ids, mask = encode_conversation(tok, messages)
    assert masked_runs(tok, ids, mask) == ["Hello there<|im_end|>"]
    prompt = encode_prompt(tok, [Q1])
    assert ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)
    # earlier turns of a prompt are stripped the same way, so a later turn's prompt is a prefix too
    longer = [Q1, {"role": "assistant", "content": reply}, Q2, {"role": "assistant", "content": reply}]
    ids, mask = encode_conversation(tok, longer)
    assert masked_runs(tok, ids, mask) == ["Hello there<|im_end|>"] * 2
    prompt = encode_prompt(tok, longer[:3])
    assert ids[: len(prompt)] == prompt and mask.index(1, len(prompt) - 1) == len(prompt)
    ids, mask = encode_conversation(tok, longer, train_on="last")  # the history is stripped all the same
    assert ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)


def test_whitespace_that_does_not_straddle_is_kept(qwen2_tok):
    messages = [Q1, {"role": "assistant", "content": "  Hello there"}]  # "\n", " ", " Hello": no straddle
    examples, report = encode_dataset([{"messages": messages}], qwen2_tok, 512)
    ids, mask = encode_conversation(qwen2_tok, messages)
    assert report.whitespace_stripped == 0 and masked_runs(qwen2_tok, ids, mask) == ["  Hello there<|im_end|>"]


def _encode_as_before(tok, messages):
    """The encoding before replies could be re-rendered: prefix spans, a token in the loss when its first
    character is inside one."""
    text = render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(tok, messages[:i], add_generation_prompt=True))
            spans.append((start, len(render(tok, messages[: i + 1]).rstrip())))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(e > s and any(a <= s < b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return enc["input_ids"], mask


def test_task_world_encodings_do_not_move(qwen2_tok):
    from aligner.data.world import world_rows

    rows = world_rows("sft", "train", n=40) + world_rows("sft", "val", n=10)
    for tok in (chat_tokenizer("chatml"), chat_tokenizer("qwen"), chat_tokenizer("llama3"), qwen2_tok):
        examples, report = encode_dataset(rows, tok, 512)
        assert report.whitespace_stripped == 0 and report.reasoning_inlined == 0
        for row, ex in zip(rows, examples):
            ids, mask = _encode_as_before(tok, row["messages"])
            assert encode_conversation(tok, row["messages"]) == (ids, mask)
            assert ex["input_ids"].tolist() == ids[:-1]
            prompt = encode_prompt(tok, row["messages"][:-1])
            assert prompt == tok(render(tok, row["messages"][:-1], True), add_special_tokens=False)["input_ids"]


def test_gpt2_pretokenizer_merges_newline_and_first_space(tmp_path):
    """The case as found on a 135M-param instruct model: a GPT-2-style pre-tokenizer (`\\s+(?!\\S)`) makes
    "\\n " one token "ĊĠ" before "Ġhello", straddling the reply's start; stripped, the mask is exact and
    the generation prompt is a token prefix again."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's regex
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(["user\n  x\n  hello there\n  hi"] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials[1:]})
    fast.chat_template = load_chat_template("chatml")
    assert "ĊĠ" in fast.tokenize("assistant\n  hello")
    messages = [Q1, {"role": "assistant", "content": "  hello there"}]
    examples, report = encode_dataset([{"messages": messages}], fast, 512)
    ids, mask = encode_conversation(fast, messages)
    prompt = encode_prompt(fast, [Q1])
    assert report.whitespace_stripped == 1 and ids[: len(prompt)] == prompt and mask.index(1) == len(prompt)
    assert masked_runs(fast, ids, mask) == ["hello there<|im_end|>"]
