"""`aligner chat CHECKPOINT`: talk to a checkpoint in the terminal, the reply streamed as it is generated.

    aligner chat runs/sft/final                         # system prompt: prompts/system.txt
    aligner chat runs/grpo/final --temperature 0.7 --system "You are terse."
    aligner chat out/merged --template llama3           # a template from prompts/ instead of the tokenizer's

Every turn is rendered with the checkpoint's chat template exactly as SFT rendered its prompts
(generation prompt appended) and the reply is decoded until the template's end-of-turn token. The
conversation is kept across turns; when it no longer fits in the model's context the oldest exchanges
are dropped (the system prompt stays). `/reset` starts a new conversation, `/exit` (or end of input)
quits.
"""

from __future__ import annotations

import sys

from aligner.errors import ConfigError
from aligner.model.tokenizer import system_prompt

PROMPT = "> "


class Conversation:
    """A chat with one model: `reply(text, write)` streams the answer through `write` and keeps both turns."""

    def __init__(self, model, tokenizer, system: str | None, template: str | None, params):
        from aligner.data.chat import pad_token_id, reply_stop_ids
        from aligner.rollout.torch_engine import TorchEngine

        self.tokenizer, self.system, self.template, self.params = tokenizer, system, template, params
        self.engine = TorchEngine(model, pad_id=pad_token_id(tokenizer))
        self.params.stop_ids = tuple(reply_stop_ids(tokenizer, template))
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None) or 1_000_000
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt_ids(self) -> list[int]:
        """The conversation so far, the oldest exchanges dropped until it and the reply fit the context."""
        from aligner.data.chat import encode_prompt

        while True:
            ids = encode_prompt(self.tokenizer, self.messages(), self.template)
            if len(ids) + self.params.max_new_tokens <= self.context or len(self.turns) <= 1:
                return ids[-(self.context - self.params.max_new_tokens) :]
            self.turns = self.turns[2:]  # one user turn and its reply

    def reply(self, text: str, write) -> str:
        self.turns.append({"role": "user", "content": text})
        generated: list[int] = []
        shown = ""

        def on_token(tokens, alive):
            nonlocal shown
            if not bool(alive[0]):
                return
            generated.append(int(tokens[0]))
            now = self.tokenizer.decode(generated, skip_special_tokens=True)
            if now.startswith(shown) and not now.endswith("\ufffd"):  # whole characters only
                write(now[len(shown) :])
                shown = now

        out = self.engine.generate([self.prompt_ids()], self.params, on_token=on_token)[0]
        answer = self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        if answer.startswith(shown):
            write(answer[len(shown) :])
        self.turns.append({"role": "assistant", "content": answer.strip()})
        return answer


def chat(args, stdin=None, stdout=None) -> int:
    """The interactive loop of `aligner chat` over stdin / stdout."""
    from aligner.model.load import load_model, load_tokenizer
    from aligner.model.tokenizer import load_chat_template
    from aligner.rollout.engine import SamplingParams

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tokenizer = load_tokenizer(args.checkpoint)
    template = load_chat_template(args.template) if args.template else None
    if template is None and not tokenizer.chat_template:
        raise ConfigError(f"{args.checkpoint}: the tokenizer has no chat template; pass --template (e.g. chatml)")
    model = load_model(args.checkpoint, arch=args.arch).eval()
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )
    conv = Conversation(model, tokenizer, system_prompt(args.system), template, params)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(f"chatting with {args.checkpoint} (/reset starts over, /exit quits)\n")
    while True:
        write(PROMPT)
        line = stdin.readline()
        if not line:  # end of input
            write("\n")
            return 0
        text = line.strip()
        if text == "/exit":
            return 0
        if text == "/reset":
            conv.reset()
            write("(new conversation)\n")
            continue
        if not text:
            continue
        conv.reply(text, write)
        write("\n")
