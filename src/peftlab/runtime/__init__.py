"""What every training loop uses: precision, lr schedule, optimizer, checkpoints, metrics
log, plots and the torch.distributed world. Knows nothing of models' insides or tasks."""
