"""Training building blocks the recipes share: loss, optimizer and schedule, checkpoints, metrics, progress."""
