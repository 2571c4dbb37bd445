"""Training: config, loop (with its run log, progress and Ctrl-C beside it), data feed,
checkpoints, the final model, LoRA, optimiser, bf16 master weights, DDP / FSDP2, compile."""
