"""Where results live: atomic writes, the run folder's schema, storage locations, Optuna studies."""
