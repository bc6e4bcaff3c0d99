"""Hyperparameter sweeps: the search space, the Optuna study, one trial's objective."""
