"""Run the server: uvicorn around app.create_app, the model loading in the background (/health: 503 until then)."""
from __future__ import annotations

import logging
import socket
from typing import Any, Callable

from ..errors import ConfigError


def run_server(load_model: Callable[[], Any], model_name: str, host: str, port: int, batch_decode: bool = True
               ) -> None:
    """Serve until Ctrl-C; a model that fails to load stops the server and its error is raised.
    batch_decode: the busy slots' decode steps as one batched forward where the backend can (batching.py)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise ConfigError(f"engine serve needs the server extra (pip install 'engine[server]'): {e}") from None
    listening = _listen(host, port)  # before the model loads: a port in use is one error, not uvicorn's exit 3
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    address = f"[{host}]" if ":" in host else host
    logging.getLogger(__name__).info("listening on http://%s:%d (Ctrl-C stops)", address, listening.getsockname()[1])
    app = create_app(load_model, model_name, batch_decode)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    state = app.state.engine
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[listening])
    if state.load_error is not None:
        raise state.load_error


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (IPv4 or IPv6, as the host resolves); ConfigError when it cannot be."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as e:
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
