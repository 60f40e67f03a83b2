"""The selection stage: Optuna studies over (epoch, λ, n) on the cached maps."""
