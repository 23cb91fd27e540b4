"""Offline research code: training, evaluation and experiments that import the serving packages."""
