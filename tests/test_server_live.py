"""`engine serve` over a real socket (uvicorn in a thread): a client that disconnects mid-stream stops the
generation, and the server goes on serving; a model that cannot load, or a missing extra, is one error."""
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import engine  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.server.app import create_app  # noqa: E402

COUNT = {"prompt": "Counting from one to two hundred: 1, 2, 3, 4, 5,", "max_tokens": 120, "temperature": 0}


def generated_tokens(client) -> float:
    metrics = client.get("/metrics").text
    return float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("engine_generated_tokens_total ")))


@pytest.fixture(scope="module")
def base_url():
    app = create_app(lambda: engine.load(device="cpu", context=512), "smol")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (server.started and app.state.engine.llm is not None):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_a_disconnect_mid_stream_stops_the_generation(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        before = generated_tokens(client)
        with client.stream("POST", "/v1/completions", json={**COUNT, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
            assert len(received) >= 2
        # the connection is closed; the generation stops at the next token, well before max_tokens
        deadline = time.monotonic() + 30
        while generated_tokens(client) == before:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert generated_tokens(client) - before < COUNT["max_tokens"] // 2
        whole = client.post("/v1/completions", json={**COUNT, "max_tokens": 4}).json()
        assert whole["usage"]["completion_tokens"] == 4  # still serving, with the same cached prompt
        assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == whole["usage"]["prompt_tokens"] - 1
        first = json.loads(received[0][len("data: "):])["choices"][0]["text"]
        assert first and whole["choices"][0]["text"].startswith(first)


def test_serve_stops_with_one_error_when_the_model_cannot_load(tmp_path):
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "-m", str(tmp_path / "missing.gguf"),
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.gguf'}: no such file or directory"
    assert "Traceback" not in result.stderr


def test_serve_without_the_server_extra_is_one_error(monkeypatch):
    from engine.server.command import run_server

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'engine\[server\]'"):
        run_server(lambda: None, "smol", "127.0.0.1", 0)


def test_serve_on_a_port_in_use_or_a_bad_address_is_one_error():
    from engine.server.command import run_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: .*in use"):
            run_server(lambda: pytest.fail("nothing loads before the port is open"), "smol", "127.0.0.1", port)
    with pytest.raises(ConfigError, match="cannot listen on 999.1.1.1:8080"):
        run_server(lambda: None, "smol", "999.1.1.1", 8080)
