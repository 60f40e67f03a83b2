"""The model: profiles, UNet, transparency process, synthesis, trainer, inference (no Ray, no Optuna)."""
