"""`engine chat` (engine/chat_cli.py): piped messages through click's CliRunner, the commands, Ctrl-C (simulated,
and through a pseudo-terminal)."""
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine
from engine.chat_cli import run_chat
from engine.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("chat"), TinySpec(seed=4), gguf_types=("f32",), hf=False)["f32"]


def test_piped_chat_answers_each_line_and_runs_commands(tiny, tmp_path):
    llm = engine.load(tiny)
    session = llm.session(system="Be brief.")
    expected = ["".join(session.chat(m, 6, **GREEDY)) for m in ("hello there", "and then?")]
    saved = tmp_path / "chat.session"
    stdin = f"hello there\n\nand then?\n/save {saved}\n/clear\n/load {saved}\nmore\n/bogus\n/load\n/quit\nignored\n"
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny), "-sys", "Be brief.", "-n", "6", "--temp", "0"],
                                input=stdin)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{expected[0]}\n{expected[1]}\n[saved ")
    continued = "".join(session.chat("more", 6, **GREEDY))  # the chat goes on after /load as without it
    tail = result.output.split("[loaded ", 1)[1].split("\n", 1)[1]
    assert tail.startswith(f"{continued}\nerror: unknown command /bogus")
    assert "error: /load needs a file name" in tail and saved.exists()


def test_save_and_load_expand_the_home_folder(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the shell does not expand ~ inside a chat line: the chat does
    stdin = "hello\n/save ~/chat.session\n/load ~/chat.session\n"
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny), "-n", "2", "--temp", "0"], input=stdin)
    assert result.exit_code == 0 and "error" not in result.output, result.output
    assert (tmp_path / "chat.session").exists() and "[loaded " in result.output


def test_a_chat_beyond_the_context_says_how_to_go_on(tiny):
    stdin = "hello there, how are you today\nand a second message\n/clear\nhi\n"
    result = CliRunner().invoke(cli, ["chat", "-m", str(tiny), "-c", "48", "-n", "8", "--temp", "0"], input=stdin)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].startswith("error: prompt of") and lines[1].endswith("or /clear to start a new chat")
    assert lines[2] == "[new chat]" and not lines[3].startswith("error")  # after /clear the chat fits again


def test_each_turn_prefills_only_the_new_message_and_ctrl_c_stops_an_answer(tiny):
    session = engine.load(tiny).session()
    lines = iter(["first message", "second message", "third message", None])
    out = []
    interrupted = []

    def write(text):
        if len(session.messages) == 5 and not interrupted and text != "\n":  # the third answer's first piece
            interrupted.append(text)
            raise KeyboardInterrupt
        out.append(text)

    stats = []
    original = session.generate_ids

    def recording(*args, **kwargs):
        yield from original(*args, **kwargs)
        stats.append(session.last_stats)

    session.generate_ids = recording
    run_chat(session, 5, GREEDY, lambda: next(lines), write, interactive=False)
    assert out[-1] == "\n[stopped]\n"
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 3
    assert session.messages[-1]["content"] == interrupted[0]  # the answer as far as it got stays in the chat
    second = stats[1]
    first_turn = len(session.llm.chat_ids(session.messages[:1]))
    assert second.cached_tokens >= first_turn  # the first turn was not prefilled again
    assert len(session.tokens) == session.cache.length and session.cache.owner is session


def test_terminal_chat_ctrl_c_stops_the_answer_not_the_program():
    """Through a pseudo-terminal: the prompt, a streamed answer, Ctrl-C ("[stopped]", the prompt again), /quit."""
    import fcntl
    import os
    import pty
    import select
    import signal
    import subprocess
    import termios

    def controlled_by_stdin():  # in the child: a new session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a shell, even where pytest was started with `&`

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine", "chat", "-n", "2000", "--temp", "0", "-c", "4096"],
                            stdin=follower, stdout=follower, stderr=follower, cwd=Path(__file__).parents[1],
                            preexec_fn=controlled_by_stdin)
    os.close(follower)
    seen = b""
    cursor = 0  # output before it was matched already

    def read_until(marker: bytes, timeout: float = 120.0) -> None:
        nonlocal seen, cursor
        deadline = time.monotonic() + timeout
        while marker not in seen[cursor:] and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        assert marker in seen[cursor:], seen.decode(errors="replace")
        cursor = seen.index(marker, cursor) + len(marker)

    try:
        read_until(b"> ")
        os.write(leader, b"Write a very long story about a dragon.\r")
        read_until(b"dragon.\r\n")  # the echo of the message
        read_until(b" ")  # the answer is streaming
        os.write(leader, b"\x03")  # Ctrl-C, delivered by the terminal as SIGINT
        read_until(b"[stopped]")
        read_until(b"> ")
        os.write(leader, b"/quit\r")
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
