"""Tests of the research package."""
