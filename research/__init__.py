"""Research tools kept apart from the serving packages: offline training, evaluation, experiments."""
