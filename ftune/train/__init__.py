"""The training loop, its hooks and checkpoints."""
