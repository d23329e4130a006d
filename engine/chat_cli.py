"""`engine chat`: a multi-turn chat on one session, answers streamed as they are generated.

Each turn renders the whole chat through the model's template; the session reuses the cached tokens of the
turns before, so only the new message is prefilled. Typed lines are messages, except the commands below.
Ctrl-C stops the answer being written (what was written stays in the chat); Ctrl-D (or the end of piped
input, one message per line) ends the chat.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable

from .errors import ContextError, EngineError

HELP = """commands:
  /clear        start a new chat (the system message stays)
  /save FILE    save the chat and its KV cache to a session file
  /load FILE    continue a chat saved with /save (same model and settings)
  /help         this text
  /quit         leave (or Ctrl-D)"""


def run_chat(session: Any, max_tokens: int, sampling: dict[str, Any], read_line: Callable[[], str | None],
             write: Callable[[str], None], interactive: bool) -> None:
    """The chat loop: read_line() -> a line (None at the end of input); write(text) -> stdout, flushed."""
    if interactive:
        write(f"chat with {session.llm.config.name or 'the model'} ({session.llm.device}); /help for commands, "
              f"Ctrl-C stops an answer, Ctrl-D leaves\n")
    while True:
        line = read_line()
        if line is None:
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _command(session, text, write):
                return
            continue
        answer = session.chat(text, max_tokens, **sampling)
        try:
            for piece in answer:
                write(piece)
            write("\n")
        except KeyboardInterrupt:
            answer.close()
            write("\n[stopped]\n")
        except ContextError as e:  # the chat so far fills the context: every next message would fail too
            write(f"error: {e}, or /clear to start a new chat\n")
        except EngineError as e:
            write(f"error: {e}\n")


def _command(session: Any, text: str, write: Callable[[str], None]) -> bool:
    """Run a /command; False when the chat should end."""
    name, _, argument = text.partition(" ")
    argument = os.path.expanduser(argument.strip())  # ~ as a shell would (the shell never sees these lines)
    try:
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            session.clear()
            write("[new chat]\n")
        elif name in ("/save", "/load") and not argument:
            write(f"error: {name} needs a file name\n")
        elif name == "/save":
            session.save(argument)
            write(f"[saved {len(session.tokens)} tokens and {len(session.messages)} messages to {argument}]\n")
        elif name == "/load":
            session.load(argument)
            write(f"[loaded {len(session.tokens)} tokens and {len(session.messages)} messages from {argument}]\n")
        elif name == "/help":
            write(HELP + "\n")
        else:
            write(f"error: unknown command {name}; /help lists them\n")
    except EngineError as e:
        write(f"error: {e}\n")
    return True


def terminal_io() -> tuple[Callable[[], str | None], Callable[[str], None], bool]:
    """(read_line, write, interactive) for stdin/stdout: a '> ' prompt with line editing on a terminal,
    one message per line otherwise."""
    interactive = sys.stdin.isatty()

    def read_line() -> str | None:
        try:
            if interactive:
                return input("> ")
            line = sys.stdin.readline()
            return line if line else None
        except (EOFError, KeyboardInterrupt):
            if interactive:
                sys.stdout.write("\n")
            return None

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    return read_line, write, interactive
