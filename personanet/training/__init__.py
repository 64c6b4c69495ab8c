"""The training loop's parts: devices, DP set-up, the loop, checkpoints, defaults."""
