"""Starting and stopping the server: the decoder, the app, uvicorn.

uvicorn owns SIGINT / SIGTERM: it stops accepting connections, gives open
requests GRACEFUL_SHUTDOWN_S to finish, then runs the app's shutdown, which
stops the decoder thread.
"""

from __future__ import annotations

import socket
from typing import Any, Optional

import uvicorn

from mlx_mtp.api import SpeculativeModel

from .app import ServeConfig, build_app

#: Seconds open requests get to finish after Ctrl-C / SIGTERM before their
#: connections are closed (and their rows cancelled).
GRACEFUL_SHUTDOWN_S = 5


def address_problem(host: str, port: int) -> Optional[str]:
    """Why the server could not listen on host:port (in use, no such
    address), found before the model loads; None when it can. The port
    could still be taken in between: uvicorn then says so itself."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot listen on {host}: {e.strerror or e}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            return f"cannot listen on {host}:{port}: {e.strerror or e}"
    return None


def make_generator(model: SpeculativeModel, config: ServeConfig) -> Any:
    """The batched speculative decoder the server runs (mlx_mtp.batching)."""
    from mlx_mtp.batching import BatchGenerator

    num_draft = config.num_draft if config.num_draft is not None else model.default_num_draft
    return BatchGenerator(model, max_batch=config.max_batch, num_draft=num_draft,
                          prompt_cache_bytes=int(config.prompt_cache_gb * (1 << 30)))


def make_server(model: SpeculativeModel, tokenizer: Any, config: ServeConfig,
                generator: Optional[Any] = None, log_level: str = "info") -> uvicorn.Server:
    """A uvicorn server for `model` (not started: `.run()` blocks, and
    installs the signal handlers when called on the main thread)."""
    app = build_app(model, tokenizer, config, generator if generator is not None else make_generator(model, config))
    return uvicorn.Server(uvicorn.Config(
        app, host=config.host, port=config.port, log_level=log_level, lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    ))


def run(model: SpeculativeModel, tokenizer: Any, config: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    make_server(model, tokenizer, config).run()
