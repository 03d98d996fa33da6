"""The training loop, optimizer and schedules, precision, checkpoints."""
