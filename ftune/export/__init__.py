"""Writing what a run produced: PEFT-format adapters and merged checkpoints."""
