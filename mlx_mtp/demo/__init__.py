"""Training scripts for the bundled demo checkpoints in `assets/`."""
