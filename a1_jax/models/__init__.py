"""Pure Flax Linen modules, one architecture unit per file."""
