"""Radiology research: offline training, evaluation, splits, test-time augmentation experiments, the demo."""
