"""`aligner chat` through a pseudo-terminal: a message in, a streamed reply out, /reset, /exit."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from types import SimpleNamespace

from aligner.interactive import PROMPT, chat


def read_until(fd: int, marker: str, seen: str, timeout: float = 60.0) -> str:
    end = time.time() + timeout
    while marker not in seen:
        assert time.time() < end, f"timed out waiting for {marker!r}; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
    return seen


def test_chat_in_a_pseudo_terminal(bases):
    main_fd, child_fd = pty.openpty()
    cmd = [sys.executable, "-m", "aligner", "chat", str(bases / "gpt"), "--max-new-tokens", "12", "--temperature", "1"]
    cmd += ["--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=subprocess.PIPE, env=env, close_fds=True)
    os.close(child_fd)
    try:
        out = read_until(main_fd, PROMPT, "")
        assert "/exit" in out  # the banner says how to leave
        os.write(main_fd, b"What is 7 + 5?\n")
        out = read_until(main_fd, "\n" + PROMPT, "")  # the reply, then the next prompt
        reply = out.split("What is 7 + 5?", 1)[-1].rsplit(PROMPT, 1)[0].strip()
        assert reply, repr(out)  # an untrained model says something
        os.write(main_fd, b"/reset\n")
        read_until(main_fd, "new conversation", "")
        os.write(main_fd, b"/exit\n")
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        os.close(main_fd)


def test_conversation_is_kept_and_streamed_in_pieces(bases):
    pieces = []
    args = SimpleNamespace(
        checkpoint=str(bases / "gpt"), template=None, arch="auto", system="system.txt",
        max_new_tokens=6, temperature=0.0, top_p=1.0, seed=None,
    )  # fmt: skip
    stdin = io.StringIO("hello\nand again\n")

    class Out(io.StringIO):
        def write(self, s):
            pieces.append(s)
            return super().write(s)

    stdout = Out()
    assert chat(args, stdin, stdout) == 0  # end of input quits
    text = stdout.getvalue()
    assert text.count(PROMPT) == 3
    assert len(pieces) > 8  # the replies arrived token by token, not in one write


def test_old_turns_are_dropped_when_the_context_is_full(bases):
    from aligner.interactive import Conversation
    from aligner.model.load import load_model, load_tokenizer
    from aligner.rollout.engine import SamplingParams

    tok = load_tokenizer(bases / "gpt")
    conv = Conversation(
        load_model(bases / "gpt"), tok, "system", None, SamplingParams(max_new_tokens=4, temperature=0)
    )
    conv.context = 60
    for i in range(6):
        conv.reply(f"message number {i} with some words", lambda s: None)
    assert conv.turns[-1]["role"] == "assistant" and "message number 5" in conv.turns[-2]["content"]
    assert 2 <= len(conv.turns) < 12  # the oldest exchanges went
    conv.turns.append({"role": "user", "content": "one more"})
    assert len(conv.prompt_ids()) + 4 <= 60
