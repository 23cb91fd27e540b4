"""Tests of the radiology package."""
