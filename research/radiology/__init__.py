"""Offline research code for the radiology app."""
