"""Shared building blocks of the radiology and pathology apps: settings, labels, errors, files."""
