"""Training: state + EMA, optimizers, the jitted step, checkpoints, the loop."""
