"""Applications built on mlx_mtp (the `mlx-mtp chat` TUI)."""
