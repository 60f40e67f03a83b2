"""The training stage: Ray Tune trials, one per category, training configuration and seed."""
