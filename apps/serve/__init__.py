"""`mlx-mtp serve`: an OpenAI-compatible HTTP server over the batched
speculative decoder (FastAPI + uvicorn). See docs/serve.md."""

from .app import ServeConfig, build_app
from .server import make_server, run

__all__ = ["ServeConfig", "build_app", "make_server", "run"]
