"""Training: config, loop, data feed, checkpoints and state, optimiser, distributed, compile."""
