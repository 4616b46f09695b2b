"""python -m mlx_mtp.testing DIR: write a complete tiny Qwen3.5 + MTP model directory."""

from . import main

main()
