"""`mlx-mtp chat`: a Textual chat that shows its drafting."""

from .app import ChatApp, run

__all__ = ["ChatApp", "run"]
