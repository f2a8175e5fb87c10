"""The offline sweep: a W&B sweep.yaml run as an Optuna study, its runs as child processes, and its report."""
